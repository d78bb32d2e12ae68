"""The package's structure, read from its imports: no import cycles (imports inside functions and under
TYPE_CHECKING count too: they only hide a cycle), layers that import only downward, packages entered through
the modules their faces list, no private names taken across packages, and no pyzmq below the worker."""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwenbook_bridge"
ROOT = "qwenbook_bridge"

# What each layer may import, besides itself. The root package's __init__ (versions) is open to all.
MAY_IMPORT = {
    "engine": set(),
    "distributed": {"engine"},
    "openai": {"engine"},
    "handlers": {"engine", "distributed", "openai", "protocol"},
    "worker": {"handlers", "engine", "protocol"},
    "bench": {"engine", "distributed"},
    "protocol": set(),
    "tiny": set(),
    "__main__": {"worker"},
}
# The layers that run on GPU hosts without pyzmq.
WITHOUT_ZMQ = ("engine", "distributed", "openai", "bench")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str  # a module of the package
    names: tuple[str, ...]  # the names taken, when the target is a module and not a submodule
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def read_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def import_edges(modules: dict[str, Path], root_name: str) -> list[Edge]:
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target != root_name and not target.startswith(root_name + "."):
                    continue
                names = []
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        edges.append(Edge(name, sub, (), node.lineno))
                    else:
                        names.append(alias.name)
                if names:
                    edges.append(Edge(name, target, tuple(names), node.lineno))
            elif isinstance(node, ast.Import):
                edges += [Edge(name, a.name, (), node.lineno) for a in node.names
                          if a.name == root_name or a.name.startswith(root_name + ".")]
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (or a module importing itself)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def owner(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to (a package's own __init__ belongs to its parent)."""
    return module.rpartition(".")[0]


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return read_modules(PACKAGE)


@pytest.fixture(scope="module")
def edges(modules: dict[str, Path]) -> list[Edge]:
    return import_edges(modules, ROOT)


def describe(found: list[Edge]) -> str:
    return "\n".join(f"  {e.source} (line {e.line}) -> {e.target} {', '.join(e.names)}".rstrip() for e in found)


def test_no_import_cycles(edges: list[Edge]) -> None:
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(
        "  " + " <-> ".join(c) + "\n" + describe([e for e in edges if e.source in c and e.target in c])
        for c in found)


def test_the_cycle_finder_finds_a_cycle_held_open_by_an_import_inside_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import other\n    return other\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    mods = read_modules(pkg)
    assert cycles(import_edges(mods, "pkg")) == [["pkg.a", "pkg.sub.b"]]


def test_layers_import_only_downward(edges: list[Edge]) -> None:
    wrong = [e for e in edges if layer(e.target) != layer(e.source) and layer(e.target) != ROOT
             and layer(e.target) not in MAY_IMPORT[layer(e.source)]]
    assert not wrong, "imports against the layering (see MAY_IMPORT):\n" + describe(wrong)


def test_packages_are_entered_through_their_faces(edges: list[Edge], modules: dict[str, Path]) -> None:
    """A module of another package is imported only where that package's __init__ lists it in __all__; names
    taken from a package's __init__ are ones it lists too."""
    faces: dict[str, set[str]] = {}
    for name, path in modules.items():
        if path.name == "__init__.py" and name != ROOT:
            faces[name] = set(importlib.import_module(name).__dict__.get("__all__", ()))
    wrong = []
    for e in edges:
        if e.target in faces and e.names:  # names from a face
            inside = e.source == e.target or e.source.startswith(e.target + ".")
            if not inside and not set(e.names) <= faces[e.target]:
                wrong.append(e)
            continue
        package = owner(e.target, modules)
        if package in faces and not (e.source == package or e.source.startswith(package + ".")):
            if e.target.rpartition(".")[2] not in faces[package]:
                wrong.append(e)
    assert not wrong, "imports past a package's face (add the module to its __all__, or keep it inside):\n" + \
        describe(wrong)


def test_no_private_names_across_packages(edges: list[Edge], modules: dict[str, Path]) -> None:
    wrong = [e for e in edges if any(n.startswith("_") and not n.endswith("__") for n in e.names)
             and owner(e.target, modules) != owner(e.source, modules)]
    assert not wrong, "private names taken from another package:\n" + describe(wrong)


def test_engine_modules_do_not_import_the_engine_face(edges: list[Edge]) -> None:
    """The face re-exports from generate/ and models/; a module under engine/ importing it would loop through it."""
    wrong = [e for e in edges if e.target == f"{ROOT}.engine" and e.source.startswith(f"{ROOT}.engine.")]
    assert not wrong, "engine modules importing qwenbook_bridge.engine (import the defining module):\n" + \
        describe(wrong)


def test_gpu_host_layers_never_import_pyzmq(modules: dict[str, Path]) -> None:
    wrong = []
    for name, path in modules.items():
        if layer(name) not in WITHOUT_ZMQ:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            named = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{name} line {node.lineno}" for n in named if n == "zmq" or n.startswith("zmq.")]
    assert not wrong, "pyzmq imported where GPU hosts run without it: " + ", ".join(wrong)


def test_no_name_in_a_face_hides_a_submodule(modules: dict[str, Path]) -> None:
    """`import pkg.sub.mod as m` walks attributes: a face that binds `sub` to something else (say a function of the
    same name) makes that import fail though `from pkg.sub import mod` works."""
    hidden = []
    for name, path in modules.items():
        if path.name != "__init__.py":
            continue
        package = importlib.import_module(name)
        for child in modules:
            if child.rpartition(".")[0] == name and not child.endswith(".__main__"):
                importlib.import_module(child)
                attribute = getattr(package, child.rpartition(".")[2])
                if getattr(attribute, "__name__", None) != child:
                    hidden.append(f"{name}.{child.rpartition('.')[2]} is {attribute!r}, not the module {child}")
    assert not hidden, "\n".join(hidden)

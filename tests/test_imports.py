"""No import circles in the `moejax` package, read statically from its source (nothing is imported).

What counts as an edge `a -> b` (module `a` imports module `b` of the package):

- `import moejax.b` and `from moejax import b` / `from . import b` where `b` is a submodule (the edge goes to
  the submodule, not to the package `__init__` that Python runs first: every package's submodules would
  otherwise form a circle with a non-empty `__init__`);
- `from moejax.b import name` where `name` is not a submodule: an edge to `moejax.b` (`moejax` itself when
  `b` is empty: `from moejax import Engine` runs the package's `__init__`);
- relative imports, resolved against the importing module's package;
- imports under `if __name__ == "__main__":` count: running the module as a script imports the other
  module, which imports this one again (a second copy, under its own name);
- imports inside functions and methods (lazy imports) count like the others. A lazy import is fine for
  keeping a heavy dependency (jax, torch) out of a command's start-up, but when it closes a circle the
  circle is still there: the two modules cannot be understood, tested or moved apart, and which one
  runs first decides what the other sees. Lazy and module-level edges are reported alike ("lazy" is
  noted in the chain so the line is easy to find);
- a string literal that is exactly the dotted name of a submodule (`"moejax.bench.decode"`): modules
  imported by name (`importlib.import_module`, `__import__`, a table of sub-commands) are imports too, only
  later. A module naming itself is no edge, nor is the bare `"moejax"` (the distribution's name, a metadata
  key: never imported by name).

Imports under `if TYPE_CHECKING:` would not run; the package has none, so none are treated specially.
Nothing is left out silently: an allowed circle must be listed in `ALLOWED` with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "moejax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# (importer, imported) -> why this edge may close a circle for now. Each entry is a circle still to break:
# `test_allowed_edges_exist_and_say_why` fails once the edge is gone, so the entry is removed with it.
ALLOWED: dict[tuple[str, str], str] = {}


def _modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package `__init__`), for every .py file under `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _owner(name: str, modules) -> str | None:
    """The module of the package that `name` (a module, or a module's attribute) lives in, or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _lines(nodes) -> set[int]:
    return {line for node in nodes for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)}


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`"""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(getattr(c, "value", None) == "__main__" for c in test.comparators))


def _imports(name: str, path: Path, is_package: bool, modules) -> list[tuple[str, int, str]]:
    """(imported module, line, how) for every import of a package module in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if is_package else name.rpartition(".")[0]
    lazy = _lines(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))
    main = _lines(n for n in tree.body if _is_main_block(n))
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value in modules:
            found.append((node.value, node.lineno, "by name"))
            continue
        else:
            continue
        how = "lazy" if node.lineno in lazy else "__main__ block" if node.lineno in main else "import"
        found += [(owner, node.lineno, how) for t in targets if (owner := _owner(t, modules))]
    return [(target, line, how) for target, line, how in found if target != name]


def import_graph(root: Path = ROOT) -> dict[str, dict[str, tuple[str, str]]]:
    """module -> {imported module: ("file:line" of its first import, how)} over the package's own modules."""
    modules = _modules(root)
    graph: dict[str, dict[str, tuple[str, str]]] = {}
    for name, (path, is_package) in modules.items():
        edges = graph.setdefault(name, {})
        rel = path.relative_to(root.parent).as_posix()
        for target, line, how in sorted(_imports(name, path, is_package, modules), key=lambda x: x[1]):
            edges.setdefault(target, (f"{rel}:{line}", how))
    return graph


def strongly_connected(graph) -> list[list[str]]:
    """Tarjan's components of more than one module (each one circle or several knotted together)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(graph, component: list[str]) -> list[str]:
    """The shortest circle through the component's first module, as [a, b, ..., a] (breadth-first)."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(parent[chain[-1]])
                    return [*reversed(chain), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")  # a strongly connected component always has one


def describe(graph, chain: list[str]) -> str:
    """'a -> b (a.py:12, lazy) -> c (b.py:3) -> a (c.py:40)': each step with the line that makes it."""
    steps = [chain[0]]
    for a, b in zip(chain, chain[1:], strict=False):
        where, how = graph[a][b]
        steps.append(f"{b} ({where}{'' if how == 'import' else ', ' + how})")
    return " -> ".join(steps)


def _without_allowed(graph):
    return {a: {b: v for b, v in edges.items() if (a, b) not in ALLOWED} for a, edges in graph.items()}


def test_the_package_has_no_import_circle():
    graph = import_graph()
    components = strongly_connected(_without_allowed(graph))
    chains = [describe(graph, shortest_cycle(graph, c)) + f"\n    (knot of {len(c)}: {', '.join(c)})"
              for c in components]
    assert not chains, "import circles in moejax (break each at one edge; see this test's docstring):\n  " + \
        "\n  ".join(chains)


def test_allowed_edges_exist_and_say_why():
    graph = import_graph()
    for (a, b), why in ALLOWED.items():
        assert b in graph.get(a, {}), f"ALLOWED lists {a} -> {b}, which no longer exists: remove it"
        assert why.strip(), f"ALLOWED {a} -> {b} needs a reason"


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The reader itself: absolute, relative, submodule, attribute, lazy and by-name imports, and a circle."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from moejax.a import A\n",
        "a.py": "import moejax.sub.c\nA = 1\n",
        "b.py": "from . import a\nfrom .sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..a import A\n\ndef f():\n    from moejax import b\n    return 'moejax.b'\n",
        "d.py": "from moejax import A\nNAME = 'moejax.d'\nif __name__ == '__main__':\n    import moejax.b\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert graph == {
        "moejax": {"moejax.a": ("moejax/__init__.py:1", "import")},
        "moejax.a": {"moejax.sub.c": ("moejax/a.py:1", "import")},
        "moejax.b": {"moejax.a": ("moejax/b.py:1", "import"), "moejax.sub.c": ("moejax/b.py:2", "import")},
        "moejax.sub": {},
        "moejax.sub.c": {"moejax.a": ("moejax/sub/c.py:1", "import"), "moejax.b": ("moejax/sub/c.py:4", "lazy")},
        "moejax.d": {"moejax": ("moejax/d.py:1", "import"), "moejax.b": ("moejax/d.py:4", "__main__ block")},
    }
    (component,) = strongly_connected(graph)
    assert component == ["moejax.a", "moejax.b", "moejax.sub.c"]
    assert describe(graph, shortest_cycle(graph, component)) == (
        "moejax.a -> moejax.sub.c (moejax/a.py:1) -> moejax.a (moejax/sub/c.py:1)")
    (pkg / "sub/c.py").write_text("def f():\n    return 'moejax.b'\n")  # by name only, from a function
    graph = import_graph(pkg)
    assert graph["moejax.sub.c"] == {"moejax.b": ("moejax/sub/c.py:2", "by name")}
    assert describe(graph, shortest_cycle(graph, ["moejax.a", "moejax.b", "moejax.sub.c"])) == (
        "moejax.a -> moejax.sub.c (moejax/a.py:1) -> moejax.b (moejax/sub/c.py:2, by name) -> moejax.a (moejax/b.py:1)")

"""The library's modules form layers: no two import each other (issue #24), so each reads on its own."""

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quantkit"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


LATE = ("_late", "import_module")  # calls whose first argument names a module they import


def _called(call: ast.Call) -> str | None:
    return getattr(call.func, "id", None) or getattr(call.func, "attr", None)


def _text(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def imports_of(source: str, package: str) -> set[str]:
    """The modules ``source`` (a module of ``package``) imports, deferred ones included, ``if TYPE_CHECKING:``
    blocks left out."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {base, *(f"{base}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Call) and _called(node) in LATE and node.args and _text(node.args[0]):
            found.add(node.args[0].value)  # graph._late("quantkit.plan", ...): an import all the same
    return found


def imports() -> dict[str, set[str]]:
    """Each quantkit module's quantkit imports."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = imports_of(path.read_text(encoding="utf-8"), package)
        out[name] = {m for m in found if m in modules and m != name}
    return out


def test_no_two_modules_import_each_other():
    graph = imports()
    # deferred imports count: graph imports evalsets inside a function, evalsets imports nodes at the top
    assert "quantkit.evalsets" in graph["quantkit.graph"] and "quantkit.nodes" in graph["quantkit.evalsets"]
    pairs = [(a, b) for a, b in itertools.combinations(sorted(graph), 2) if b in graph[a] and a in graph[b]]
    assert pairs == []


def test_an_import_by_name_counts():
    source = 'f = _late("quantkit.plan", "local_source")\ng = importlib.import_module("quantkit.budget")\n'
    assert imports_of(source, "quantkit") == {"quantkit.plan", "quantkit.budget"}


def test_the_library_never_imports_prefect():
    graph_text = {p: p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}
    assert not [p.name for p, text in graph_text.items() if "import prefect" in text or "from prefect" in text]

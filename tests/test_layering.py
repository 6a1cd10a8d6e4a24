"""The library's modules form layers: no two import each other (issue #24), so each reads on its own."""

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quantkit"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """Each module's quantkit imports, deferred ones included, ``if TYPE_CHECKING:`` blocks left out."""
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
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
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        out[name] = {m for m in found if m in modules and m != name}
    return out


def test_no_two_modules_import_each_other():
    graph = imports()
    # deferred imports count: graph imports evalsets inside a function, evalsets imports nodes at the top
    assert "quantkit.evalsets" in graph["quantkit.graph"] and "quantkit.nodes" in graph["quantkit.evalsets"]
    pairs = [(a, b) for a, b in itertools.combinations(sorted(graph), 2) if b in graph[a] and a in graph[b]]
    assert pairs == []


def test_the_library_never_imports_prefect():
    graph_text = {p: p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}
    assert not [p.name for p, text in graph_text.items() if "import prefect" in text or "from prefect" in text]

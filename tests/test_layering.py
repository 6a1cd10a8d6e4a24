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


# Where node kinds and formats are defined, the only modules that may branch on their names.
DEFINED = {"quantkit/graph.py", "quantkit/nodes.py", "quantkit/formats.py"}
# The same word meaning something else: a projector GGUF's general.type, llama.cpp's projector file names.
OTHER_MEANING = {("quantkit/mmproj.py", "mmproj"), ("quantkit/publish/hublayout.py", "mmproj")}
# Fitted time constants per kind (SEARCH), which StepKind.seconds reaches by name.
TABLES_ALLOWED = {"quantkit/estimate.py"}


def named_kinds(source: str, rel: str, names: set[str]) -> list[str]:
    """Where the module ``rel`` branches on a node kind's or a format's name: a comparison or a ``startswith``
    with one as a literal ("sensitivity:" too, a node name's prefix), a node name built by an f-string, a dict
    keyed by them or a tuple of them."""

    def named(node: ast.AST) -> str | None:
        if not _text(node):
            return None
        word = node.value.removesuffix(":")
        return word if word in names and (rel, word) not in OTHER_MEANING else None

    def elements(node: ast.AST) -> list:
        return node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]

    out = []
    for node in ast.walk(ast.parse(source)):
        found = []
        if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for o in node.ops):
            found += [named(e) for side in (node.left, *node.comparators) for e in elements(side)]
        elif isinstance(node, ast.Call) and _called(node) == "startswith" and node.args:
            found += [named(e) for e in elements(node.args[0])]
        elif isinstance(node, ast.JoinedStr) and node.values and _text(node.values[0]):
            found.append(named(node.values[0]) if node.values[0].value.endswith(":") else None)
        elif isinstance(node, (ast.Dict, ast.Tuple, ast.List, ast.Set)) and rel not in TABLES_ALLOWED:
            keys = [k and named(k) for k in (node.keys if isinstance(node, ast.Dict) else node.elts)]
            # a lookup table or a list of kinds; a record with one such field is not
            found += keys if len(keys) > 1 and all(keys) else []
        out += [f"{rel}:{node.lineno}: {w}" for w in found if w]
    return out


def test_only_the_graph_names_node_kinds_and_formats():
    from quantkit.formats import FORMATS
    from quantkit.graph import KINDS

    names = set(KINDS) | set(FORMATS)
    files = {p.relative_to(PACKAGE.parent).as_posix(): p for root in (PACKAGE, PACKAGE.parent / "flows")
             for p in sorted(root.rglob("*.py"))}
    assert DEFINED < set(files) and "flows/quantize.py" in files
    found = [hit for rel, p in files.items() if rel not in DEFINED
             for hit in named_kinds(p.read_text(encoding="utf-8"), rel, names)]
    assert found == [], "a kind's or a format's fact belongs on its StepKind or Format (quantkit.graph, formats)"


def test_the_kind_check_sees_each_form():
    names = {"convert", "gguf", "sensitivity", "mmproj"}
    code = """
if kind == "convert": pass
if fmt not in ("gguf", "x"): pass
if name.startswith("sensitivity:"): pass
n = f"convert:{label}"
t = {"gguf": 1, "convert": 2}
record = {"gguf": 1, "hf": 2}
KINDS_OF_A_KIND = ("convert", "sensitivity")
ok = f"{kind}:{label}" if kind != "other" else name.startswith("x")
projector = meta["general.type"] == "mmproj"
"""
    hits = sorted(h.split(": ", 1)[1] for h in named_kinds(code, "quantkit/m.py", names))
    assert hits == ["convert", "convert", "convert", "convert", "gguf", "gguf", "mmproj", "sensitivity", "sensitivity"]
    assert "mmproj" not in [h.split(": ", 1)[1] for h in named_kinds(code, "quantkit/mmproj.py", names)]

"""Hostile recipes: refused with file:line, nothing executed or created, and no exception type
other than RecipeError whatever bytes arrive.

Each hand-written case names the one field and line it must be refused at: the override is written
after the base recipe as it stands in the table, so the line is where the override puts it."""

from __future__ import annotations

import re
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from figures import COUNTERS
from quantkit.cli import main
from quantkit.errors import RecipeError
from quantkit.recipe import load_recipe

BASE = {
    "name": "tiny",
    "model": {"path": "models/tiny"},
    "calibration": {"files": ["calibration/calib.txt"]},
    "gguf": {"types": ["Q8_0"]},
}
RECIPE = "recipes/r.yaml"
# What `validate` prints for one problem: file:line, the field when one is named, the message, the fix.
PROBLEM_RE = re.compile(rf"{re.escape(RECIPE)}:[1-9][0-9]*:( [^:\n]+:)? .+ \(fix: .+\)", re.S)
TAG = "is not allowed: the file is data"

# (description, YAML override, field named, its line within the override, what the message says).
# The override replaces the base's top-level keys it sets. Each must be refused for that one problem.
HOSTILE = [
    ("shell in name", "name: 'x; rm -rf /'", "name", 1, "not a valid deployment name"),
    ("backticks in model name", "model: {path: models/tiny, name: '`id`'}", "model.name", 1, "safe path component"),
    ("dollar expansion", "model: {path: models/tiny, name: '$(reboot)'}", "model.name", 1, "safe path component"),
    ("newline in label", "gguf: {types: [{type: Q8_0, label: \"a\\nb\"}]}", "gguf.types[0].label", 1,
     "safe path component"),
    ("pipe in tensor pattern", "gguf:\n  types:\n  - type: Q8_0\n    tensor_types: {'attn|x': q8_0}",
     "gguf.types[0].tensor_types", 4, "tensor pattern 'attn|x'"),
    ("ampersand in repo", "model: {repo: 'a/b&c', revision: v1.0}", "model.repo", 1, "not a Hugging Face repo id"),
    ("path traversal", "model: {path: ../../etc}", "model.path", 1, "'..' is not allowed"),
    ("absolute path", "calibration:\n  files:\n  - /etc/passwd", "calibration.files[0]", 3,
     "absolute paths are not allowed"),
    ("home path", "model: {path: '~/.ssh'}", "model.path", 1, "'~'"),
    ("calibration outside calibration/", "calibration: {files: [recipes/x.txt]}", "calibration.files", 1,
     "not under calibration/"),
    ("branch revision", "model:\n  repo: a/b\n  revision: main", "model.revision", 3, "is a branch"),
    ("refs/heads revision", "model: {repo: a/b, revision: refs/heads/dev}", "model.revision", 1, "is a branch"),
    ("short sha", "model: {repo: a/b, revision: abcdef1}", "model.revision", 1, "short or partial sha"),
    ("repo without revision", "model: {repo: a/b}", "model", 1, "no pinned 'revision'"),
    ("trust_remote_code", "model:\n  path: models/tiny\n  trust_remote_code: true", "model.trust_remote_code", 3,
     "does not allow it"),
    ("allow_pickle", "model: {path: models/tiny, allow_pickle: true}", "model.allow_pickle", 1,
     "does not allow it"),
    ("huge chunks", "gguf:\n  types: [Q8_0]\n  imatrix:\n    chunks: 100000000000", "gguf.imatrix.chunks", 4,
     "less than or equal"),
    ("huge ctx", "gguf: {types: [Q8_0], imatrix: {ctx: 99999999}}", "gguf.imatrix.ctx", 1, "less than or equal"),
    ("huge samples", "gptq: [{samples: 10000000}]", "gptq[0].samples", 1, "less than or equal"),
    ("negative ctx", "gguf: {types: [Q8_0], imatrix: {ctx: -1}}", "gguf.imatrix.ctx", 1, "greater than or equal"),
    ("string as number", "gguf: {types: [Q8_0], imatrix: {chunks: lots}}", "gguf.imatrix.chunks", 1,
     "valid integer"),
    ("list as name", "name: [a, b]", "name", 1, "valid string"),
    ("unknown key", "colour: red", "colour", 1, "unknown key 'colour'"),
    ("unknown nested key", "gguf:\n  types: [Q8_0]\n  imatrixx: {}", "gguf.imatrixx", 3, "unknown key 'imatrixx'"),
    ("unknown type", "gguf: {types: [Q4_K_Z]}", "gguf.types[0].type", 1, "unknown llama-quantize type"),
    ("IQ1 without imatrix", "gguf: {types: [IQ1_S], imatrix: {enabled: false}}", "gguf", 1,
     "needs an importance matrix"),
    ("bits 3 group 7", "gptq:\n- bits: 3\n  group_size: 7", "gptq[0].group_size", 3, "group_size 7"),
    ("awq unsupported version", "awq: [{version: GEMV_FAST}]", "awq[0].version", 1, "'GEMM'"),
    # Tags are refused on the parser's events, before any value is built: the line is named, no field.
    ("python tag", "name: !!python/object/apply:os.system ['id']", "", 1, TAG),
    ("python tag on a nested value", "model:\n  path: models/tiny\n  name: !!python/object/apply:os.system ['id']",
     "", 3, TAG),
    ("function tag", "description: !function utils.process_docs", "", 1, TAG),
    ("empty types", "gguf: {types: []}", "gguf", 1, "makes no variant"),
    ("duplicate variant", "gguf:\n  types:\n  - Q8_0\n  - Q8_0", "gguf.types[1]", 4, "made twice"),
    # Values that become file names: one safe path component each (quantkit.paths).
    ("model name climbs out", "model: {path: models/tiny, name: ../../../../tmp/x}", "model.name", 1,
     "safe path component"),
    ("model name absolute", "model: {path: models/tiny, name: /etc/x}", "model.name", 1, "safe path component"),
    ("model name is ..", "model: {path: models/tiny, name: '..'}", "model.name", 1, "safe path component"),
    ("model name hidden", "model: {path: models/tiny, name: .x}", "model.name", 1, "safe path component"),
    ("model name like an option", "model: {path: models/tiny, name: --help}", "model.name", 1,
     "safe path component"),
    ("model folder name with a space", "model: {path: 'models/my model'}", "model", 1,
     "file names come from the model folder's name"),
    ("gguf label climbs out", "gguf: {types: [{type: Q8_0, label: ../../x}]}", "gguf.types[0].label", 1,
     "safe path component"),
    ("gguf label with slash", "gguf: {types: [{type: Q8_0, label: a/b}]}", "gguf.types[0].label", 1,
     "safe path component"),
    ("gptq label climbs out", "gptq: [{label: ../../x}]", "gptq[0].label", 1, "safe path component"),
    ("awq label hidden", "awq: [{label: .x}]", "awq[0].label", 1, "safe path component"),
    ("label too long", "gptq: [{label: " + "a" * 97 + "}]", "gptq[0].label", 1, "safe path component"),
    ("two gptq with one default label", "gptq:\n- bits: 4\n- bits: 4\n  seed: 1", "gptq[1]", 3,
     "'GPTQ-4bit-g128' is made twice"),
    ("two awq with one default label", "awq: [{seed: 1}, {seed: 2}]", "awq[1]", 1, "'AWQ-4bit-g128' is made twice"),
    ("gguf and gptq share a label", "gptq: [{label: Q8_0}]", "gptq[0]", 1, "'Q8_0' is made twice"),
    ("gguf label equals the base", "gguf: {types: [{type: Q8_0, label: F16}]}", "gguf.types[0]", 1,
     "'F16' is made twice"),
    # Text that reaches prefect.yaml: prefect deploy expands {{ }} (env vars, blocks) and Jinja {% %}.
    ("description asks for the token", 'description: "nightly {{ $HF_TOKEN }}"', "description", 1, "'{{' and '}}'"),
    ("description asks for a block", "description: |\n  nightly\n  {{ prefect.blocks.secret.hf }}", "description",
     1, "'{{' and '}}'"),
    ("description with a Jinja statement", "description: '{% include \"/etc/passwd\" %}'", "description", 1,
     "'{%'"),
    ("description closing a template", "description: 'a }} b'", "description", 1, "'}}'"),
    # datasets.load_dataset reads a local folder (and its script) when the name is one: a repo id only.
    ("dataset name climbs out", "calibration: {dataset: {name: ../../x, revision: v1.0}}", "calibration.dataset.name",
     1, "not a Hugging Face repo id"),
    ("dataset name absolute", "calibration:\n  dataset:\n    name: /abs\n    revision: v1.0",
     "calibration.dataset.name", 3, "not a Hugging Face repo id"),
    ("dataset name a project folder", "calibration: {dataset: {name: calibration/calib.txt, revision: v1.0}}",
     "calibration.dataset.name", 1, "also a path in the project"),
]

RAW_HOSTILE = [
    ("alias bomb", b"a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b]\n"),
    ("merge key", b"base: {x: 1}\nname: tiny\nother:\n  <<: {x: 1}\n"),
    ("duplicate key", b"name: tiny\nname: other\n"),
    ("non-UTF-8", b"name: tiny\ndescription: \xc3\x28\n"),
    ("two documents", b"name: a\n---\nname: b\n"),
    ("deep nesting", b"a: " + b"[" * 40 + b"]" * 40 + b"\n"),
    ("huge file", b"name: tiny\n" + b"# padding\n" * 40_000),
    ("nested 5000 deep", b"name: tiny\nx: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("nested maps 600 deep", b"name: tiny\n" + b"".join(b" " * i + b"k:\n" for i in range(600))),
    ("too many values", b"name: tiny\nx: [" + b"1," * 30_000 + b"1]\n"),
]


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "calib.txt").write_text("text\n")
    for var in ("QUANTKIT_PROJECT", "QUANTKIT_ALLOW_REMOTE_CODE", "QUANTKIT_ALLOW_PICKLE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _listing(root) -> list[str]:
    """Everything under ``root``, hidden files and links included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _merged(override: str) -> tuple[str, int]:
    """The base recipe without the top-level keys ``override`` sets, then ``override`` as written; and
    the line the override starts on. Composed, not loaded: a tag stays a tag and nothing is built."""
    keys = {key.value for key, _ in yaml.compose(override, Loader=yaml.SafeLoader).value}
    head = yaml.safe_dump({k: v for k, v in BASE.items() if k not in keys}, sort_keys=False)
    return head + override + "\n", head.count("\n") + 1


def _refusal(project, text: str) -> RecipeError | None:
    """Load ``text`` as recipes/r.yaml: a RecipeError whose every problem is printed as file:line: … (fix: …),
    on a line of the file, and nothing created. None when the text is a valid recipe."""
    path = project / RECIPE
    path.write_text(text, encoding="utf-8")
    before = _listing(project)
    try:
        load_recipe(path)
    except RecipeError as e:
        error = e
    else:
        return None
    assert _listing(project) == before, "a refused recipe must create nothing"
    assert error.problems
    for problem in error.problems:
        assert PROBLEM_RE.fullmatch(str(problem)), str(problem)
        assert problem.file == RECIPE and problem.line <= len(text.splitlines()) + 1, str(problem)
    return error


def test_hostile_table_is_well_formed():
    """The table's lines are derived from the override itself: a line past its end is a typo."""
    assert len({h[0] for h in HOSTILE}) == len(HOSTILE)
    for what, override, _, line, says in HOSTILE:
        assert 1 <= line <= override.count("\n") + 1 and says, what


@pytest.mark.parametrize("what,override,where,line,says", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_recipe_refused(project, what, override, where, line, says):
    text, start = _merged(override)
    error = _refusal(project, text)
    assert error is not None, f"{what}: accepted"
    named = [(p.where, p.line) for p in error.problems]
    assert named == [(where, start + line - 1)], f"{what}: {error}"
    assert says in error.problems[0].message, f"{what}: {error}"
    COUNTERS["hostile recipes refused"] += 1


def test_python_tag_is_refused_for_the_tag_not_a_duplicate_key(project):
    """The tag replaces the base's name, so the file has one 'name' and the tag itself is the problem."""
    text, _ = _merged("name: !!python/object/apply:os.system ['id']")
    assert text.count("name:") == 1
    error = _refusal(project, text)
    assert "duplicate" not in str(error) and "python/object/apply:os.system" in str(error)


@pytest.mark.parametrize("what,raw", RAW_HOSTILE, ids=[h[0] for h in RAW_HOSTILE])
def test_hostile_bytes_refused(project, what, raw):
    path = project / RECIPE
    path.write_bytes(raw)
    before = _listing(project)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert _listing(project) == before
    for problem in info.value.problems:
        assert PROBLEM_RE.fullmatch(str(problem)), str(problem)
    COUNTERS["hostile recipes refused"] += 1


# (id, the link, recipe lines added, field named, its line: 0 when the recipe leaves the field to its default,
# what the problem says)
OUT = "resolves outside the project"
LINKED_OUT = [
    ("runs/ by default", "runs", "", "output.dir", 0, OUT),
    ("runs/ given", "runs", "output: {dir: runs}", "output.dir", 1, OUT),
    ("a folder above the run folders", "out", "output: {dir: out/runs}", "output.dir", 1, OUT),
    ("artifacts/ by default", "artifacts", "", "publish.dir", 0, OUT),
    ("artifacts/ by default, publish given", "artifacts", "publish:\n  target: local", "publish.dir", 1, OUT),
    ("artifacts/ given", "artifacts", "publish: {dir: artifacts}", "publish.dir", 1, OUT),
    # the folder of this recipe in a real runs/ or artifacts/: only the writer refused it, after every step
    ("the run folder, runs/ by default", "runs/tiny", "", "output.dir", 0, "the run folder 'runs/tiny' is a symlink"),
    ("the run folder, output.dir given", "out/tiny", "output: {dir: out}", "output.dir", 1,
     "the run folder 'out/tiny' is a symlink"),
    ("the tracking run's folder", "runs/tiny.tracked", "", "output.dir", 0,
     "the tracking run's folder 'runs/tiny.tracked' is a symlink"),
    ("the release folder, artifacts/ by default", "artifacts/tiny", "", "publish.dir", 0,
     "the release folder 'artifacts/tiny' is a symlink"),
    ("the release folder, publish.dir given", "out/tiny", "publish:\n  dir: out", "publish.dir", 2,
     "the release folder 'out/tiny' is a symlink"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("what,link,extra,where,line,says", LINKED_OUT, ids=[c[0] for c in LINKED_OUT])
def test_write_folder_linked_out_of_the_project_is_refused(project, tmp_path_factory, monkeypatch, capsys,
                                                           command, what, link, extra, where, line, says):
    """A pull request commits runs/, artifacts/ or this recipe's folder in them as a symlink leading out:
    `validate` refuses it and so does `run` (defaults included), at the field's line (the recipe's first line
    for a default), before anything is written: no store, nothing in the project, nothing where the link leads."""
    outside = tmp_path_factory.mktemp("outside")
    (project / link).parent.mkdir(parents=True, exist_ok=True)
    (project / link).symlink_to(outside, target_is_directory=True)
    head = yaml.safe_dump(BASE, sort_keys=False)
    (project / RECIPE).write_text(head + (extra + "\n" if extra else ""))
    store = tmp_path_factory.mktemp("store") / "store"
    monkeypatch.setenv("QUANTKIT_STORE", str(store))
    monkeypatch.chdir(project)
    before = _listing(project)
    code = main([command, RECIPE])
    err = capsys.readouterr().err
    expected = f"{RECIPE}:{head.count(chr(10)) + line if line else 1}: {where}: {says}"
    assert code == 2 and "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if ln.startswith(RECIPE)][0].startswith(expected), err
    assert "(fix: " in err
    assert _listing(project) == before and not list(outside.iterdir()) and not store.exists()
    COUNTERS["hostile recipes refused"] += 1


yaml_text = st.text(alphabet=string.printable + "äあ\u2028", max_size=400)
yaml_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(
        ["name", "model", "path", "repo", "revision", "gguf", "types", "imatrix", "calibration", "files", "x"]),
        children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=yaml_text)
def test_loader_refuses_any_text_with_file_line(project, text):
    """Whatever text arrives: a valid recipe, or a RecipeError whose every problem carries file:line and a
    fix, and nothing created. Any other exception fails the test."""
    if _refusal(project, text) is not None:
        COUNTERS["generated recipes refused with file:line"] += 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=yaml_like)
def test_loader_refuses_any_structure_with_file_line(project, data):
    if _refusal(project, yaml.safe_dump(data)) is not None:
        COUNTERS["generated recipes refused with file:line"] += 1


def test_a_refused_value_cannot_print_a_second_problem_line(tmp_path):
    """A value holding a newline is printed escaped: one problem, one line, whatever the value holds."""
    from quantkit.errors import Problem

    spoof = "x\nrecipes/other.yaml:1: everything is fine"
    line = str(Problem("recipes/r.yaml", 3, "model.name", f"{spoof!s} is not a safe name", "rename it"))
    assert "\n" not in line and line.startswith("recipes/r.yaml:3: model.name: x\\nrecipes/other.yaml:1:")

"""Hostile recipes: refused with file:line, nothing executed or created, and no exception type
other than RecipeError whatever bytes arrive."""

from __future__ import annotations

import string
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from figures import COUNTERS
from quantkit.errors import RecipeError
from quantkit.recipe import load_recipe

BASE = {
    "name": "tiny",
    "model": {"path": "models/tiny"},
    "calibration": {"files": ["calibration/calib.txt"]},
    "gguf": {"types": ["Q8_0"]},
}

# (description, YAML text). Each must be refused.
HOSTILE = [
    ("shell in name", "name: 'x; rm -rf /'"),
    ("backticks in model name", "model: {path: models/tiny, name: '`id`'}"),
    ("dollar expansion", "model: {path: models/tiny, name: '$(reboot)'}"),
    ("newline in label", "gguf: {types: [{type: Q8_0, label: \"a\\nb\"}]}"),
    ("pipe in tensor pattern", "gguf: {types: [{type: Q8_0, tensor_types: {'attn|x': q8_0}}]}"),
    ("ampersand in repo", "model: {repo: 'a/b&c', revision: v1.0}"),
    ("path traversal", "model: {path: ../../etc}"),
    ("absolute path", "calibration: {files: [/etc/passwd]}"),
    ("home path", "model: {path: '~/.ssh'}"),
    ("calibration outside calibration/", "calibration: {files: [recipes/x.txt]}"),
    ("branch revision", "model: {repo: a/b, revision: main}"),
    ("refs/heads revision", "model: {repo: a/b, revision: refs/heads/dev}"),
    ("short sha", "model: {repo: a/b, revision: abcdef1}"),
    ("repo without revision", "model: {repo: a/b}"),
    ("trust_remote_code", "model: {path: models/tiny, trust_remote_code: true}"),
    ("huge chunks", "gguf: {types: [Q8_0], imatrix: {chunks: 100000000000}}"),
    ("huge ctx", "gguf: {types: [Q8_0], imatrix: {ctx: 99999999}}"),
    ("huge samples", "gptq: [{samples: 10000000}]"),
    ("negative ctx", "gguf: {types: [Q8_0], imatrix: {ctx: -1}}"),
    ("string as number", "gguf: {types: [Q8_0], imatrix: {chunks: lots}}"),
    ("list as name", "name: [a, b]"),
    ("unknown key", "colour: red"),
    ("unknown nested key", "gguf: {types: [Q8_0], imatrixx: {}}"),
    ("unknown type", "gguf: {types: [Q4_K_Z]}"),
    ("IQ1 without imatrix", "gguf: {types: [IQ1_S], imatrix: {enabled: false}}"),
    ("bits 3 group 7", "gptq: [{bits: 3, group_size: 7}]"),
    ("awq unsupported version", "awq: [{version: GEMV_FAST}]"),
    ("python tag", "name: !!python/object/apply:os.system ['id']"),
    ("empty types", "gguf: {types: []}"),
    ("duplicate variant", "gguf: {types: [Q8_0, Q8_0]}"),
    # Values that become file names: one safe path component each (quantkit.paths).
    ("model name climbs out", "model: {path: models/tiny, name: ../../../../tmp/x}"),
    ("model name absolute", "model: {path: models/tiny, name: /etc/x}"),
    ("model name is ..", "model: {path: models/tiny, name: '..'}"),
    ("model name hidden", "model: {path: models/tiny, name: .x}"),
    ("model name like an option", "model: {path: models/tiny, name: --help}"),
    ("model folder name with a space", "model: {path: 'models/my model'}"),
    ("gguf label climbs out", "gguf: {types: [{type: Q8_0, label: ../../x}]}"),
    ("gguf label with slash", "gguf: {types: [{type: Q8_0, label: a/b}]}"),
    ("gptq label climbs out", "gptq: [{label: ../../x}]"),
    ("awq label hidden", "awq: [{label: .x}]"),
    ("label too long", "gptq: [{label: " + "a" * 97 + "}]"),
    ("two gptq with one default label", "gptq: [{bits: 4}, {bits: 4, seed: 1}]"),
    ("two awq with one default label", "awq: [{seed: 1}, {seed: 2}]"),
    ("gguf and gptq share a label", "gptq: [{label: Q8_0}]"),
    ("gguf label equals the base", "gguf: {types: [{type: Q8_0, label: F16}]}"),
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
    monkeypatch.delenv("QUANTKIT_ALLOW_REMOTE_CODE", raising=False)
    return tmp_path


def _merged(override: str) -> str:
    data = dict(BASE)
    extra = yaml.safe_load(override) if "!!python" not in override else None
    if extra is None:
        return yaml.safe_dump(BASE) + override + "\n"
    data.update(extra)
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("what,override", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_recipe_refused(project, what, override):
    path = project / "recipes" / "r.yaml"
    path.write_text(_merged(override))
    before = sorted(project.rglob("*"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert sorted(project.rglob("*")) == before
    for problem in info.value.problems:
        assert problem.file == "recipes/r.yaml" and problem.line >= 1 and problem.fix
    COUNTERS["hostile recipes refused"] += 1


@pytest.mark.parametrize("what,raw", RAW_HOSTILE, ids=[h[0] for h in RAW_HOSTILE])
def test_hostile_bytes_refused(project, what, raw):
    path = project / "recipes" / "r.yaml"
    path.write_bytes(raw)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems[0].line >= 1
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
def test_loader_raises_only_recipe_error_on_any_text(project, text):
    path = project / "recipes" / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError:
        COUNTERS["generated recipes refused with RecipeError only"] += 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=yaml_like)
def test_loader_raises_only_recipe_error_on_any_structure(project, data):
    path = project / "recipes" / "r.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError:
        COUNTERS["generated recipes refused with RecipeError only"] += 1

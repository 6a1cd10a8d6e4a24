"""Recipe validation: the exact lines a user sees, exit code 2, nothing created."""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.errors import RecipeError
from quantkit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: tiny
model:
  path: models/tiny
calibration:
  files: [calibration/calib.txt]
evaluation:
  file: calibration/eval/heldout.txt
gguf:
  types: [Q8_0, Q4_K_M]
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A throwaway project: recipes/, calibration text, and a store path that must stay absent."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration" / "eval").mkdir(parents=True)
    (tmp_path / "calibration" / "calib.txt").write_text("Calibration paragraph. " * 10 + "\n")
    (tmp_path / "calibration" / "eval" / "heldout.txt").write_text("A different, held-out paragraph. " * 10 + "\n")
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("QUANTKIT_ALLOW_REMOTE_CODE", raising=False)
    return tmp_path


def write(project: Path, text: str, name: str = "r.yaml") -> Path:
    p = project / "recipes" / name
    p.write_text(textwrap.dedent(text))
    return p


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def validate(project: Path, path: Path, capsys) -> tuple[int, list[str]]:
    before = listing(project)
    code = main(["validate", str(path)])
    assert listing(project) == before, "validate must create nothing"
    return code, capsys.readouterr().err.splitlines()


def test_good_recipe_validates(project, capsys):
    code = main(["validate", str(write(project, GOOD))])
    assert code == 0
    assert capsys.readouterr().out.strip().endswith("ok (tiny)")


def test_shipped_recipes_validate():
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        load_recipe(recipe, root=REPO)


@pytest.mark.parametrize("old,new,expected", [
    ("  types: [Q8_0, Q4_K_M]", "  types: [Q8_0, Q4_K_X]",
     "recipes/r.yaml:9: gguf.types[1].type: unknown llama-quantize type 'Q4_K_X' (fix: did you mean Q4_K_S?)"),
    ("  types: [Q8_0, Q4_K_M]", "  types: [q8_0]",
     "recipes/r.yaml:9: gguf.types[0].type: unknown llama-quantize type 'q8_0' (names are case-sensitive) (fix: write Q8_0)"),
    ("  types: [Q8_0, Q4_K_M]", "  types: [IQ2_XXS]\n  imatrix: {enabled: false}",
     "recipes/r.yaml:8: gguf: types[0]: IQ2_XXS needs an importance matrix (llama-quantize refuses it without one) "
     "(fix: set gguf.imatrix.enabled: true and do not set imatrix: false on this type)"),
    ("  types: [Q8_0, Q4_K_M]", "  types: [Q8_0, {type: IQ1_S, imatrix: false}]",
     "recipes/r.yaml:8: gguf: types[1]: IQ1_S needs an importance matrix (llama-quantize refuses it without one) "
     "(fix: set gguf.imatrix.enabled: true and do not set imatrix: false on this type)"),
    ("  path: models/tiny", "  repo: meta-llama/Llama-3.1-8B-Instruct\n  revision: main",
     "recipes/r.yaml:4: model.revision: revision 'main' is a branch, which moves (fix: pin a commit sha (40 hex digits) or a tag)"),
    ("  path: models/tiny", "  repo: meta-llama/Llama-3.1-8B-Instruct\n  revision: 0e9e39f",
     "recipes/r.yaml:4: model.revision: revision '0e9e39f' is a short or partial sha (fix: write the full 40-digit commit sha)"),
    ("  path: models/tiny", "  path: ../outside",
     "recipes/r.yaml:3: model.path: '..' is not allowed: the path must stay inside the project (fix: move the file into the project)"),
    ("  files: [calibration/calib.txt]", "  files: [/etc/passwd]",
     "recipes/r.yaml:5: calibration.files[0]: absolute paths are not allowed (fix: write the path relative to the project root)"),
    # a folder written outside the project is fixed by another value, not by a link (that fix is test_hostile's)
    ("  types: [Q8_0, Q4_K_M]", "  types: [Q8_0]\noutput: {dir: /tmp/runs}",
     "recipes/r.yaml:10: output.dir: absolute paths are not allowed "
     "(fix: write a folder inside the project, relative to its root (e.g. runs))"),
    ("  types: [Q8_0, Q4_K_M]", "  types: [Q8_0]\npublish: {dir: ../artifacts}",
     "recipes/r.yaml:10: publish.dir: '..' is not allowed: the path must stay inside the project "
     "(fix: write a folder inside the project, relative to its root (e.g. runs))"),
    ("gguf:", "gguff:",
     "recipes/r.yaml:8: gguff: unknown key 'gguff' (fix: remove it, or check its spelling against `quantkit schema`)"),
    ("name: tiny", "name: Tiny Model",
     "recipes/r.yaml:1: name: name 'Tiny Model' is not a valid deployment name "
     "(fix: use lowercase letters, digits, '.', '_' and '-' only (at most 64), e.g. llama-8b)"),
    ("  path: models/tiny", "  path: models/tiny\n  name: x; rm -rf ~",
     "recipes/r.yaml:4: model.name: 'x; rm -rf ~' is not one safe path component (letters, digits, '.', '_' "
     "and '-' only, starting with a letter, digit or '_', at most 96 characters) (fix: use a name like "
     "Q4_K_M-attn8 or my-model (no '/', no leading '.', no spaces))"),
    ("  files: [calibration/calib.txt]", "  files: [calibration/eval/heldout.txt]",
     "recipes/r.yaml:1: evaluation.file 'calibration/eval/heldout.txt' is also calibration text "
     "(fix: score on held-out text: scores on text the quantizer saw are not evidence)"),
    # an RTN reference shares the labels' namespace, and alone publishes nothing
    ("  types: [Q8_0, Q4_K_M]", "  types: [Q8_0]\ngptq:\n  - {label: ref4}\nrtn:\n  - {label: ref4}",
     "recipes/r.yaml:13: rtn[0]: variant 'ref4' is made twice: by rtn[0] and by gptq[0] (line 11); both would "
     "write the same files (fix: give one of them a different 'label')"),
    ("gguf:\n  types: [Q8_0, Q4_K_M]", "rtn:\n  - {bits: 4, group_size: 128}",
     "recipes/r.yaml:1: the recipe produces nothing to publish: rtn variants are references only "
     "(fix: add a 'gguf', 'gptq' or 'awq' section)"),
    ("  types: [Q8_0, Q4_K_M]", "  types: [Q8_0]\nrtn:\n  - {group_size: 100}",
     "recipes/r.yaml:11: rtn[0].group_size: group_size 100 is not supported "
     "(fix: use -1 (per channel) or a power of two from 16 to 1024, e.g. 128)"),
    # act-order is desc_act's default: group-aware order needs it off
    ("  types: [Q8_0, Q4_K_M]", "  types: [Q8_0]\ngptq:\n  - bits: 4\n    group_aware: true",
     "recipes/r.yaml:12: gptq[0].group_aware: group_aware and desc_act are two ways of ordering columns; "
     "GPTQModel takes one (fix: set desc_act: false with group_aware: true (vLLM serves that), or drop group_aware)"),
])
def test_bad_recipe_exact_error(project, capsys, old, new, expected):
    assert old in GOOD
    code, lines = validate(project, write(project, GOOD.replace(old, new)), capsys)
    assert code == 2
    assert expected in lines


def test_every_problem_reported_at_once(project, capsys):
    text = GOOD.replace("name: tiny", "name: BAD").replace("[Q8_0, Q4_K_M]", "[Q9_9]").replace("gguf:", "extra: 1\ngguf:")
    code, lines = validate(project, write(project, text), capsys)
    assert code == 2
    assert [line.split(":")[1] for line in lines] == ["1", "8", "10"]


def test_symlink_out_of_project_refused(project, capsys, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("x")
    (project / "calibration" / "link.txt").symlink_to(outside / "secret.txt")
    code, lines = validate(project, write(project, GOOD.replace("calib.txt", "link.txt")), capsys)
    assert code == 2
    assert any("calibration.files[0]: resolves outside the project" in line for line in lines)


def test_trust_remote_code_needs_worker_permission(project, capsys, monkeypatch):
    text = GOOD.replace("  path: models/tiny", "  path: models/tiny\n  trust_remote_code: true")
    code, lines = validate(project, write(project, text), capsys)
    assert code == 2 and "model.trust_remote_code" in lines[0]
    monkeypatch.setenv("QUANTKIT_ALLOW_REMOTE_CODE", "1")
    assert load_recipe(write(project, text)).model.trust_remote_code is True


@pytest.mark.parametrize("raw,expected", [
    (b"name: a\nname: b\n", "recipes/r.yaml:2: name: duplicate key 'name' (first set on line 1)"),
    (b"a: &x [1]\nb: *x\n", "recipes/r.yaml:1: YAML anchors and aliases are not allowed in recipes"),
    (b"name: tiny\n\xff\xfe\n", "recipes/r.yaml:2: not UTF-8 (byte 0xff at offset 11)"),
    (b"name: [unclosed\n", "recipes/r.yaml:2: YAML syntax error"),
    (b"- just\n- a list\n", "recipes/r.yaml:1: a recipe is a mapping of keys to values"),
])
def test_hostile_yaml_refused(project, capsys, raw, expected):
    p = project / "recipes" / "r.yaml"
    p.write_bytes(raw)
    code, lines = validate(project, p, capsys)
    assert code == 2
    assert lines[0].startswith(expected), lines


def test_recipe_error_pickles():
    # Prefect moves exceptions between processes.
    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "pyproject.toml")
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value)


def test_schema_is_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"name", "model", "calibration", "gguf"} <= set(schema["properties"])


def test_resolved_recipe_round_trips(project):
    recipe = load_recipe(write(project, GOOD))
    again = type(recipe).model_validate(recipe.model_dump(mode="json"), context={"root": project})
    assert again == recipe
    assert [recipe.gguf.label(v) for v in recipe.gguf.types] == ["Q8_0", "Q4_K_M"]
    assert recipe.gguf.imatrix.enabled and recipe.gguf.base_type == "f16"

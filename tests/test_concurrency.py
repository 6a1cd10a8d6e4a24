"""Two runs of the same recipe at once: neither clobbers the other, the second says what it waits
for and builds nothing twice, and both publish complete runs of identical GGUFs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_pipeline import make_project, tiny_recipe

pytestmark = pytest.mark.slow

RECIPE = tiny_recipe("tiny-twice", """\
gguf:
  imatrix: {enabled: true, ctx: 128, chunks: 8}
  types: [Q8_0, Q4_K_M, Q2_K]
""")


def test_two_runs_at_once(tmp_path, repo_root, tiny_llama):
    make_project(tmp_path, repo_root, tiny_llama).unlink()
    (tmp_path / "recipes" / "r.yaml").write_text(RECIPE)
    env = {**os.environ, "QUANTKIT_STORE": str(tmp_path / "store"), "HF_HUB_OFFLINE": "1", "QUANTKIT_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "quantkit.cli", "run", "recipes/r.yaml"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    logs = [out + err for out, err in results]
    # Every step was built by exactly one of them; the other waited for it and reused it.
    built = [set(line.split(": ", 1)[1].split(", ")) for log in logs for line in log.splitlines()
             if line.startswith("built: ")]
    assert len(built) <= 2 and not (len(built) == 2 and built[0] & built[1]), built
    assert any("waiting for another quantkit process" in log for log in logs)

    published = tmp_path / "artifacts" / "tiny-twice"
    runs = sorted(p for p in published.iterdir() if p.is_dir() and p.name != "latest" and not p.name.startswith("."))
    # The second run waits for the first to publish, then finds the same files and scores: it publishes no
    # copy and records "unchanged since <the first run>" (quantkit.publish.release).
    assert len(runs) == 1 and not list(published.glob(".tmp-*"))  # one complete run, nothing half-written
    assert [json.loads(line)["unchanged_since"] for line in (published / "unchanged.jsonl").read_text().splitlines()] \
        == [runs[0].name]
    assert len(list(runs[0].glob("*.gguf"))) == 4
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert {v["label"] for v in manifest["variants"]} == {"F16", "Q8_0", "Q4_K_M", "Q2_K"}
    assert os.readlink(published / "latest") == runs[0].name

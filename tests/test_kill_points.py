"""SIGKILL at each step of a real run, then a re-run: nothing partial is taken as finished,
nothing is half-published, and the final artifacts equal an uninterrupted run's.

A kill point is reached when the step's temp folder appears (the store builds every output in
`<store>/scratch/<run>/<step>/.tmp-*`, publishing in `artifacts/<recipe>/.tmp-*`); the whole process group,
llama.cpp tools included, is killed there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from figures import COUNTERS
from test_pipeline import make_project, tiny_recipe

pytestmark = pytest.mark.slow

RECIPE = tiny_recipe("tiny-kill", calibration=("en-prose", "code-python"), body="""\
evaluation:
  file: calibration/eval/en-prose-heldout.txt
  ctx: 128
  max_tokens: 1024
  bench_reps: 1
  bench_prompt_tokens: 32
  bench_gen_tokens: 8
gguf:
  imatrix: {enabled: true, ctx: 128, chunks: 8}
  types: [Q8_0, Q4_K_M]
gptq:
  - {bits: 4, group_size: 128, samples: 8, seq_len: 64}
awq:
  - {w_bit: 4, q_group_size: 128, samples: 8, seq_len: 64}
""")

VARIANT_KINDS = {"convert", "quantize", "gptq", "awq"}  # each of these is killed at every node, not only the first


def kill_points() -> list[tuple[str, str, str, int]]:
    """(kill point, where, folder whose temp child marks it, finished siblings before it), from the graph:
    every node that builds in the store (the first of each kind, every node that makes a variant), then
    publishing. A new step kind is covered here without editing this list."""
    import yaml

    from quantkit.graph import build_graph
    from quantkit.recipe import Recipe

    nodes = build_graph(Recipe.model_validate(yaml.safe_load(RECIPE)))
    points, before = [], {}  # store step -> nodes of it earlier in the graph
    for node in nodes:
        step = node.spec.store_step
        if step is None:
            continue
        if node.kind in VARIANT_KINDS or step not in before:
            points.append((node.name.replace(":", "-"), "store", step, before.get(step, 0)))
        before[step] = before.get(step, 0) + 1
    return points + [("publish", "project", "artifacts/tiny-kill", 0)]


KILL_POINTS = kill_points()
QUANTKIT = [sys.executable, "-m", "quantkit.cli"]


def start(project: Path, store: Path) -> subprocess.Popen:
    env = {**os.environ, "QUANTKIT_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*QUANTKIT, "run", str(project / "recipes" / "r.yaml")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def finish(project: Path, store: Path) -> dict:
    proc = start(project, store)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]
    latest = project / "artifacts" / "tiny-kill" / "latest"
    return {p.relative_to(latest).as_posix(): p.read_bytes() for p in sorted(latest.rglob("*"))
            if p.is_file() and p.suffix in {".gguf", ".safetensors", ".json"} and p.name not in {"report.json",
                                                                                             "manifest.json"}}


def kill_at(project: Path, store: Path, where: str, folder: str, done_before: int) -> str | None:
    """Run until a temp folder appears under ``folder`` next to ``done_before`` finished ones; SIGKILL
    the group there.

    Returns None when killed there, else the run's stderr tail (it never reached the point)."""
    watch = (store if where == "store" else project) / folder
    proc = start(project, store)
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        names = [p.name for p in watch.iterdir()] if watch.is_dir() else []
        writing = [n for n in names if n.startswith(".tmp-")]
        if where == "store":  # the store stages in the run's own scratch folder
            writing = [p.name for p in store.glob(f"scratch/*/{folder}/.tmp-*")]
        finished = [n for n in names if not n.startswith(".") and n != "latest"]  # not locks or pointers
        if writing and len(finished) == done_before:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        time.sleep(0.005)
    _, err = proc.communicate()
    return err.decode(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, repo_root, tiny_llama):
    root = tmp_path_factory.mktemp("reference")
    make_project(root, repo_root, tiny_llama)
    (root / "recipes" / "r.yaml").write_text(RECIPE)
    store = tmp_path_factory.mktemp("ref-store")
    return root, store, finish(root, store)


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run[2]


def test_report_holds_the_stored_scores(reference_run):
    """End to end: every number the published report shows for a variant is the one its score node stored."""
    root, store, _ = reference_run
    latest = root / "artifacts" / "tiny-kill" / "latest"
    report, manifest = (json.loads((latest / n).read_text()) for n in ("report.json", "manifest.json"))
    stored = {}
    for step in ("score-gguf", "score-hf"):
        for entry in (store / step).glob("*/entry.json"):
            record = json.loads(entry.read_text())
            stored[record["key"]] = record["info"]["score"]
    rows = {r["id"]: r for r in report["variants"]}
    assert set(rows) == {f"{v['format']}:{v['label']}" for v in manifest["variants"]}
    score_keys = {s["step"]: s["key"] for s in manifest["steps"] if s["step"].startswith("score-")}
    for v in manifest["variants"]:
        kind = "gguf" if v["format"] == "gguf" else "hf"
        score = stored[score_keys[f"score-{kind}:{v['label']}"]]
        row = rows[f"{v['format']}:{v['label']}"]
        assert row["ppl"] == pytest.approx(score["ppl"], rel=1e-12), v["label"]
        if score["kld_mean"] is not None:
            assert row["kld_mean"] == pytest.approx(score["kld_mean"], rel=1e-12), v["label"]


@pytest.mark.parametrize("point,where,folder,done_before", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_sigkill_then_rerun_gives_identical_artifacts(point, where, folder, done_before, reference, tmp_path, repo_root,
                                                      tiny_llama):
    make_project(tmp_path / "p", repo_root, tiny_llama)
    project, store = tmp_path / "p", tmp_path / "store"
    (project / "recipes" / "r.yaml").write_text(RECIPE)
    missed = kill_at(project, store, where, folder, done_before)
    if missed is not None and point == "publish" and "published tiny-kill/" in missed:
        # Publishing the tiny run takes about as long as one poll: the kill may not land in its window.
        pytest.skip("publish finished between two polls; the kill could not land inside it")
    assert missed is None, f"the run never reached {point}:\n{missed}"
    # Killed at (or, racing the kill, just after) the step: whatever looks finished is complete.
    published = project / "artifacts" / "tiny-kill"
    if published.is_dir():
        for run in [p for p in published.iterdir() if not p.name.startswith(".")]:
            assert (run / "report.json").is_file() and (run / "manifest.json").is_file(), run
    if where == "store":
        for entry_file in (store / folder).glob("*/entry.json"):
            entry = json.loads(entry_file.read_text())
            for rel, rec in entry["files"].items():
                assert (entry_file.parent / rel).stat().st_size == rec["size"]

    artifacts = finish(project, store)
    assert artifacts == reference, "artifacts after the kill differ from an uninterrupted run"
    assert not [p for p in store.rglob(".tmp-*")], "temp folders left after the re-run"
    published = [p.name for p in (project / "artifacts" / "tiny-kill").iterdir()]
    assert [n for n in published if ".tmp-" in n] == [], "an unfinished publish was left behind"
    COUNTERS["kill points survived"] += 1

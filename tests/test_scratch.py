"""Scratch space and `quantkit store gc`: every temporary folder lives in the store under a run's
owner lock, goes when its step ends however it ends, and a dead run's is swept by the next one."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.cleanup import collect
from quantkit.cli import main
from quantkit.store import SCRATCH, Store, _release_owners

INPUTS = {"model": "abc", "type": "Q4_K_M"}


def _write(staging, data=b"hello"):
    (staging.path / "out.bin").write_bytes(data)


def _owners(root: Path) -> list[Path]:
    return sorted(p for p in (root / SCRATCH).iterdir() if p.is_dir()) if (root / SCRATCH).is_dir() else []


def test_scratch_is_inside_the_store_and_goes_when_the_block_raises(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError, match="step failed"), store.scratch("gptq-offload") as folder:
        assert folder.parent.parent == tmp_path / SCRATCH and folder.name.startswith("gptq-offload-")
        (folder / "layer.0.safetensors").write_bytes(b"x" * 1000)
        raise RuntimeError("step failed")
    assert not folder.exists()
    with pytest.raises(ValueError, match="purpose"), store.scratch("../escape"):
        pass


def test_staging_is_in_the_owners_scratch(tmp_path):
    store = Store(tmp_path)
    seen = []
    entry = store.ensure("step", INPUTS, lambda s: (seen.append(s.path), _write(s)))
    assert seen[0].parent.parent.parent == tmp_path / SCRATCH and seen[0].parent.name == "step"
    assert seen[0].name.startswith(".tmp-") and not seen[0].exists()
    assert entry.path == tmp_path / "step" / entry.key and entry.file("out.bin").read_bytes() == b"hello"


def _killed_holding_scratch(root: str, ready) -> None:
    store = Store(Path(root))

    def slow(staging):
        (staging.path / "out.bin").write_bytes(b"partial")
        with store.scratch("gptq-offload") as folder:
            (folder / "layer.bin").write_bytes(b"y" * 4096)
            ready.set()
            signal.pause()  # killed here

    store.ensure("step", INPUTS, slow)


def _start_and_wait(root: Path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_killed_holding_scratch, args=(str(root), ready))
    proc.start()
    assert ready.wait(30)
    return proc


def test_a_live_runs_scratch_is_kept_and_a_dead_ones_swept_by_the_next_run(tmp_path):
    proc = _start_and_wait(tmp_path)
    try:
        (victim,) = _owners(tmp_path)
        assert list(victim.glob("step/.tmp-*")) and list(victim.glob("gptq-offload-*"))
        assert Store(tmp_path).leftovers() == [], "a live run's scratch must not count as a leftover"
        assert collect(Store(tmp_path), project=tmp_path).items == ()
        assert victim.is_dir()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    (dead,) = Store(tmp_path).leftovers()
    assert dead.path == victim and dead.what == "scratch" and dead.size >= 4096 + 7
    assert json.loads(dead.note)["pid"] == proc.pid
    # The next run (any recipe, any key) sweeps it when it first uses the store.
    Store(tmp_path).ensure("other-step", {"x": 1}, _write)
    assert not victim.exists() and not (tmp_path / SCRATCH / f"{victim.name}.lock").exists()
    assert Store(tmp_path).get("step", INPUTS) is None
    assert not list(tmp_path.rglob(".tmp-*"))


def test_forked_child_does_not_keep_the_parents_owner_alive(tmp_path):
    store = Store(tmp_path)
    with store.scratch("x"):
        (parent,) = _owners(tmp_path)
    proc = _start_and_wait(tmp_path)  # a fork of this process, which owns `parent`
    try:
        mine = [o for o in _owners(tmp_path) if o != parent]
        assert len(mine) == 1, "the child must make its own owner, not reuse its parent's"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert parent.is_dir(), "the killed child must not take its parent's scratch with it"
    assert [d.path for d in Store(tmp_path).leftovers()] == mine
    assert [d.path for d in Store(tmp_path).sweep()] == mine and parent.is_dir()


def test_legacy_staging_in_a_step_folder_is_dead_when_its_key_is_unlocked(tmp_path):
    store = Store(tmp_path)
    stale = tmp_path / "gptq" / f".tmp-{'a' * 32}-1234abcd"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"z" * 100)
    assert [(d.what, d.path, d.size) for d in store.leftovers()] == [("staging", stale, 100)]
    store.sweep()
    assert not stale.exists()


def _project_with_run(project: Path, keys: list[str], sha: str) -> None:
    run = project / "runs" / "r"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"steps": [{"step": "x", "key": k} for k in keys],
                                                   "variants": [{"files": {"model.gguf": {"sha256": sha}}}]}))


def _build_entries(root: str) -> None:
    store = Store(Path(root))
    store.ensure("quantize", {"t": "Q4_K_M"}, _write)
    store.ensure("quantize", {"t": "Q2_K"}, lambda s: (s.path / "model.gguf").write_bytes(b"q" * 2**20))
    store.ensure("tasks-gguf", {"variant": hashlib.sha256(b"hello").hexdigest(), "task": "arc"}, _write)
    store.ensure("tasks-gguf", {"variant": "f" * 64, "task": "arc"}, _write)
    store.ensure("gptq", {"bits": 4}, _write)


def test_gc_removes_what_no_run_references_and_says_how_much(tmp_path):
    store, project = Store(tmp_path / "store"), tmp_path / "project"
    builder = multiprocessing.get_context("fork").Process(target=_build_entries, args=(str(store.root),))
    builder.start()
    builder.join()
    assert builder.exitcode == 0
    kept, orphan, measured, stale_measure, published = (
        store.get(step, inputs) for step, inputs in [
            ("quantize", {"t": "Q4_K_M"}), ("quantize", {"t": "Q2_K"}),
            ("tasks-gguf", {"variant": hashlib.sha256(b"hello").hexdigest(), "task": "arc"}),
            ("tasks-gguf", {"variant": "f" * 64, "task": "arc"}), ("gptq", {"bits": 4})])
    _project_with_run(project, [kept.key], kept.files["out.bin"].sha256)
    pub = project / "artifacts" / "r" / "20250101T000000Z-abcd1234"
    pub.mkdir(parents=True)
    (pub / "manifest.json").write_text(json.dumps({"steps": [{"key": published.key}]}))
    (builder_scratch,) = _owners(store.root)  # it ended without cleaning up (fork children skip atexit)

    listed = _gc_cli(store.root, project, "--entries", "--dry-run").splitlines()
    assert listed[0].startswith(f"would remove scratch       0.0 MiB  {builder_scratch}  ")
    assert listed[1:] == [
        f"would remove entry         1.0 MiB  {orphan.path}  (quantize)",
        f"would remove entry         0.0 MiB  {stale_measure.path}  (tasks-gguf)",
        f"would free 1.0 MiB in {store.root} (3 items)"]
    assert orphan.path.is_dir() and stale_measure.path.is_dir() and builder_scratch.is_dir()

    # The next run sweeps the dead builder's scratch; it owns what it uses, so gc keeps `orphan`.
    Store(store.root).ensure("quantize", {"t": "Q2_K"}, _write)
    assert not builder_scratch.exists()
    assert [i.path for i in collect(store, project=project, entries=True, dry_run=True).items] == [
        stale_measure.path]
    _release_owners()  # as when this process ends
    done = _gc_cli(store.root, project, "--entries").splitlines()
    assert done == [
        f"removed entry         1.0 MiB  {orphan.path}  (quantize)",
        f"removed entry         0.0 MiB  {stale_measure.path}  (tasks-gguf)",
        f"freed 1.0 MiB in {store.root} (2 items)"]
    assert not orphan.path.exists() and not stale_measure.path.exists()
    assert kept.path.is_dir() and measured.path.is_dir() and published.path.is_dir()
    assert not list(store.root.rglob(".tmp-*")) and _owners(store.root) == []


def _gc_cli(store: Path, project: Path, *flags: str) -> str:
    run = subprocess.run([sys.executable, "-m", "quantkit.cli", "-q", "store", "gc", "--store", str(store),
                          "--project", str(project), *flags], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_gc_entries_refuses_without_any_manifest(tmp_path, capsys):
    Store(tmp_path / "store").ensure("quantize", {"t": "Q8_0"}, _write)
    assert main(["store", "gc", "--entries", "--store", str(tmp_path / "store"), "--project", str(tmp_path)]) == 1
    assert "no run manifests under" in capsys.readouterr().err
    assert main(["store", "gc", "--store", str(tmp_path / "store"), "--project", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"freed 0.0 MiB in {tmp_path / 'store'} (0 items)\n"

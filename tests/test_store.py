"""The content-addressed store: complete or absent, never half; one builder per key."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from quantkit.digest import sha256_file
from quantkit.store import Store

INPUTS = {"model": "abc", "type": "Q4_K_M"}


def _write(staging, data=b"hello"):
    (staging.path / "out.bin").write_bytes(data)
    staging.info["tool"] = "test"


def test_entry_records_digest_and_is_reused(tmp_path):
    store = Store(tmp_path)
    first = store.ensure("step", INPUTS, _write)
    assert not first.reused
    assert first.files["out.bin"].sha256 == sha256_file(first.file("out.bin"))
    calls = []
    again = store.ensure("step", INPUTS, lambda s: calls.append(s))
    assert again.reused and calls == [] and again.path == first.path
    other = store.ensure("step", {**INPUTS, "type": "Q8_0"}, _write)
    assert other.key != first.key


def test_failure_leaves_nothing_that_looks_finished(tmp_path):
    store = Store(tmp_path)

    def boom(staging):
        (staging.path / "out.bin").write_bytes(b"half")
        raise RuntimeError("tool died")

    with pytest.raises(RuntimeError, match="tool died"):
        store.ensure("step", INPUTS, boom)
    assert store.get("step", INPUTS) is None
    assert [p.name for p in (tmp_path / "step").iterdir() if not p.name.endswith(".lock")] == []


def _killed_midway(root: str) -> None:
    store = Store(Path(root))

    def slow(staging):
        (staging.path / "out.bin").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)

    store.ensure("step", INPUTS, slow)


def test_sigkill_midway_then_rerun_completes(tmp_path):
    proc = multiprocessing.get_context("fork").Process(target=_killed_midway, args=(str(tmp_path),))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    store = Store(tmp_path)
    assert store.get("step", INPUTS) is None, "a killed build must not look finished"
    leftovers = list(tmp_path.glob("scratch/*/step/.tmp-*"))  # staging lives in the run's scratch folder
    assert leftovers, "the kill should have left a temp folder behind"
    entry = store.ensure("step", INPUTS, _write)
    assert entry.file("out.bin").read_bytes() == b"hello"
    assert list(tmp_path.rglob(".tmp-*")) == []


def _slow_builder(root: str, started) -> None:
    def slow(staging):
        started.set()
        time.sleep(1.5)
        _write(staging, b"from first")

    Store(Path(root)).ensure("step", INPUTS, slow)


def test_second_process_waits_and_reuses(tmp_path, caplog):
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    proc = ctx.Process(target=_slow_builder, args=(str(tmp_path), started))
    proc.start()
    assert started.wait(30)
    calls = []
    with caplog.at_level("INFO", logger="quantkit.store"):
        entry = Store(tmp_path).ensure("step", INPUTS, lambda s: calls.append(s))
    proc.join()
    assert calls == [], "the second process must not build what the first is building"
    assert entry.file("out.bin").read_bytes() == b"from first"
    assert any("waiting for another quantkit process" in r.message for r in caplog.records)

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


# --- a damaged entry is never served (#23) ------------------------------------------------------------

def test_data_files_are_on_disk_before_the_entry_is_renamed_into_place(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dest):
        events.append(("rename", str(dest)))
        real_replace(src, dest)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def nested(staging):
        _write(staging)
        (staging.path / "sub").mkdir()
        (staging.path / "sub" / "shard.bin").write_bytes(b"shard")

    entry = Store(tmp_path).ensure("step", INPUTS, nested)
    rename = events.index(("rename", str(entry.path)))
    synced = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {"out.bin", "shard.bin", "sub"} <= synced
    assert any(name.startswith(f".tmp-{entry.key}-") for name in synced)  # the staging folder's names
    assert ("fsync", str(tmp_path / "step")) in events[rename:]  # the new name itself


def test_a_truncated_entry_is_moved_aside_and_rebuilt_byte_identical(tmp_path, caplog):
    store = Store(tmp_path)
    first = store.ensure("step", INPUTS, lambda s: _write(s, b"x" * 1000))
    good = first.files["out.bin"].sha256
    with open(first.file("out.bin"), "r+b") as f:  # what a power loss leaves of an unsynced file
        f.truncate(300)
    with caplog.at_level("WARNING", logger="quantkit.store"):
        assert store.get("step", INPUTS) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(first.path) in warning and "out.bin is 300 bytes, its record says 1000" in warning
    assert not first.path.exists() and list((tmp_path / "step").glob(".tmp-*")) == []  # aside, then deleted
    calls = []
    again = store.ensure("step", INPUTS, lambda s: (calls.append(1), _write(s, b"x" * 1000)))
    assert calls == [1] and not again.reused
    assert sha256_file(again.file("out.bin")) == good == again.files["out.bin"].sha256


def test_ensure_rebuilds_a_truncated_entry_and_a_missing_file(tmp_path):
    store = Store(tmp_path)
    first = store.ensure("step", INPUTS, _write)
    first.file("out.bin").unlink()
    again = store.ensure("step", INPUTS, _write)
    assert not again.reused and again.file("out.bin").read_bytes() == b"hello"


def test_a_damaged_entry_found_while_waiting_for_the_lock_is_rebuilt(tmp_path):
    # Another process finished the entry while this one waited; it was damaged since: build, not reuse.
    store = Store(tmp_path)
    first = store.ensure("step", INPUTS, _write)
    first.file("out.bin").write_bytes(b"hell")
    with store.build("step", INPUTS) as staging:
        _write(staging)
    assert store.get("step", INPUTS).file("out.bin").read_bytes() == b"hello"


def test_same_size_other_bytes_is_caught_by_verify_before_use(tmp_path, caplog):
    from quantkit.errors import StoreError

    store = Store(tmp_path)
    first = store.ensure("step", INPUTS, _write)
    first.file("out.bin").write_bytes(b"jello")  # the size check on reuse cannot see this
    reused = store.get("step", INPUTS)
    assert reused is not None and store.check(reused) is None
    assert "out.bin has sha256" in store.check(reused, digests=True)
    with caplog.at_level("WARNING", logger="quantkit.store"), pytest.raises(StoreError, match="run again to rebuild"):
        store.verify(reused, ["out.bin"])
    assert any(str(first.path) in r.getMessage() for r in caplog.records)
    assert store.get("step", INPUTS) is None
    assert store.ensure("step", INPUTS, _write).file("out.bin").read_bytes() == b"hello"

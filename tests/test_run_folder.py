"""Placing store files into the run folder: idempotent, nothing left behind, never a damaged file (#22, #23)."""

from __future__ import annotations

import os

import pytest

from quantkit.errors import StoreError
from quantkit.manifest import damaged_files, differing_files
from quantkit.runfolder import _place
from quantkit.store import Store

INPUTS = {"model": "abc", "type": "Q4_K_M"}


def _entry(tmp_path, data=b"gguf bytes"):
    store = Store(tmp_path / "store")
    return store, store.ensure("quantize", INPUTS, lambda s: (s.path / "model.gguf").write_bytes(data))


def _listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_ino) for p in folder.rglob("*"))


def test_placing_twice_leaves_what_placing_once_leaves(tmp_path):
    store, entry = _entry(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    _place(store, entry, "model.gguf", run / "m-Q4_K_M.gguf")
    once = _listing(run)
    assert once == [("m-Q4_K_M.gguf", entry.file("model.gguf").stat().st_ino)]  # a hard link, no copy
    _place(store, entry, "model.gguf", run / "m-Q4_K_M.gguf")  # link + rename over itself left .tmp here
    assert _listing(run) == once


def test_a_tmp_name_an_earlier_version_left_is_removed(tmp_path):
    store, entry = _entry(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    _place(store, entry, "model.gguf", run / "m.gguf")
    os.link(run / "m.gguf", run / ".m.gguf.tmp")
    _place(store, entry, "model.gguf", run / "m.gguf")
    assert [p.name for p in run.iterdir()] == ["m.gguf"]


def test_another_file_or_a_symlink_at_the_destination_is_replaced(tmp_path):
    store, entry = _entry(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "a.gguf").write_bytes(b"old run")
    (tmp_path / "outside").write_bytes(b"not ours")
    (run / "b.gguf").symlink_to(tmp_path / "outside")
    for name in ("a.gguf", "b.gguf"):
        _place(store, entry, "model.gguf", run / name)
        assert not (run / name).is_symlink() and (run / name).read_bytes() == b"gguf bytes"
    assert (tmp_path / "outside").read_bytes() == b"not ours"
    assert sorted(p.name for p in run.iterdir()) == ["a.gguf", "b.gguf"]


def test_a_damaged_store_file_is_never_linked(tmp_path):
    store, entry = _entry(tmp_path)
    entry.file("model.gguf").write_bytes(b"gguf bytez")  # same size, other bytes
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(StoreError, match="is damaged .*model.gguf has sha256"):
        _place(store, entry, "model.gguf", run / "m.gguf")
    assert list(run.iterdir()) == []
    assert store.get("quantize", INPUTS) is None  # moved aside: the next run builds it again


def _manifest(entry, file="m-Q4_K_M.gguf"):
    return {"schema": 2, "quantkit": "0", "recipe": {}, "model": {}, "calibration": {}, "variants": [{"format": "gguf", "label": "Q4_K_M", "file": file, "step": entry.step, "key": entry.key,
                          "files": {n: {"sha256": r.sha256, "size": r.size} for n, r in entry.files.items()}},
                         {"format": "hf", "label": "BF16", "file": "models/x",
                          "files": {"w": {"sha256": "0", "size": 1}}},
                         {"format": "rtn", "label": "RTN", "file": None, "files": {}}]}


def test_run_folder_files_are_checked_against_the_manifest(tmp_path):
    store, entry = _entry(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    _place(store, entry, "model.gguf", run / "m-Q4_K_M.gguf")
    manifest = _manifest(entry)
    assert damaged_files(run, manifest, digests=True) == []
    published = tmp_path / "published"
    published.mkdir()
    os.link(run / "m-Q4_K_M.gguf", published / "m-Q4_K_M.gguf")
    assert differing_files(published, run, manifest) == []
    with open(run / "m-Q4_K_M.gguf", "r+b") as f:
        f.truncate(4)  # the run folder, the published run and the store share the file
    ((variant, why),) = damaged_files(run, manifest)
    assert variant.label == "Q4_K_M" and why == "run/m-Q4_K_M.gguf: m-Q4_K_M.gguf is 4 bytes, its record says 10"
    assert store.get("quantize", INPUTS) is None  # the size check on reuse sees it too
    rebuilt = store.ensure("quantize", INPUTS, lambda s: (s.path / "model.gguf").write_bytes(b"gguf bytes"))
    _place(store, rebuilt, "model.gguf", run / "m-Q4_K_M.gguf")
    assert damaged_files(run, manifest, digests=True) == []
    assert differing_files(published, run, manifest) == ["m-Q4_K_M.gguf"]  # publish again, not "unchanged"

"""Model sources: the Hub path through a pre-populated local cache (network off), local folders,
and the refusal of pickle weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from quantkit.digest import DigestCache
from quantkit.errors import SourceError
from quantkit.recipe import ModelSource
from quantkit.source import fetch_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "acme/tiny-model"


def _checkpoint_files(folder: Path, *, pickle_only: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "tokenizer.json").write_text("{}")
    if pickle_only:
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    else:
        save_file({"w": np.arange(16, dtype=np.float32).reshape(4, 4)}, str(folder / "model.safetensors"))
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04ignored when safetensors exist")
    (folder / "modeling_evil.py").write_text("import os; os.system('echo pwned')\n")


def _hub_cache(hf_home: Path) -> Path:
    """Lay out a model the way huggingface_hub caches it: blobs + snapshot symlinks + refs."""
    repo_dir = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    staging = repo_dir / "staging"
    _checkpoint_files(staging)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for f in staging.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo_dir / "blobs" / digest
        f.rename(blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    staging.rmdir()
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "v1.0").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    import huggingface_hub.constants as c

    # huggingface_hub reads these at import; point them at the test cache.
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return _hub_cache(tmp_path / "hf")


@pytest.mark.parametrize("revision", [COMMIT, "v1.0"])
def test_hub_snapshot_from_offline_cache(offline_hub, tmp_path, revision):
    source = ModelSource(repo=REPO_ID, revision=revision)
    snap = fetch_model(source=source, root=tmp_path, digests=DigestCache(tmp_path / "d.json"))
    assert snap.commit == COMMIT
    assert snap.path == offline_hub
    # Only safetensors, config and tokenizer: no pickle, no Python.
    assert sorted(snap.files) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert snap.files["config.json"] == hashlib.sha256((offline_hub / "config.json").read_bytes()).hexdigest()


def test_hub_revision_not_cached_is_a_clear_error(offline_hub, tmp_path):
    source = ModelSource(repo=REPO_ID, revision="f" * 40)
    with pytest.raises(SourceError, match="not in the local Hugging Face cache"):
        fetch_model(source=source, root=tmp_path, digests=DigestCache(tmp_path / "d.json"))


def test_local_pickle_only_refused_unless_allowed(tmp_path, monkeypatch):
    _checkpoint_files(tmp_path / "models" / "m", pickle_only=True)
    with pytest.raises(SourceError, match="only pickle weights .*pytorch_model.bin.*allow_pickle: true"):
        fetch_model(source=ModelSource(path="models/m"), root=tmp_path, digests=DigestCache(tmp_path / "d.json"))
    monkeypatch.setenv("QUANTKIT_ALLOW_PICKLE", "1")  # the recipe's allow_pickle needs the worker's yes too
    source = ModelSource(path="models/m", allow_pickle=True)
    snap = fetch_model(source=source, root=tmp_path, digests=DigestCache(tmp_path / "d.json"))
    assert "pytorch_model.bin" in snap.files and "modeling_evil.py" not in snap.files
    # A recipe validated where pickle was allowed, run on a worker that does not allow it: refused there.
    monkeypatch.delenv("QUANTKIT_ALLOW_PICKLE")
    with pytest.raises(SourceError, match="model.allow_pickle .*set QUANTKIT_ALLOW_PICKLE=1 on the worker"):
        fetch_model(source=source, root=tmp_path, digests=DigestCache(tmp_path / "d.json"))


def test_local_digest_changes_with_content(tmp_path):
    folder = tmp_path / "models" / "m"
    _checkpoint_files(folder)
    digests = DigestCache(tmp_path / "d.json")
    first = fetch_model(source=ModelSource(path="models/m"), root=tmp_path, digests=digests)
    again = fetch_model(source=ModelSource(path="models/m"), root=tmp_path, digests=digests)
    assert first.digest == again.digest
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    changed = fetch_model(source=ModelSource(path="models/m"), root=tmp_path, digests=digests)
    assert changed.digest != first.digest

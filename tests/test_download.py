"""The model download, through huggingface_hub's own code, against a Hub on 127.0.0.1 (localhub.py).

A pinned tag resolves to its commit; only safetensors, configs and tokenizer files are requested
(the repo's pickle and Python file never are); the token goes to the Hub and is written nowhere; a
download SIGKILLed halfway resumes to the same snapshot and the same GGUFs as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from figures import COUNTERS
from localhub import LocalHub
from test_pipeline import PLANTED_TOKEN, make_project

pytestmark = pytest.mark.slow

REPO, COMMIT, TAG = "acme/tiny-llama", "5f1c2a7e9b0d3c4e6f8a1b2c3d4e5f6a7b8c9d0e", "v1.0"
RECIPE = f"""\
name: tiny-download
model: {{repo: {REPO}, revision: {TAG}, name: tiny-llama}}
calibration:
  files: [calibration/en-prose.txt]
gguf:
  imatrix: {{enabled: true, ctx: 128, chunks: 4}}
  types: [Q8_0, Q4_K_M]
"""
BLOBS = Path("hub") / f"models--{REPO.replace('/', '--')}" / "blobs"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("hub-repo")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle that would run code")
    (folder / "modeling_evil.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    with LocalHub(REPO, folder, COMMIT, TAG) as running:
        yield running


class Site:
    def __init__(self, root: Path, repo_root: Path, tiny_llama: Path, hub: LocalHub):
        self.root, self.store, self.hf_home = root / "project", root / "store", root / "hf"
        make_project(self.root, repo_root, tiny_llama).unlink()
        shutil.rmtree(self.root / "models")  # the model comes from the Hub
        (self.root / "recipes" / "r.yaml").write_text(RECIPE)
        self.env = {**os.environ, "QUANTKIT_STORE": str(self.store), "HF_HOME": str(self.hf_home),
                    "HF_ENDPOINT": hub.url, "HF_TOKEN": PLANTED_TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
        self.env.pop("HF_HUB_OFFLINE", None)
        self.env.pop("HF_HUB_CACHE", None)

    def start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "quantkit.cli", "run", "recipes/r.yaml"], cwd=self.root,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def finish(self) -> str:
        proc = self.start()
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
        return out.decode(errors="replace")

    def ggufs(self) -> dict[str, bytes]:
        latest = self.root / "artifacts" / "tiny-download" / "latest"
        return {p.name: p.read_bytes() for p in sorted(latest.glob("*.gguf"))}

    def manifest(self) -> dict:
        return json.loads((self.root / "runs" / "tiny-download" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, repo_root, tiny_llama, hub):
    site = Site(tmp_path_factory.mktemp("dl-ref"), repo_root, tiny_llama, hub)
    hub.requests.clear()
    hub.authorizations.clear()
    out = site.finish()
    return site, out, list(hub.requests), list(hub.authorizations)


def test_pinned_tag_resolves_to_its_commit(uninterrupted, tiny_llama):
    site, _, _, _ = uninterrupted
    model = site.manifest()["model"]
    assert (model["repo"], model["revision"], model["commit"]) == (REPO, TAG, COMMIT)
    snapshot = site.hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()


def test_only_safe_files_are_requested(uninterrupted):
    _, _, requests, _ = uninterrupted
    fetched = {path.rsplit("/", 1)[-1] for method, path in requests if method == "GET" and "/resolve/" in path}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= fetched
    assert not fetched & {"pytorch_model.bin", "modeling_evil.py"}, fetched


def test_token_is_sent_to_the_hub_and_written_nowhere(uninterrupted):
    site, out, _, authorizations = uninterrupted
    assert f"Bearer {PLANTED_TOKEN}" in authorizations  # the token was really in play
    assert PLANTED_TOKEN not in out
    leaked = [p for folder in (site.root, site.store, site.hf_home) for p in folder.rglob("*")
              if p.is_file() and PLANTED_TOKEN.encode() in p.read_bytes()]
    assert leaked == []


def test_sigkill_during_download_then_rerun(tmp_path, repo_root, tiny_llama, hub, uninterrupted):
    reference, _, _, _ = uninterrupted
    site = Site(tmp_path, repo_root, tiny_llama, hub)
    size = (tiny_llama / "model.safetensors").stat().st_size
    hub.throttle["model.safetensors"] = size / 20  # about 20 s for the weights
    try:
        proc = site.start()
        deadline = time.monotonic() + 300
        partial = None
        while partial is None:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the download never started"
            blobs = site.hf_home / BLOBS
            partial = next((p for p in blobs.glob("*.incomplete") if p.stat().st_size > size // 4), None) \
                if blobs.is_dir() else None
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        hub.throttle.clear()
    assert 0 < partial.stat().st_size < size  # killed halfway: a partial blob, no snapshot file for it
    assert not (site.store / "convert").exists() or not any((site.store / "convert").glob("*/entry.json"))

    site.finish()
    assert site.manifest()["model"]["digest"] == reference.manifest()["model"]["digest"]
    assert site.ggufs() == reference.ggufs(), "GGUFs after the interrupted download differ"
    assert not list((site.hf_home / BLOBS).glob("*.incomplete"))
    COUNTERS["kill points survived"] += 1

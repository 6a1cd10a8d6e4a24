"""A GPTQ step that raises midway leaves no offload folder: real GPTQModel on the tiny Llama, made
to fail inside its quantization loop after it has offloaded layers to the folder quantkit chose."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from quantkit.calibration import CalibrationText
from quantkit.digest import digest_of, sha256_file
from quantkit.gptq import HF_CACHE_ENV, BackendMissingError, QuantizerError, gptq, import_gptqmodel
from quantkit.recipe import GPTQVariant
from quantkit.source import ModelSnapshot
from quantkit.store import SCRATCH, Store

try:
    import_gptqmodel()
except BackendMissingError:
    pytest.skip("needs the GPTQ/AWQ backend: pip install 'quantkit[gptq]'", allow_module_level=True)


class ScratchSpy(Store):
    """A store that remembers the scratch folders it handed out."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.handed_out: list[Path] = []

    @contextlib.contextmanager
    def scratch(self, purpose: str):
        with super().scratch(purpose) as path:
            self.handed_out.append(path)
            yield path


def _snapshot(tiny_llama: Path) -> ModelSnapshot:
    files = {f.name: sha256_file(f) for f in sorted(tiny_llama.iterdir()) if f.is_file()}
    return ModelSnapshot(path=tiny_llama, repo=None, revision=None, commit=None, files=files, digest=digest_of(files))


def _calibration(repo_root: Path) -> CalibrationText:
    text = (repo_root / "calibration" / "en-prose.txt").read_text(encoding="utf-8")
    return CalibrationText(text, hashlib.sha256(text.encode()).hexdigest(), ("calibration/en-prose.txt",))


SPEC = GPTQVariant(label="g128", samples=8, seq_len=64)


def test_gptq_that_raises_midway_leaves_no_offload_folder(tiny_llama, repo_root, tmp_path, monkeypatch):
    from gptqmodel.looper import module_looper

    store = ScratchSpy(tmp_path / "store")
    system_tmp = Path(tempfile.gettempdir())
    before = set(system_tmp.glob("gptqmodel_*"))
    seen: list[list[str]] = []
    offload_to_disk = module_looper.offload_to_disk

    def offload_then_fail(*args, disk_path, **kwargs):
        offload_to_disk(*args, disk_path=disk_path, **kwargs)  # GPTQModel's own: the layers go to disk
        (offload,) = [p for p in store.handed_out if p.name.startswith("gptq-offload-")]
        assert disk_path == str(offload), "GPTQModel must offload to the folder quantkit chose"
        seen.append(sorted(str(p.relative_to(offload)) for p in offload.rglob("*") if p.is_file()))
        raise RuntimeError("injected failure in the quantization loop")

    monkeypatch.setattr(module_looper, "offload_to_disk", offload_then_fail)
    with pytest.raises(QuantizerError, match="injected failure") as raised:
        gptq(model=_snapshot(tiny_llama), spec=SPEC, calibration=_calibration(repo_root), store=store)
    assert seen and seen[0], "GPTQModel had offloaded nothing before the failure"
    offload = next(p for p in store.handed_out if p.name.startswith("gptq-offload-"))
    assert not offload.exists(), f"the offload folder survived the failure: {offload}"
    assert offload.parent.parent == (store.root / SCRATCH).resolve()
    assert [p for p in (store.root / SCRATCH).rglob("*") if p.name.startswith(("gptq-", ".tmp-"))] == []
    assert set(system_tmp.glob("gptqmodel_*")) == before, "GPTQModel made its own temp folder"
    step_folder = store.root / "gptq"
    assert not step_folder.exists() or all(p.name.endswith(".lock") for p in step_folder.iterdir())
    assert "injected failure" in str(raised.value.__cause__)


ABORT_IN_WORKER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from gptqmodel.looper.gptq_processor import GPTQProcessor
from test_gptq_leaks import SPEC, _calibration, _snapshot
from quantkit.gptq import gptq
from quantkit.store import Store

def fail(self, *args, **kwargs):
    raise RuntimeError("injected failure in a GPTQModel worker thread")

GPTQProcessor.process = fail
gptq(model=_snapshot(Path({model!r})), spec=SPEC, calibration=_calibration(Path({repo!r})), store=Store(Path({store!r})))
"""


def test_gptq_aborted_by_gptqmodel_leaves_a_folder_the_next_run_removes(tiny_llama, repo_root, tmp_path):
    # GPTQModel ends the whole process (os._exit, no cleanup) when one of its worker threads raises:
    # like a SIGKILL, nothing in the process can clean up, so the next run must.
    store = tmp_path / "store"
    code = ABORT_IN_WORKER.format(tests=str(repo_root / "tests"), model=str(tiny_llama), repo=str(repo_root),
                                  store=str(store))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1 and "injected failure in a GPTQModel worker thread" in run.stderr, run.stderr[-3000:]
    (left,) = [p for p in (store / SCRATCH).iterdir() if p.is_dir()]
    assert list(left.glob("gptq-offload-*")) and list(left.glob("gptq/.tmp-*"))
    assert not list(Path(tempfile.gettempdir()).glob("gptqmodel_*"))
    Store(store).ensure("other", {"any": "recipe"}, lambda staging: None)  # the next run, whatever it builds
    assert not left.exists() and not list(store.rglob(".tmp-*"))


def test_importing_gptqmodel_through_quantkit_leaves_the_hf_cache_settings_alone(tmp_path):
    # A fresh process: tokenicer (imported by GPTQModel) sets HF_HOME to /tmp/tokenicer_hf_home if unset.
    env = {k: v for k, v in os.environ.items() if k not in HF_CACHE_ENV} | {"TMPDIR": str(tmp_path)}
    code = ("import os; from quantkit.gptq import HF_CACHE_ENV, import_gptqmodel; import_gptqmodel(); "
            "print([os.environ.get(k) for k in HF_CACHE_ENV])")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "[None, None, None, None]"
    assert not list(tmp_path.iterdir()), "importing GPTQModel left something in the temp folder"

"""The vLLM serve check (quantkit/serving/vllm.py) where no vLLM environment is: "not checked", with the
reason logged, and the serve-hf store key as it was; a configured environment without vLLM is the worker's
error. The check itself, in PyPI's CPU build of vLLM: tests/test_serve.py."""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest

from quantkit.serving import VLLM_NOT_CHECKED
from quantkit.serving.vllm import VllmEnvError, check_vllm, find_vllm, memory_fraction, vllm_failure

needs_no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")


@needs_no_vllm
def test_without_a_vllm_environment_nothing_is_checked_and_the_log_says_why(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("QUANTKIT_VLLM_PYTHON", raising=False)
    caplog.set_level(logging.INFO, logger="quantkit.serving.vllm")
    assert find_vllm().startswith("vLLM is not installed here (set QUANTKIT_VLLM_PYTHON")
    assert check_vllm(model_dir=tmp_path, device="cpu") == (VLLM_NOT_CHECKED, None)
    assert "vLLM: not checked: vLLM is not installed here" in caplog.text


@needs_no_vllm
def test_a_vllm_environment_that_has_no_vllm_is_the_workers_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTKIT_VLLM_PYTHON", sys.executable)
    with pytest.raises(VllmEnvError, match=r"QUANTKIT_VLLM_PYTHON=.*python.*: no vLLM there"):
        check_vllm(model_dir=tmp_path, device="cpu")
    monkeypatch.setenv("QUANTKIT_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(VllmEnvError, match="cannot run it"):
        check_vllm(model_dir=tmp_path, device="cpu")


def test_only_a_no_from_vllm_fails_the_serve_check():
    assert vllm_failure(VLLM_NOT_CHECKED) is None  # "not checked" starts with "no" but is no failure
    assert vllm_failure("yes") is None
    assert vllm_failure("no: the chat did not stop") == "the chat did not stop"


def test_on_the_cpu_vllm_reserves_the_weights_and_a_margin_of_free_memory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2**20)
    small = memory_fraction(tmp_path, "cpu")
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    with open(tmp_path / "model-2.safetensors", "wb") as f:
        f.truncate(total)  # sparse: larger than the free memory
    assert 0.05 <= small < memory_fraction(tmp_path, "cpu") == 0.9
    assert memory_fraction(tmp_path, "cuda") == 0.5

"""The vLLM serve check (quantkit/serving/vllm.py) where vLLM cannot run: "not checked", with the reason logged,
and the serve-hf store key as it was. The check itself runs only on a CUDA worker with vLLM installed."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from quantkit.serving import VLLM_NOT_CHECKED
from quantkit.serving.vllm import check_vllm, why_not


def test_a_cpu_run_is_not_checked_in_vllm_and_says_why(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="quantkit.serving.vllm")
    assert why_not("cpu") == "the run's device is cpu, and vLLM needs a CUDA GPU"
    assert check_vllm(model_dir=tmp_path, device="cpu") == VLLM_NOT_CHECKED
    assert "vLLM: not checked: the run's device is cpu" in caplog.text


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_a_cuda_run_is_not_checked_either(tmp_path):
    assert why_not("cuda").startswith("vLLM is not installed")
    assert check_vllm(model_dir=tmp_path, device="cuda") == VLLM_NOT_CHECKED


def test_only_a_no_from_vllm_fails_the_serve_check():
    from quantkit.serving import VLLM_NOT_CHECKED
    from quantkit.serving.vllm import vllm_failure

    assert vllm_failure(VLLM_NOT_CHECKED) is None  # "not checked" starts with "no" but is no failure
    assert vllm_failure("yes") is None
    assert vllm_failure("no: the chat did not stop") == "the chat did not stop"

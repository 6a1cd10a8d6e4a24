"""A GPTQ/AWQ checkpoint in vLLM: what a GPU worker runs; "not checked" wherever vLLM cannot run.

vLLM needs a CUDA build of torch, which quantkit's CPU machines do not install (docs/serving.md). Where it is
importable and the run's device is CUDA, the checkpoint is loaded with ``vllm.LLM`` (vLLM picks the GPTQ or
AWQ kernel from its ``quantization_config``, as ``vllm serve`` does) and answers the serve check's chat through
``LLM.chat``, which renders the checkpoint's chat template as the OpenAI server's ``/v1/chat/completions``
does; greedy, at most ``max_tokens``. A load error or a reply that does not stop is "no: <reason>".
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from quantkit.serving import MESSAGES, VLLM_NOT_CHECKED, short

log = logging.getLogger(__name__)

GPU_MEMORY_UTILIZATION = 0.5  # the worker may hold other models (the base's logits, a scoring pass)
MAX_MODEL_LEN = 2048  # the chat is short; a small context keeps vLLM's KV-cache reservation small


def why_not(device: str) -> str | None:
    """Why vLLM cannot check here (None when it can): not a CUDA run, or vLLM not installed."""
    if device != "cuda":
        return f"the run's device is {device}, and vLLM needs a CUDA GPU"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm, with its CUDA torch, on the GPU worker)"
    return None


def vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def vllm_failure(result: str) -> str | None:
    """Why ``check_vllm``'s ``result`` fails the serve check: only a "no"; "not checked" (no GPU, no vLLM) does not."""
    if result == "no" or result.startswith("no:"):
        return result.removeprefix("no").removeprefix(":").strip() or "vLLM cannot serve it"
    return None


def check_vllm(*, model_dir: Path, device: str, max_tokens: int = 64, trust_remote_code: bool = False) -> str:
    """``"yes"``, ``"no: <reason>"``, or ``VLLM_NOT_CHECKED`` (the reason logged) where vLLM cannot run."""
    if (reason := why_not(device)) is not None:
        log.info("vLLM: not checked: %s", reason)
        return VLLM_NOT_CHECKED
    from vllm import LLM, SamplingParams

    from quantkit.source import remote_code_allowed

    llm = None
    try:
        llm = LLM(model=str(model_dir), max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
                  trust_remote_code=remote_code_allowed(trust_remote_code), enforce_eager=True, seed=0)
        (out,) = llm.chat(list(MESSAGES), SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    except Exception as e:  # what vLLM refuses (an unsupported group size, act-order with its kernel) is the verdict
        return f"no: vLLM {vllm_version()} cannot serve it: {e.__class__.__name__}: {short(e)}"
    finally:
        del llm  # frees the GPU memory it reserved before the next node
    reply = out.outputs[0]
    if reply.finish_reason != "stop" or not reply.text.strip():
        return f"no: vLLM {vllm_version()}: the chat did not stop within {max_tokens} tokens " \
               f"(finish_reason {reply.finish_reason!r})"
    return "yes"

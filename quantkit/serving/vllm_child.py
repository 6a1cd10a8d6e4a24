"""One chat with one checkpoint in vLLM, run by ``quantkit.serving.vllm`` with vLLM's own interpreter.

Standalone on purpose: vLLM pins its own torch and transformers, so it lives in an environment of its own
where quantkit is not installed. Nothing here imports quantkit. Arguments: a JSON request file and a result
path. The result is JSON: ``{"stage": "done", "text", "finish_reason", "vllm", "platform"}``, or
``{"stage": "import" | "load" | "chat", "error"}`` when that stage failed. An import failure says something
about the environment; a load or chat failure says something about the checkpoint.
"""

import json
import sys


def _version() -> str:
    import importlib.metadata as md

    dists = md.packages_distributions().get("vllm") or ["vllm"]
    return f"{dists[0]} {md.version(dists[0])}"


def _run(request: dict) -> dict:
    try:
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        version, platform = _version(), str(current_platform.device_type)
    except Exception as e:  # a broken environment (a CUDA build on a machine without a GPU, a missing library)
        return {"stage": "import", "error": f"{e.__class__.__name__}: {e}"}
    if not platform:
        return {"stage": "import", "error": "vLLM found no platform to run on", "vllm": version}
    out = {"vllm": version, "platform": platform}
    try:
        llm = LLM(model=request["model"], max_model_len=request["max_model_len"], dtype=request["dtype"],
                  gpu_memory_utilization=request["memory_fraction"], trust_remote_code=request["trust_remote_code"],
                  enforce_eager=True, seed=0)
    except Exception as e:  # what vLLM refuses in the checkpoint (act-order with groups, a group size) is the verdict
        return {**out, "stage": "load", "error": f"{e.__class__.__name__}: {e}"}
    try:
        (reply,) = llm.chat(request["messages"], SamplingParams(max_tokens=request["max_tokens"], temperature=0.0),
                            use_tqdm=False)
    except Exception as e:
        return {**out, "stage": "chat", "error": f"{e.__class__.__name__}: {e}"}
    first = reply.outputs[0]
    return {**out, "stage": "done", "text": first.text, "finish_reason": first.finish_reason}


if __name__ == "__main__":  # vLLM starts its engine with spawn: the module is imported again there
    with open(sys.argv[1]) as f:
        result = _run(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)

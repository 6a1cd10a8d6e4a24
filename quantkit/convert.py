"""Step 2: HF checkpoint -> base GGUF (f16/bf16/f32) with llama.cpp's converter.

The converter runs lazily (its default): tensors stream from safetensors to
the output one at a time, so peak RAM stays near the largest tensor.
"""

from __future__ import annotations

import logging
import sys

from quantkit.errors import VerificationError
from quantkit.ggufinfo import read_gguf
from quantkit.proc import run_tool
from quantkit.quanttypes import QUANT_TYPES
from quantkit.source import ModelSnapshot
from quantkit.store import Entry, Staging, Store
from quantkit.toolchain import Toolchain

log = logging.getLogger(__name__)

STEP = "convert"
OUTPUT = "model.gguf"


def convert_inputs(*, model: ModelSnapshot, base_type: str, model_name: str, toolchain: Toolchain) -> dict:
    return {"model_digest": model.digest, "base_type": base_type, "model_name": model_name,
            "llama_cpp": toolchain.commit}


def convert(*, model: ModelSnapshot, base_type: str, model_name: str, toolchain: Toolchain, store: Store) -> Entry:
    inputs = convert_inputs(model=model, base_type=base_type, model_name=model_name, toolchain=toolchain)

    def produce(staging: Staging) -> None:
        model.check_links()  # the converter follows links: none may have appeared since fetch_model
        out = staging.path / OUTPUT
        run = run_tool([sys.executable, toolchain.convert_script, model.path, "--outfile", out,
                        "--outtype", base_type, "--model-name", model_name],
                       cwd=staging.path, env=toolchain.python_env())
        info = read_gguf(out)
        want = QUANT_TYPES[base_type.upper()].ftype
        if info.file_type != want:
            raise VerificationError(f"converter wrote file type {info.file_type}, expected {want} ({base_type})")
        staging.info.update(tool=toolchain.version, seconds=round(run.seconds, 3), peak_rss_mib=round(run.peak_rss_mib, 1),
                            gguf={"architecture": info.architecture, "parameters": info.parameters,
                                  "tensor_types": info.tensor_types, "file_type": info.file_type})

    entry = store.ensure(STEP, inputs, produce)
    log.info("convert: %s %s (%s)", "reused" if entry.reused else "built", entry.file(OUTPUT), base_type)
    return entry

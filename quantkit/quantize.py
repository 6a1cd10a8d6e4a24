"""Step 4: llama-quantize, one call per GGUF variant of the recipe."""

from __future__ import annotations

import logging
import os

from quantkit.errors import VerificationError
from quantkit.experts import Coverage, needs_importance_data, quantize_plan
from quantkit.ggufinfo import read_gguf
from quantkit.proc import run_tool
from quantkit.quanttypes import QUANT_TYPES
from quantkit.store import Entry, Staging, Store
from quantkit.toolchain import Toolchain

log = logging.getLogger(__name__)

STEP = "quantize"
OUTPUT = "model.gguf"
IMATRIX_LINK = "imatrix.gguf"


def quantize_inputs(*, base: Entry, qtype: str, imatrix: Entry | None, extra_args: list[str],
                    toolchain: Toolchain, experts: dict | None = None) -> dict:
    inputs = {"base_sha256": base.files["model.gguf"].sha256, "type": qtype,
              "imatrix_sha256": imatrix.files["imatrix.gguf"].sha256 if imatrix else None,
              "args": extra_args, "llama_cpp": toolchain.commit}
    if experts is not None:  # MoE only (dense keys unchanged): the threshold the entry's coverage facts used
        inputs["expert_min_tokens"] = experts["min_tokens"]
    return inputs


def expert_args(*, imatrix: Entry | None, spec, variant, label: str) -> tuple[list[str], dict | None]:
    """For a MoE model quantized with an imatrix: the fallback --tensor-type arguments for layers whose
    experts the calibration text left uncovered, and what the variant's info says about them
    (quantkit.experts). ([], None) for a dense model or a variant without an imatrix."""
    if imatrix is None:
        return [], None
    needs = needs_importance_data(QUANT_TYPES[variant.type].needs_imatrix,
                                  {**spec.overrides.tensor_types, **variant.tensor_types})
    return quantize_plan(coverage=Coverage.from_info(imatrix.info), label=label, needs_imatrix=needs,
                         min_tokens=spec.imatrix.min_expert_tokens, action=spec.imatrix.uncovered_experts)


def quantize(*, base: Entry, qtype: str, label: str, imatrix: Entry | None, extra_args: list[str],
             toolchain: Toolchain, store: Store, threads: int | None = None, experts: dict | None = None) -> Entry:
    """Quantize ``base`` to ``qtype``. ``extra_args`` are tensor overrides built by the recipe
    (argument list items, never shell text); ``experts``: expert coverage facts kept in the entry's info
    (their fallback arguments are in ``extra_args``, so in the key)."""
    inputs = quantize_inputs(base=base, qtype=qtype, imatrix=imatrix, extra_args=extra_args, toolchain=toolchain,
                             experts=experts)
    threads = threads or os.cpu_count() or 1
    want = QUANT_TYPES[qtype]

    def produce(staging: Staging) -> None:
        cmd = [toolchain.binary("llama-quantize")]
        link = staging.path / IMATRIX_LINK
        if imatrix is not None:
            # llama-quantize writes the imatrix path it was given into the file's metadata;
            # a fixed relative name keeps outputs identical wherever the store lives.
            link.symlink_to(imatrix.file("imatrix.gguf"))
            cmd += ["--imatrix", IMATRIX_LINK]
        cmd += [*extra_args, base.file("model.gguf"), OUTPUT, qtype, str(threads)]
        try:
            run = run_tool(cmd, cwd=staging.path)
        finally:
            link.unlink(missing_ok=True)
        info = read_gguf(staging.path / OUTPUT)
        if info.file_type != want.ftype:
            raise VerificationError(f"{label}: file type {info.file_type} in the output, expected {want.ftype} ({qtype})")
        staging.info.update(tool=toolchain.version, seconds=round(run.seconds, 3),
                            peak_rss_mib=round(run.peak_rss_mib, 1), threads=threads,
                            gguf={"file_type": info.file_type, "parameters": info.parameters,
                                  "tensor_types": info.tensor_types})
        if experts is not None:
            staging.info["experts"] = experts

    entry = store.ensure(STEP, inputs, produce)
    size = entry.files[OUTPUT].size
    log.info("quantize %s: %s (%.1f MiB, %s)", label, "reused" if entry.reused else "built", size / 2**20,
             ", ".join(f"{n}x{t}" for t, n in entry.info.get("gguf", {}).get("tensor_types", {}).items()))
    return entry

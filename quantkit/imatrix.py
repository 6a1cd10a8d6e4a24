"""Step 3: importance matrix (llama-imatrix, GGUF format) from calibration text."""

from __future__ import annotations

import logging
import os

from quantkit.calibration import CalibrationText
from quantkit.errors import VerificationError
from quantkit.experts import Coverage, describe, expert_token_counts
from quantkit.ggufinfo import imatrix_chunks
from quantkit.proc import run_tool
from quantkit.recipe import ImatrixSpec
from quantkit.store import Entry, Staging, Store
from quantkit.toolchain import Toolchain

log = logging.getLogger(__name__)

STEP = "imatrix"
OUTPUT = "imatrix.gguf"
TEXT = "calibration.txt"


def imatrix_inputs(*, base: Entry, calibration: CalibrationText, spec: ImatrixSpec, toolchain: Toolchain) -> dict:
    return {"base_sha256": base.files["model.gguf"].sha256, "calibration_sha256": calibration.sha256,
            "ctx": spec.ctx, "chunks": spec.chunks, "llama_cpp": toolchain.build, "repack": False,
            **({"parse_special": True} if calibration.parse_special else {})}


def imatrix(*, base: Entry, calibration: CalibrationText, spec: ImatrixSpec, toolchain: Toolchain, store: Store,
            threads: int | None = None) -> Entry:
    inputs = imatrix_inputs(base=base, calibration=calibration, spec=spec, toolchain=toolchain)
    threads = threads or os.cpu_count() or 1

    def produce(staging: Staging) -> None:
        # Relative names: llama-imatrix records the text's file name in its output.
        (staging.path / TEXT).write_text(calibration.text, encoding="utf-8")
        run = run_tool([toolchain.binary("llama-imatrix"), "-m", base.file("model.gguf"), "-f", TEXT,
                        "-o", OUTPUT, "-c", str(spec.ctx), "--chunks", str(spec.chunks), "-t", str(threads),
                        "--no-ppl", "--output-frequency", "1000000", *toolchain.offload_args(),
                        # the same plain weight layout on every CPU, as for scoring: with AMX, llama.cpp would
                        # also hold a repacked copy of the layers (5.4 instead of 3.2 GiB for a 1B model)
                        "--no-repack",
                        # rendered conversations: <|im_start|> and the like are the special tokens, as in chat
                        *(["--parse-special"] if calibration.parse_special else [])],
                       cwd=staging.path)
        out = staging.path / OUTPUT
        if not out.is_file():
            # llama-imatrix exits 0 without writing when it cannot (seen with a missing folder).
            raise VerificationError(f"llama-imatrix wrote no {OUTPUT}; its output ended with:\n{run.output_tail}")
        chunks = imatrix_chunks(out)
        if chunks < 1:
            raise VerificationError("importance matrix covers 0 chunks: the calibration text is shorter than "
                                    f"one context of {spec.ctx} tokens")
        if chunks < spec.chunks:
            log.warning("imatrix: calibration text gave %d chunks of %d tokens, recipe asked for %d",
                        chunks, spec.ctx, spec.chunks)
        experts = expert_token_counts(out)
        if experts:
            coverage = Coverage(experts)
            staging.info["experts"] = coverage.to_info()
            if below := coverage.below(spec.min_expert_tokens):
                log.warning("imatrix: %d expert(s) got fewer than %d tokens: %s", len(below), spec.min_expert_tokens,
                            describe(below))
        staging.info.update(tool=toolchain.version, seconds=round(run.seconds, 3),
                            peak_rss_mib=round(run.peak_rss_mib, 1), chunks=chunks, threads=threads,
                            calibration=calibration.describe())

    entry = store.ensure(STEP, inputs, produce)
    log.info("imatrix: %s (%s chunks)", "reused" if entry.reused else "built", entry.info.get("chunks"))
    return entry

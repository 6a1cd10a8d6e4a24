"""Step 5b: AWQ 4-bit checkpoints (GEMM layout) with GPTQModel.

Same machinery as gptq.py; only the quantize config differs. On CPU the packer must be
GPTQModel's torch AWQ kernel: its default GEMM kernel asks for CUDA.
"""

from __future__ import annotations

import logging

from quantkit.calibration import CalibrationText
from quantkit.gptq import quantize_with_gptqmodel
from quantkit.recipe import AWQVariant
from quantkit.source import ModelSnapshot
from quantkit.store import Entry, Store

log = logging.getLogger(__name__)

STEP = "awq"
CPU_KERNEL = "AWQ_TORCH"


def awq(*, model: ModelSnapshot, spec: AWQVariant, calibration: CalibrationText, store: Store,
        device: str | None = None) -> Entry:
    """Quantize ``model`` with AWQ as ``spec`` says; the checkpoint is at the entry's root."""

    def config(gm, **common):
        return gm.AWQConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                            format=getattr(gm.FORMAT, spec.version), **common)

    return quantize_with_gptqmodel(
        step=STEP, model=model, spec=spec, group_size=spec.q_group_size, calibration=calibration, store=store,
        device=device, make_config=config, cpu_kernel=CPU_KERNEL,
        expect={"quant_method": "awq", "bits": spec.w_bit, "group_size": spec.q_group_size,
                "zero_point": spec.zero_point, "version": spec.version.lower()})

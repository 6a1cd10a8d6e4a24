"""Step 5c: round-to-nearest (RTN) checkpoints with GPTQModel, the reference GPTQ and AWQ must beat.

RTN rounds every weight to the nearest point of its group's grid (min/max scale, a zero point unless
``sym``), with no calibration text and no smoothing: GPTQModel's weight-only ``RTNConfig`` with
``smooth`` left at None, saved in GPTQ format. Same machinery as gptq.py; the key names no
calibration text. The checkpoint is scored like the others and never published.
"""

from __future__ import annotations

import logging

from quantkit.gptq import quantize_with_gptqmodel
from quantkit.recipe import RTNVariant
from quantkit.source import ModelSnapshot
from quantkit.store import Entry, Store

log = logging.getLogger(__name__)

STEP = "rtn"


def rtn(*, model: ModelSnapshot, spec: RTNVariant, store: Store, device: str | None = None,
        threads: int | None = None) -> Entry:
    """Quantize ``model`` by round-to-nearest as ``spec`` says; the checkpoint is at the entry's root."""

    def config(gm, **common):
        return gm.RTNConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, desc_act=False, smooth=None,
                            **common)

    return quantize_with_gptqmodel(
        step=STEP, model=model, spec=spec, group_size=spec.group_size, calibration=None, store=store,
        device=device, threads=threads, make_config=config, cpu_kernel=None,
        expect={"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": False,
                "sym": spec.sym})

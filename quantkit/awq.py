"""Step 5b: AWQ 4-bit checkpoints (GEMM layout) with GPTQModel.

Same machinery as gptq.py; only the quantize config differs. On CPU the packer must be
GPTQModel's torch AWQ kernel: its default GEMM kernel asks for CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from quantkit.calibration import CalibrationText
from quantkit.gptq import quantize_with_gptqmodel
from quantkit.recipe import AWQVariant
from quantkit.source import ModelSnapshot
from quantkit.store import Entry, Store

log = logging.getLogger(__name__)

STEP = "awq"
CPU_KERNEL = "AWQ_TORCH"
_PATCHING = threading.Lock()


def awq(*, model: ModelSnapshot, spec: AWQVariant, calibration: CalibrationText, store: Store,
        device: str | None = None, threads: int | None = None) -> Entry:
    """Quantize ``model`` with AWQ as ``spec`` says; the checkpoint is at the entry's root."""

    def config(gm, **common):
        return gm.AWQConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                            format=getattr(gm.FORMAT, spec.version), **common)

    return quantize_with_gptqmodel(
        step=STEP, model=model, spec=spec, group_size=spec.q_group_size, calibration=calibration, store=store,
        device=device, threads=threads, make_config=config, cpu_kernel=CPU_KERNEL,
        expect={"quant_method": "awq", "bits": spec.w_bit, "group_size": spec.q_group_size,
                "zero_point": spec.zero_point, "version": spec.version.lower()},
        around=lambda: _clipping(spec.clip))


@contextlib.contextmanager
def _clipping(enabled: bool):
    """AWQ's clipping search on or off. GPTQModel 7.6 has no config field for it: its AWQProcessor sets
    ``apply_clip = True`` when it is built (inside ``quantize``), so while this block runs a processor built
    gets the recipe's value. py-spy on the demo (SmolLM2-135M, 16 x 128 tokens, CPU): 81 % of AWQ's time was
    ``_compute_best_clip``, 9 % the scale search. One AWQ quantizes at a time under the patch."""
    if enabled:
        yield
        return
    from gptqmodel.looper.awq_processor import AWQProcessor

    from quantkit.gptq import QuantizerError

    with _PATCHING:
        original = AWQProcessor.__init__

        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if not hasattr(self, "apply_clip"):  # another GPTQModel: refuse rather than clip silently
                raise QuantizerError("this GPTQModel's AWQProcessor has no apply_clip: awq clip: false cannot be "
                                     "honoured; remove it from the recipe or pin GPTQModel 7.6")
            self.apply_clip = False

        AWQProcessor.__init__ = init
        try:
            yield
        finally:
            AWQProcessor.__init__ = original

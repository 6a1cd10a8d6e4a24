"""`quantkit plan`: the steps of a recipe, which are done, and the disk and RAM they need.

Sizes come from the weight count (read from safetensors headers, no weights
loaded) times bits per weight from quanttypes. Keys are computed exactly as the
steps compute them, so "done" means the store really holds that output.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from quantkit.calibration import load_calibration
from quantkit.convert import convert_inputs
from quantkit.digest import DigestCache
from quantkit.errors import SourceError
from quantkit.imatrix import imatrix_inputs
from quantkit.quantize import quantize_inputs
from quantkit.quanttypes import QUANT_TYPES
from quantkit.recipe import Recipe
from quantkit.source import fetch_model
from quantkit.store import Store
from quantkit.toolchain import Toolchain

GiB = 2**30
# Resident overhead of the Python converter (torch, numpy) on top of the tensors it holds.
CONVERTER_OVERHEAD = int(1.0 * GiB)


@dataclass(frozen=True)
class PlannedStep:
    step: str
    label: str
    status: str  # "done", "to do", "unknown" (depends on an output not made yet)
    disk_bytes: int | None
    ram_bytes: int | None


@dataclass(frozen=True)
class WeightStats:
    parameters: int
    largest_tensor: int  # elements


def safetensors_stats(folder: Path) -> WeightStats:
    """Count weights from safetensors headers only (8-byte length + JSON)."""
    total, largest = 0, 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
            largest = max(largest, count)
    return WeightStats(total, largest)


def plan(recipe: Recipe, *, root: Path, store: Store, toolchain: Toolchain | None) -> list[PlannedStep]:
    steps: list[PlannedStep] = []
    try:
        model = fetch_model(source=recipe.model, root=root, digests=DigestCache(store.root / "digests.json")) \
            if recipe.model.path or _hub_cached(recipe) else None
    except SourceError:
        model = None
    stats = safetensors_stats(model.path) if model else None
    source_bytes = sum((model.path / f).stat().st_size for f in model.files) if model else None
    steps.append(PlannedStep("source", recipe.model.repo or recipe.model.path or "", "done" if model else "to do",
                             source_bytes, None))
    if recipe.gguf is None:
        return steps
    spec = recipe.gguf

    def size(bpw: float) -> int | None:
        return int(stats.parameters * bpw / 8) if stats else None

    base_bpw = QUANT_TYPES[spec.base_type.upper()].bpw
    base_size = size(base_bpw)
    base_entry = None
    if model and toolchain:
        base_entry = store.get("convert", convert_inputs(model=model, base_type=spec.base_type,
                                                         model_name=recipe.model.display_name, toolchain=toolchain))
    ram_convert = stats.largest_tensor * 4 * 2 + CONVERTER_OVERHEAD if stats else None
    steps.append(PlannedStep("convert", spec.base_type, _status(base_entry, model and toolchain), base_size,
                             ram_convert))
    imat_entry = None
    if spec.imatrix.enabled and any(spec.uses_imatrix(v) for v in spec.types):
        if base_entry and toolchain:
            calib = load_calibration(recipe.calibration, root=root) if recipe.calibration.files else None
            if calib:
                imat_entry = store.get("imatrix", imatrix_inputs(base=base_entry, calibration=calib,
                                                                 spec=spec.imatrix, toolchain=toolchain))
        steps.append(PlannedStep("imatrix", f"ctx {spec.imatrix.ctx} x {spec.imatrix.chunks} chunks",
                                 _status(imat_entry, base_entry), 50 * 2**20, base_size))
    for v in spec.types:
        use_imat = spec.uses_imatrix(v)
        entry = None
        known = base_entry is not None and (imat_entry is not None or not use_imat)
        if known and toolchain:
            entry = store.get("quantize", quantize_inputs(base=base_entry, qtype=v.type,
                                                          imatrix=imat_entry if use_imat else None,
                                                          extra_args=spec.override_args(v), toolchain=toolchain))
        ram = base_size + stats.largest_tensor * 4 * 4 if stats and base_size else None
        steps.append(PlannedStep("quantize", spec.label(v), _status(entry, known),
                                 size(QUANT_TYPES[v.type].bpw), ram))
    return steps


def _status(entry, inputs_known) -> str:
    if entry is not None:
        return "done"
    return "to do" if inputs_known else "to do (after the step before)"


def _hub_cached(recipe: Recipe) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=recipe.model.repo, revision=recipe.model.revision, local_files_only=True)
        return True
    except Exception:  # not cached in any form: plan shows the download as to do
        return False


def render(steps: list[PlannedStep]) -> str:
    def fmt(n: int | None) -> str:
        return "?" if n is None else f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"

    rows = [("step", "variant", "status", "disk", "peak RAM")]
    rows += [(s.step, s.label, s.status, fmt(s.disk_bytes), fmt(s.ram_bytes)) for s in steps]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    todo = [s.disk_bytes for s in steps if s.status != "done" and s.step != "source"]
    disk = sum(d for d in todo if d) if all(d is not None for d in todo) else None
    ram = max((s.ram_bytes for s in steps if s.ram_bytes), default=None)
    lines.append(f"new disk needed: {fmt(disk)}; peak RAM of the largest step: {fmt(ram)} (estimates)")
    return "\n".join(lines)

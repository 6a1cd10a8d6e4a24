"""Size-budget GGUFs: the per-tensor type mix with the least predicted error under a byte budget.

Pure functions first (the budget in bytes, the allocation); the steps that run tools (``make_mix``,
``quantize_mix``) after them. The allocation is a multiple-choice knapsack: every quantized tensor
takes exactly one candidate type, each choice has a measured byte size and a predicted error
(quantkit.sensitivity: the imatrix-weighted error times its role's KLD factor), and the total
bytes must stay under the budget. It is solved exactly by dynamic programming over bytes counted in
``granule`` units (each tensor's bytes rounded *up*, so a solution is always within budget), then the
slack the rounding left is filled greedily with exact bytes. Ties go to the smaller type, then to
the tensor name, so the same tables give the same mix.

The mix is then checked in a closed loop (``make_mix``): its KLD on calibration chunks (never the
evaluation text) against the largest stock llama-quantize type that fits the same budget, paired per
chunk. Where it does not win by more than 3 standard errors, the roles it pushed lowest are priced
again at the types it chose and the knapsack runs once more; if that mix does not win either, the
target is the stock type (same bytes as ``llama-quantize --imatrix``), and mix.json and the report
say so.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit.errors import QuantkitError, VerificationError
from quantkit.ggufinfo import SAME_SIZE
from quantkit.hardware import DEFAULT_HEADROOM, GIB, ModelShape
from quantkit.recipe import GGUFTarget
from quantkit.store import Entry, Staging, Store
from quantkit.toolchain import Toolchain

log = logging.getLogger(__name__)

MIX_STEP = "mix"
QUANTIZE_STEP = "quantize"
MIX_FILE = "tensor-types.txt"
MIX_JSON = "mix.json"
METHOD = "mckp-dp/4"  # /4: experts below gguf.imatrix.min_expert_tokens priced by their layer's pooled importance
# Stock file types a mix stands beside (the largest that fits the budget is the one to beat).
STOCK_FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
CHECK_CHUNKS = 16  # of KLD_CTX tokens: 2048 evaluated, 1024 scored, 16 paired differences
REPRICE_ROLES = 3  # roles measured again when a mix does not win
WIN_SE = 3.0
MAX_CELLS = 1 << 18  # DP resolution: the budget in at most this many granules
PADDING = 32  # GGUF aligns each tensor's data to 32 bytes


class BudgetError(QuantkitError):
    """A target no mix of the candidate types can meet."""


@dataclass(frozen=True)
class Choice:
    type: str
    bytes: int
    error: float


# --- the budget -----------------------------------------------------------------------------------

def budget_bytes(target: GGUFTarget, *, parameters: int, config: dict | None) -> int:
    """The file size (bytes) the target allows. ``bpw`` counts every weight of the GGUF as the report
    does (size * 8 / parameters); ``fits`` takes the KV cache (f16) and the headroom of quantkit.hardware
    from the memory."""
    if target.size_gib is not None:
        return int(target.size_gib * GIB)
    if target.bpw is not None:
        return int(target.bpw * parameters / 8)
    shape = ModelShape.from_config(config or {})
    return int(target.fits.memory_gib * GIB) - shape.kv_cache_bytes(target.fits.ctx) - DEFAULT_HEADROOM


def describe_budget(target: GGUFTarget, size: int) -> str:
    if target.fits is not None:
        return (f"{size / GIB:.3f} GiB of weights (fits {target.fits.memory_gib:g} GiB at {target.fits.ctx} "
                "context with the f16 KV cache and headroom)")
    return f"{size / GIB:.3f} GiB" + (f" ({target.bpw} bits per weight)" if target.bpw is not None else "")


# --- the allocation -------------------------------------------------------------------------------

def options(tables: dict[str, dict], factors: dict[str, float | dict[str, float]] | None = None
            ) -> dict[str, list[Choice]]:
    """Per quantized tensor, its distinct choices from the sensitivity tables (candidate -> table; type
    read back -> bytes, predicted error), ordered by bytes then type. ``factors``: per role, one factor
    or one per candidate type. Candidates that fell back to the same type collapse to one choice."""
    from quantkit.sensitivity import ROUTER_ROLES, calibration_group

    factors = factors or {}
    out: dict[str, dict[str, Choice]] = {}
    for candidate, table in tables.items():
        for name, row in table["tensors"].items():
            if not row["quantized"]:
                continue
            f = factors.get(calibration_group(name), 1.0)
            f = f.get(candidate, 1.0) if isinstance(f, dict) else f
            c = Choice(row["type"], row["bytes"], f * row["error"])
            have = out.setdefault(name, {}).get(c.type)
            if have is None or (c.error, c.bytes) < (have.error, have.bytes):
                out[name][c.type] = c
    ranked = {n: sorted(cs.values(), key=lambda c: (c.bytes, c.type)) for n, cs in sorted(out.items())}
    # MoE routers (tiny, and every token's expert choice goes through them): the most precise candidate only
    return {n: cs[-1:] if calibration_group(n) in ROUTER_ROLES else cs for n, cs in ranked.items()}


def price_uncovered_experts(tables: dict[str, dict], *, counts: dict[int, list[int]], min_tokens: int
                            ) -> tuple[dict[str, dict], dict | None]:
    """The tables with each expert tensor's error raised for the experts that got fewer than ``min_tokens``
    calibration tokens, and a note for mix.json (None when every expert is covered).

    An expert the imatrix saw no token for has zero importance, so its share of the error reads 0 and the
    search would take its layer's expert tensors as cheap to crush: it is unmeasured, not unimportant. Its
    share is priced instead with the layer's pooled importance (every token routed to any expert of the layer,
    sensitivity.read_pooled_importance), never below what it measured itself: as sensitive as an expert of
    that layer the router does use. One tensor holds all of a layer's experts, so the price is the tensor's."""
    from quantkit.experts import describe

    below = sorted((layer, e, n) for layer, cs in counts.items() for e, n in enumerate(cs) if n < min_tokens)
    if not below:
        return tables, None
    by_layer: dict[int, list[int]] = {}
    for layer, e, _ in below:
        by_layer.setdefault(layer, []).append(e)
    out: dict[str, dict] = {}
    repriced: set[str] = set()
    for candidate, table in tables.items():
        rows = dict(table["tensors"])
        for name, row in rows.items():
            m = re.match(r"blk\.(\d+)\.ffn_(?:gate|up|down)_exps\.weight$", name)
            experts = by_layer.get(int(m.group(1))) if m else None
            if not experts or not row.get("quantized"):
                continue
            if "expert_errors_pooled" not in row:
                raise VerificationError(f"sensitivity table {candidate}: {name} has no per-expert errors (measured "
                                        "before quantkit recorded them); remove the stored sensitivity entries")
            own, pooled = row["expert_errors"], row["expert_errors_pooled"]
            extra = sum(max(own[e], pooled[e]) - own[e] for e in experts if e < len(own))
            rows[name] = {**row, "error": row["error"] + extra, "error_measured": row["error"]}
            repriced.add(name)
        out[candidate] = {**table, "tensors": rows}
    note = {"min_tokens": min_tokens, "experts": [list(x) for x in below], "tensors": sorted(repriced),
            "priced_as": "the layer's pooled importance (every routed token), never below their own",
            "note": f"{len(below)} expert(s) got fewer than {min_tokens} calibration tokens in the importance matrix "
                    f"({describe(below)}): unmeasured, not unimportant, so the search priced their share of "
                    f"{len(repriced)} expert tensor(s) with their layer's pooled importance "
                    "instead of the near-zero importance the imatrix gives them"}
    return out, note


def fixed_bytes(tables: dict[str, dict]) -> int:
    """Tensors no candidate quantizes (norms, biases): the same bytes in every mix."""
    table = next(iter(tables.values()))
    return sum(r["bytes"] for r in table["tensors"].values() if not r["quantized"])


def allocate(opts: dict[str, list[Choice]], budget: int, *, granule: int | None = None) -> dict[str, Choice]:
    """The choice per tensor that minimizes the summed error with summed bytes <= ``budget``.

    Exact for the bytes rounded up to ``granule`` (default: the budget over MAX_CELLS, at least 1);
    ``granule=1`` is exact. Raises BudgetError when even the smallest choices do not fit."""
    names = sorted(opts)
    smallest = sum(opts[n][0].bytes for n in names)
    if smallest > budget:
        raise BudgetError(f"the smallest mix takes {smallest} bytes of tensors, over the budget of {budget}")
    granule = granule or max(1, math.ceil(budget / MAX_CELLS))  # sizes are rounded up to this
    cells = budget // granule
    dp = np.zeros(cells + 1)  # least error using at most c granules, over the tensors so far
    picks = []
    for n in names:
        new = np.full(cells + 1, np.inf)
        pick = np.zeros(cells + 1, dtype=np.int8)
        for k, c in enumerate(opts[n]):
            w = -(-c.bytes // granule)
            if w > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[w:] = dp[:cells + 1 - w] + c.error
            better = cand < new  # strict: ties keep the earlier (smaller) choice
            new[better] = cand[better]
            pick[better] = k
        dp = new
        picks.append(pick)
    if not np.isfinite(dp[cells]):  # only the rounding stands in the way: start from the smallest mix
        log.debug("no mix fits %d bytes in %d-byte units; filling up from the smallest mix", budget, granule)
        return _fill(opts, {n: opts[n][0] for n in names}, budget)
    chosen: dict[str, Choice] = {}
    c = cells
    for n, pick in zip(reversed(names), reversed(picks)):
        k = int(pick[c])
        chosen[n] = opts[n][k]
        c -= -(-opts[n][k].bytes // granule)
    return _fill(opts, dict(sorted(chosen.items())), budget)


def _fill(opts: dict[str, list[Choice]], chosen: dict[str, Choice], budget: int) -> dict[str, Choice]:
    """Spend the slack left by rounding: repeatedly take the single upgrade with the best error drop
    per byte that still fits (exact bytes)."""
    used = sum(c.bytes for c in chosen.values())
    while True:
        best = None
        for n, cur in chosen.items():
            for c in opts[n]:
                extra = c.bytes - cur.bytes
                gain = cur.error - c.error
                if gain > 0 and used + extra <= budget:
                    key = (-(gain / max(extra, 1)), n, c.type)
                    if best is None or key < best[0]:
                        best = (key, n, c, extra)
        if best is None:
            return chosen
        _, n, c, extra = best
        chosen[n] = c
        used += extra


# --- the mix step -----------------------------------------------------------------------------------

def main_ftype(chosen: dict[str, Choice]) -> str:
    """The llama-quantize file type named in general.file_type: that of the type holding most bytes."""
    from quantkit.sensitivity import CANDIDATES

    by_type: dict[str, int] = {}
    for c in chosen.values():
        by_type[c.type] = by_type.get(c.type, 0) + c.bytes
    for t, _ in sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0])):
        if t in CANDIDATES:
            return CANDIDATES[t]
    return "Q8_0"


def mix_inputs(*, base: Entry, imatrix: Entry, tables: dict[str, Entry], calibration: Entry, budget: int,
               calibration_sha256: str, toolchain: Toolchain, min_expert_tokens: int = 32) -> dict:
    from quantkit.sensitivity import KLD_CTX

    return {"base_sha256": base.files["model.gguf"].sha256, "imatrix_sha256": imatrix.files["imatrix.gguf"].sha256,
            "tables": {t: e.key for t, e in sorted(tables.items())}, "calibration": calibration.key,
            "budget_bytes": budget, "method": METHOD, "llama_cpp": toolchain.build,
            "min_expert_tokens": min_expert_tokens,
            "check": {"calibration_sha256": calibration_sha256, "ctx": KLD_CTX, "chunks": CHECK_CHUNKS,
                      "stock": list(STOCK_FTYPES), "win_se": WIN_SE, "reprice_roles": REPRICE_ROLES}}


_QUANT_SIZE = re.compile(r"quant size\s*=\s*([0-9.]+) MiB")


def make_mix(*, label: str, target: GGUFTarget, base: Entry, imatrix: Entry, tables: dict[str, Entry],
             calibration: Entry, calibration_text: str, calibration_sha256: str, parameters: int, config: dict | None,
             toolchain: Toolchain, store: Store, threads: int = 1, min_expert_tokens: int = 32) -> Entry:
    """The ``mix`` entry: ``tensor-types.txt`` (llama-quantize's --tensor-type-file) and ``mix.json``
    (budget, predicted bytes and error, the type of every tensor, the closed-loop check and whether the
    target fell back to a stock type), checked with --dry-run. Experts below ``min_expert_tokens`` in the
    imatrix are priced as their layer's routed experts (price_uncovered_experts; mix.json's ``uncovered_experts``)."""
    from quantkit.experts import expert_token_counts
    from quantkit.sensitivity import load_factors, load_table, mix_file_text

    budget = budget_bytes(target, parameters=parameters, config=config)
    inputs = mix_inputs(base=base, imatrix=imatrix, tables=tables, calibration=calibration, budget=budget,
                        calibration_sha256=calibration_sha256, toolchain=toolchain,
                        min_expert_tokens=min_expert_tokens)

    def produce(staging: Staging) -> None:
        import time

        from quantkit.digest import write_json_atomic

        start = time.perf_counter()
        loaded = {t: load_table(e) for t, e in sorted(tables.items())}
        loaded, uncovered = price_uncovered_experts(loaded, counts=expert_token_counts(imatrix.file("imatrix.gguf")),
                                                    min_tokens=min_expert_tokens)
        if uncovered:
            log.warning("%s: %s", label, uncovered["note"])
        factors = load_factors(calibration)
        opts = options(loaded, factors)
        ref = next(iter(loaded.values()))
        overhead = ref["file_bytes"] - ref["tensor_bytes"]  # metadata and padding of a candidate file
        fixed = fixed_bytes(loaded)
        room = budget - overhead - fixed - PADDING * len(ref["tensors"])
        smallest = sum(o[0].bytes for o in opts.values()) + fixed + overhead
        if room < sum(o[0].bytes for o in opts.values()):
            raise BudgetError(f"{label}: no mix meets the budget of {describe_budget(target, budget)}: the smallest "
                              f"mix of the candidate types is {smallest / GIB:.3f} GiB "
                              f"({smallest * 8 / parameters:.2f} bits per weight)")
        chosen = allocate(opts, room)
        loop = ClosedLoop(label=label, base=base, imatrix=imatrix, text=calibration_text, budget=budget,
                          workdir=staging.path / "check", toolchain=toolchain, threads=threads)
        try:
            check = loop.check(chosen, round_=1)
            rounds = [check] if check is not None else []
            if check is not None and not check["win"]:
                opts = loop.reprice(opts, chosen)
                again = allocate(opts, room)
                if again != chosen:
                    chosen = again
                    check = loop.check(chosen, round_=2)
                    rounds.append(check)
        finally:
            loop.close()
        fallback = None
        if check is not None and not check["win"]:
            fallback = {"stock": loop.stock, "reason": f"no searched mix beat stock {loop.stock} on calibration "
                        f"chunks by more than {WIN_SE:g} standard errors (paired per chunk)"}
            assignment, ftype = dict(loop.stock_types), loop.stock
            tensor_bytes = loop.stock_tensor_bytes
            log.warning("%s: %s; the target is stock %s", label, fallback["reason"], loop.stock)
        else:
            assignment, ftype = {n: c.type for n, c in chosen.items()}, main_ftype(chosen)
            tensor_bytes = sum(c.bytes for c in chosen.values()) + fixed
        (staging.path / MIX_FILE).write_text(mix_file_text(assignment))
        # Confirm with llama-quantize itself, before a byte is written: same types, same total.
        dry_mib = dry_run_mib(label=label, base=base, imatrix=imatrix, assignment=assignment, ftype=ftype,
                              workdir=staging.path, toolchain=toolchain, threads=threads)
        if abs(dry_mib - tensor_bytes / 2**20) > 0.01:
            raise VerificationError(f"{label}: llama-quantize --dry-run sizes the mix at {dry_mib:.2f} MiB of tensors, "
                                    f"the search at {tensor_bytes / 2**20:.2f} MiB")
        counts: dict[str, int] = {}
        for t in assignment.values():
            counts[t] = counts.get(t, 0) + 1
        value = {"label": label, "method": METHOD, "target": target.model_dump(mode="json", exclude_none=True),
                 "budget_bytes": budget, "predicted_file_bytes": tensor_bytes + overhead,
                 "dry_run_tensor_mib": dry_mib, "ftype": ftype,
                 "predicted_error": sum(c.error for c in chosen.values()), "factors": factors,
                 "type_counts": dict(sorted(counts.items())), "check": rounds, "fallback": fallback,
                 "uncovered_experts": uncovered, "tensors": assignment}
        write_json_atomic(staging.path / MIX_JSON, value)
        staging.info.update(tool=toolchain.version, seconds=round(time.perf_counter() - start, 3),
                            check_seconds=round(loop.seconds, 3), kld_runs=loop.runs,
                            mix={k: value[k] for k in ("budget_bytes", "predicted_file_bytes", "ftype", "type_counts",
                                                       "fallback", "uncovered_experts")})

    entry = store.ensure(MIX_STEP, inputs, produce)
    log.info("mix %s: %s (budget %s, predicted %.1f MiB)%s", label, "reused" if entry.reused else "searched",
             describe_budget(target, budget), entry.info["mix"]["predicted_file_bytes"] / 2**20,
             f"; fell back to stock {entry.info['mix']['fallback']['stock']}" if entry.info["mix"].get("fallback")
             else "")
    return entry


def dry_run_mib(*, label: str, base: Entry, imatrix: Entry, assignment: dict[str, str] | None, ftype: str,
                workdir: Path, toolchain: Toolchain, threads: int) -> float:
    """MiB of tensors llama-quantize --dry-run reports for ``ftype`` (with ``assignment`` pinned if given)."""
    from quantkit.proc import run_tool
    from quantkit.sensitivity import IMATRIX_LINK, quantize_with_mix

    if assignment is not None:
        run = quantize_with_mix(base_gguf=base.file("model.gguf"), imatrix_gguf=imatrix.file("imatrix.gguf"),
                                assignment=assignment, ftype=ftype, workdir=workdir, out_name="",
                                toolchain=toolchain, threads=threads, dry_run=True)
    else:
        link = workdir / IMATRIX_LINK
        link.unlink(missing_ok=True)
        link.symlink_to(imatrix.file("imatrix.gguf"))
        try:
            run = run_tool([toolchain.binary("llama-quantize"), "--dry-run", "--imatrix", IMATRIX_LINK,
                            base.file("model.gguf"), ftype, str(threads)], cwd=workdir)
        finally:
            link.unlink(missing_ok=True)
    m = _QUANT_SIZE.findall(run.output_tail)
    if not m:
        raise VerificationError(f"{label}: llama-quantize --dry-run printed no quant size:\n{run.output_tail}")
    return float(m[-1])


class ClosedLoop:
    """The mix against the stock type that fits the same budget, on calibration chunks (the text's
    check half, quantkit.sensitivity.halves), paired per chunk."""

    def __init__(self, *, label: str, base: Entry, imatrix: Entry, text: str, budget: int, workdir: Path,
                 toolchain: Toolchain, threads: int):
        import time

        from quantkit.sensitivity import KLDProbe, halves

        self.label, self.base, self.imatrix, self.budget = label, base, imatrix, budget
        self.workdir, self.toolchain, self.threads = workdir, toolchain, threads
        workdir.mkdir(parents=True, exist_ok=True)
        self.probe = KLDProbe(base_gguf=base.file("model.gguf"), imatrix_gguf=imatrix.file("imatrix.gguf"),
                              text=halves(text)[0], chunks=CHECK_CHUNKS, workdir=workdir, toolchain=toolchain,
                              threads=threads)
        self.stock: str | None = None
        self.stock_types: dict[str, str] = {}
        self.stock_tensor_bytes = 0
        self.stock_kld: list[float] | None = None
        self.started = time.perf_counter()
        self.seconds = 0.0

    @property
    def runs(self) -> int:
        return self.probe.runs

    def _stock(self) -> bool:
        """Quantize the largest stock type whose file fits the budget and measure it once."""
        from quantkit.proc import run_tool
        from quantkit.sensitivity import IMATRIX_LINK, read_tensors

        if self.stock_kld is not None:
            return True
        sizes = {f: dry_run_mib(label=self.label, base=self.base, imatrix=self.imatrix, assignment=None, ftype=f,
                                workdir=self.workdir, toolchain=self.toolchain, threads=self.threads)
                 for f in STOCK_FTYPES}
        for ftype in sorted(sizes, key=lambda f: -sizes[f]):
            # The stock type of the target's own size counts (the issue: "the same or larger size"): a file a few
            # metadata bytes over a budget matched to it is that type, not the next smaller one
            if sizes[ftype] * 2**20 > self.budget * SAME_SIZE:  # tensors alone over the budget: the file is too
                continue
            work = self.workdir / "stock"
            work.mkdir(exist_ok=True)
            link = work / IMATRIX_LINK
            link.unlink(missing_ok=True)
            link.symlink_to(self.imatrix.file("imatrix.gguf"))
            try:
                run_tool([self.toolchain.binary("llama-quantize"), "--imatrix", IMATRIX_LINK, self.base.file("model.gguf"),
                          "model.gguf", ftype, str(self.threads)], cwd=work)
            finally:
                link.unlink(missing_ok=True)
            gguf = work / "model.gguf"
            if gguf.stat().st_size > self.budget * SAME_SIZE:
                gguf.unlink()
                continue
            base_types = {n: t for n, (t, _) in read_tensors(self.base.file("model.gguf")).items()}
            from gguf.constants import GGMLQuantizationType

            tensors = read_tensors(gguf)
            self.stock_types = {n: GGMLQuantizationType(t).name.lower() for n, (t, _) in tensors.items()
                                if t != base_types[n]}
            self.stock_tensor_bytes = sum(int(raw.nbytes) for _, raw in tensors.values())
            self.stock_bytes = {n: int(raw.nbytes) for n, (_, raw) in tensors.items()}
            self.stock, self.stock_file_bytes = ftype, gguf.stat().st_size
            self.stock_kld = self.probe.measure(gguf, "stock")
            gguf.unlink()
            return True
        return False

    def check(self, chosen: dict[str, Choice], *, round_: int) -> dict | None:
        """The mix's per-chunk KLD against the stock type's; None when no stock type fits the budget."""
        import time

        from quantkit.sensitivity import KLD_CTX, paired

        if not self._stock():
            log.info("%s: no stock type fits the budget; the mix is not checked against one", self.label)
            return None
        what = f"mix-{round_}"
        mix = self.probe.quantize({n: c.type for n, c in chosen.items()}, what, ftype=main_ftype(chosen))
        try:
            kld = self.probe.measure(mix, what)
        finally:
            mix.unlink(missing_ok=True)
        diff, se, n = paired(kld, self.stock_kld)
        win = diff < 0 and -diff > WIN_SE * se
        self.seconds = time.perf_counter() - self.started
        log.info("%s: round %d, mix - stock %s KLD on %d calibration chunks: %+.5f ± %.5f (%s)", self.label, round_,
                 self.stock, n, diff, se, "win" if win else "no win")
        return {"round": round_, "stock": self.stock, "stock_file_bytes": self.stock_file_bytes,
                "chunks": n, "ctx": KLD_CTX,
                "mix_kld": float(sum(kld[:n]) / n), "stock_kld": float(sum(self.stock_kld[:n]) / n),
                "diff": diff, "se": se, "win": win}

    def reprice(self, opts: dict[str, list[Choice]], chosen: dict[str, Choice]) -> dict[str, list[Choice]]:
        """Measure the roles the mix pushed lowest (fewest bytes against the stock type's, per role) at the
        types it chose, each alone in the base; scale their prices by measured / predicted KLD."""
        import time

        from quantkit.sensitivity import calibration_group

        roles: dict[str, list[str]] = {}
        for n in chosen:
            roles.setdefault(calibration_group(n), []).append(n)
        ratio = {g: sum(chosen[n].bytes for n in ns) / max(1, sum(self.stock_bytes.get(n, chosen[n].bytes) for n in ns))
                 for g, ns in roles.items()}
        lowest = [g for g in sorted(ratio, key=lambda g: (ratio[g], g)) if ratio[g] < 1][:REPRICE_ROLES]
        out = dict(opts)
        self.repriced = {}
        for g in lowest:
            members = roles[g]
            kld = self.probe.assignment_kld({n: chosen[n].type for n in members}, f"role-{g}")
            measured = sum(kld) / len(kld)
            predicted = sum(chosen[n].error for n in members)
            scale = measured / predicted if predicted > 0 else 1.0
            types = {chosen[n].type for n in members}
            for n in members:
                out[n] = [Choice(c.type, c.bytes, c.error * scale) if c.type in types else c for c in opts[n]]
            self.repriced[g] = {"measured_kld": measured, "predicted_kld": predicted, "scale": scale,
                                "types": sorted(types)}
            log.info("%s: role %s at %s: KLD %.5f measured, %.5f predicted: prices x %.2f", self.label, g,
                     "/".join(sorted(types)), measured, predicted, scale)
        self.seconds = time.perf_counter() - self.started
        return out

    def close(self) -> None:
        import shutil

        self.probe.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def load_mix(entry: Entry) -> dict:
    return json.loads(entry.file(MIX_JSON).read_text())


def quantize_mix_inputs(*, base: Entry, imatrix: Entry, mix: Entry, toolchain: Toolchain) -> dict:
    return {"base_sha256": base.files["model.gguf"].sha256, "imatrix_sha256": imatrix.files["imatrix.gguf"].sha256,
            "tensor_types_sha256": mix.files[MIX_FILE].sha256, "ftype": mix.info["mix"]["ftype"],
            "llama_cpp": toolchain.commit}


def quantize_mix(*, label: str, base: Entry, imatrix: Entry, mix: Entry, toolchain: Toolchain, store: Store,
                 threads: int = 1) -> Entry:
    """The GGUF of a mix: ``model.gguf`` with its ``tensor-types.txt`` beside it, checked by reading back
    every tensor's type and the file's size against the budget."""
    from quantkit.ggufinfo import read_gguf
    from quantkit.quanttypes import QUANT_TYPES
    from quantkit.sensitivity import quantize_with_mix

    plan = load_mix(mix)
    inputs = quantize_mix_inputs(base=base, imatrix=imatrix, mix=mix, toolchain=toolchain)

    def produce(staging: Staging) -> None:
        from gguf import GGUFReader

        run = quantize_with_mix(base_gguf=base.file("model.gguf"), imatrix_gguf=imatrix.file("imatrix.gguf"),
                                assignment=plan["tensors"], ftype=plan["ftype"], workdir=staging.path,
                                out_name="model.gguf", toolchain=toolchain, threads=threads)
        out = staging.path / "model.gguf"
        got = {t.name: t.tensor_type.name.lower() for t in GGUFReader(out).tensors}
        wrong = [f"{n}: {got.get(n)} (want {t})" for n, t in plan["tensors"].items() if got.get(n) != t]
        if wrong:
            raise VerificationError(f"{label}: llama-quantize did not follow the mix: {'; '.join(wrong[:5])}")
        size = out.stat().st_size
        if size > plan["budget_bytes"]:
            raise VerificationError(f"{label}: the GGUF has {size} bytes, over its budget of {plan['budget_bytes']}")
        info = read_gguf(out)
        if info.file_type != QUANT_TYPES[plan["ftype"]].ftype:
            raise VerificationError(f"{label}: file type {info.file_type}, expected {plan['ftype']}")
        staging.info.update(tool=toolchain.version, seconds=round(run.seconds, 3),
                            peak_rss_mib=round(run.peak_rss_mib, 1), threads=threads,
                            gguf={"file_type": info.file_type, "parameters": info.parameters,
                                  "tensor_types": info.tensor_types},
                            mix={"label": label, "target": plan["target"], "budget_bytes": plan["budget_bytes"],
                                 "file": MIX_FILE, "mix_key": mix.key, "type_counts": plan["type_counts"],
                                 "check": plan.get("check"), "fallback": plan.get("fallback"),
                                 "uncovered_experts": plan.get("uncovered_experts"), "tensors": plan["tensors"]})

    entry = store.ensure(QUANTIZE_STEP, inputs, produce)
    log.info("quantize %s: %s (%.1f MiB, budget %.1f MiB)", label, "reused" if entry.reused else "built",
             entry.files["model.gguf"].size / 2**20, plan["budget_bytes"] / 2**20)
    return entry


def mix_summary(tensors: dict[str, str]) -> list[dict]:
    """Rows for a model card: tensor role (name without the layer) -> type -> which layers."""
    rows: dict[tuple[str, str], list[int | None]] = {}
    for name, t in tensors.items():
        m = re.match(r"blk\.(\d+)\.(.+)$", name)
        role, layer = (m.group(2), int(m.group(1))) if m else (name, None)
        rows.setdefault((role.removesuffix(".weight"), t), []).append(layer)
    out = []
    for (role, t), layers in sorted(rows.items()):
        ls = sorted(x for x in layers if x is not None)
        out.append({"tensor": role, "type": t, "layers": _ranges(ls) if ls else "-", "count": len(layers)})
    return out


def _ranges(xs: list[int]) -> str:
    parts, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            parts.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


def store_path_of(entry: Entry) -> Path:
    return entry.file(MIX_FILE)


# --- graph glue (quantkit.graph's sensitivity-kld, mix nodes) -----------------------------------------

def _tables(node, deps) -> dict[str, Entry]:
    """Each candidate type's sensitivity table, by type (the graph names their nodes in the node's params)."""
    return {t: deps[name] for t, name in node.params["tables"]}


def calibrate_node(ctx, node, deps, *, run: bool):
    """The sensitivity-kld node: its store inputs (``run=False``) or its entry."""
    from quantkit.sensitivity import calibrate_groups, calibration_inputs

    calib = deps["source"].calibration
    kw = dict(base=deps["convert"], imatrix=deps["imatrix"], tables=_tables(node, deps), calibration_sha256=calib.sha256,
              toolchain=ctx.tools)
    if not run:
        return calibration_inputs(**kw)
    return calibrate_groups(**kw, calibration_text=calib.text, store=ctx.store, threads=ctx.threads)


def _model_config(deps) -> dict:
    f = deps["source"].model.path / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def mix_node(ctx, node, deps, *, run: bool):
    """The mix node: its store inputs (``run=False``) or its entry."""
    target = ctx.recipe.gguf.targets[node.params["index"]]
    parameters = deps["convert"].info["gguf"]["parameters"]
    config = _model_config(deps)
    calib = deps["source"].calibration
    min_tokens = ctx.recipe.gguf.imatrix.min_expert_tokens
    if not run:
        budget = budget_bytes(target, parameters=parameters, config=config)
        return mix_inputs(base=deps["convert"], imatrix=deps["imatrix"], tables=_tables(node, deps),
                          calibration=deps["sensitivity-kld"], budget=budget, calibration_sha256=calib.sha256,
                          toolchain=ctx.tools, min_expert_tokens=min_tokens)
    return make_mix(label=node.label, target=target, base=deps["convert"], imatrix=deps["imatrix"],
                    tables=_tables(node, deps), calibration=deps["sensitivity-kld"], calibration_text=calib.text,
                    calibration_sha256=calib.sha256, parameters=parameters, config=config, toolchain=ctx.tools,
                    store=ctx.store, threads=ctx.threads, min_expert_tokens=min_tokens)


def check_target(target: GGUFTarget, *, parameters: int, config: dict | None, where: str) -> int:
    """The budget in bytes; BudgetError when it is below the smallest candidate everywhere (known only
    once the model's size is: the plan and the preflight call this, validation cannot)."""
    from quantkit.recipe import MIN_TARGET_BPW

    budget = budget_bytes(target, parameters=parameters, config=config)
    floor = int(MIN_TARGET_BPW * parameters / 8)
    if budget < floor:
        raise BudgetError(f"{where}: no mix can meet {describe_budget(target, max(budget, 0))}: even all tensors at "
                          f"Q2_K take about {floor / GIB:.3f} GiB for this model's {parameters:,} weights "
                          f"(fix: raise the budget to at least {floor / GIB:.3f} GiB of weights)")
    return budget

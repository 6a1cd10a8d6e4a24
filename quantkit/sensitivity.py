"""Per-tensor sensitivity: what each candidate type costs each tensor, measured with the real tools.

For one candidate ggml type, ``llama-quantize --pure`` (with the run's importance matrix) turns the base
GGUF into that type everywhere it can (a tensor whose width the type's block does not divide falls back
the way llama.cpp decides, and the type read back is the one recorded). Each tensor is read back with
gguf-py, dequantized with ``gguf.quants.dequantize`` and compared with the base weights, the squared
error of every input column weighted by that column's mean squared activation from the importance
matrix (llama-imatrix's ``in_sum2 / counts``)::

    error(W, Q) = sum_rows sum_cols imp[col] * (W - deq(Q))[row, col]**2

which is the expected squared error of the tensor's output on calibration activations, if inputs
were uncorrelated. Tensors the imatrix does not see (the token embedding, a get_rows lookup) get
weight 1 per column. The proxy's scale differs between tensor roles (measured: 10x between attention
and feed-forward on SmolLM2), so ``calibrate_groups`` measures real KL divergence for each role (on calibration text, never the held-out evaluation
text) and turns it into one factor per group.

Both are stored steps (``sensitivity``, ``sensitivity-kld``) keyed by the base GGUF's sha256, the
imatrix's sha256, the type and the llama.cpp commit: reused across targets, recipes and runs.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from quantkit.errors import VerificationError
from quantkit.proc import run_tool
from quantkit.store import Entry, Staging, Store
from quantkit.toolchain import Toolchain

log = logging.getLogger(__name__)

STEP = "sensitivity"
KLD_STEP = "sensitivity-kld"
METHOD = "imatrix-weighted-sse/1"
KLD_METHOD = "role-kld/3"
IMATRIX_LINK = "imatrix.gguf"

# Candidate tensor types and the llama-quantize file type whose --pure run puts that type everywhere.
CANDIDATES: dict[str, str] = {
    "q2_k": "Q2_K", "q3_k": "Q3_K_M", "iq4_xs": "IQ4_XS", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M",
    "q6_k": "Q6_K", "q8_0": "Q8_0",
}
GROUPS = ("token_embd", "output", "attn", "ffn", "ffn_exps", "ffn_shexp", "router", "other")
# Mixture-of-experts roles, llama.cpp's names. A layer's routed experts are one 3-D tensor per projection, so
# a role's type applies to all its experts. Each role is a calibration_group of its own: the per-role KLD
# check measures routed gate/up/down, shared expert and dense ffn apart (community measurements find the
# expert down-projections far more sensitive than gate/up). The router ffn_gate_inp is never quantized by
# llama-quantize (src/llama-quant.cpp keeps it in F32); a shared expert's gate (ffn_gate_inp_shexp) would
# be, so budget.options keeps routers at their most precise candidate.
EXPERT_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
SHARED_EXPERT_ROLES = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
ROUTER_ROLES = ("ffn_gate_inp", "ffn_gate_inp_shexp")
# calibrate_groups: the group under test goes to PROBE_TYPE, everything else to REFERENCE_TYPE.
PROBE_TYPE = "q3_k"
REFERENCE_TYPE = "q8_0"


def calibration_group(name: str) -> str:
    """The group a KLD factor is measured for: the tensor's role (attn_q, attn_v, ffn_down, token_embd...),
    all layers together. Roles differ in how their error reaches the logits (attn_v and ffn_down write
    into the residual stream; q and k only move attention weights), which the proxy cannot see."""
    m = re.match(r"blk\.\d+\.(.+?)(\.weight)?$", name)
    return m.group(1) if m else name.removesuffix(".weight")


def tensor_group(name: str) -> str:
    if name.startswith("token_embd"):
        return "token_embd"
    if name.startswith("output."):
        return "output"
    if ".attn_" in name:
        return "attn"
    role = calibration_group(name)
    if role in ROUTER_ROLES:
        return "router"
    if role in EXPERT_ROLES:
        return "ffn_exps"
    if role in SHARED_EXPERT_ROLES:
        return "ffn_shexp"
    if ".ffn_" in name:
        return "ffn"
    return "other"


# --- the importance matrix ---------------------------------------------------------------------------

def read_importance(imatrix_gguf: Path) -> dict[str, np.ndarray]:
    """Per weight tensor, the mean squared input activation per column: shape (n_mat, n_cols).

    The pinned llama-imatrix writes GGUF: for each tensor ``<name>.in_sum2`` (sum of squared inputs over
    the tokens it saw, per column and per expert) and ``<name>.counts`` (tokens per expert)."""
    from gguf import GGUFReader

    reader = GGUFReader(imatrix_gguf)
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = np.asarray(t.data, dtype=np.float64)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = np.asarray(t.data, dtype=np.float64).reshape(-1)
    if not sums:
        raise VerificationError(f"{imatrix_gguf} holds no '<tensor>.in_sum2' entries: not a GGUF importance matrix")
    out = {}
    for name, s in sums.items():
        c = counts.get(name)
        s2 = s.reshape(len(c) if c is not None else 1, -1)
        n = np.maximum(c if c is not None else np.ones(1), 1.0)[:, None]
        out[name] = s2 / n
    return out


# --- one candidate type ------------------------------------------------------------------------------

def sensitivity_inputs(*, base: Entry, imatrix: Entry, tensor_type: str, toolchain: Toolchain) -> dict:
    return {"base_sha256": base.files["model.gguf"].sha256, "imatrix_sha256": imatrix.files["imatrix.gguf"].sha256,
            "type": tensor_type, "method": METHOD, "llama_cpp": toolchain.commit}


ROWS_PER_BLOCK = 4096  # rows compared at a time: bounds memory on large embeddings


def tensor_errors(*, base_gguf: Path, quant_gguf: Path, importance: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per tensor of ``quant_gguf``: its type, bytes, elements, group and (for quantized tensors) the
    importance-weighted squared error against ``base_gguf`` and the weighted energy of the base."""
    from gguf import GGMLQuantizationType, GGUFReader

    base = {t.name: t for t in GGUFReader(base_gguf).tensors}
    out: dict[str, dict] = {}
    for t in GGUFReader(quant_gguf).tensors:
        b = base[t.name]
        row = {"type": t.tensor_type.name.lower(), "bytes": int(t.n_bytes), "elements": int(t.n_elements),
               "group": tensor_group(t.name), "quantized": t.tensor_type != b.tensor_type}
        if row["quantized"]:
            imp = importance.get(t.name)
            row["weighted"] = imp is not None
            row["error"], row["energy"] = _weighted_error(
                np.asarray(b.data), GGMLQuantizationType(b.tensor_type), np.asarray(t.data),
                GGMLQuantizationType(t.tensor_type), imp)
        out[t.name] = row
    return out


def _weighted_error(base_raw: np.ndarray, base_type, quant_raw: np.ndarray, quant_type,
                    imp: np.ndarray | None) -> tuple[float, float]:
    """sum imp[col] * (W - Q)**2 and sum imp[col] * W**2 over a tensor, a block of rows at a time."""
    from gguf.quants import dequantize

    base_rows = base_raw.reshape(-1, base_raw.shape[-1])
    quant_rows = quant_raw.reshape(-1, quant_raw.shape[-1])
    n_rows = base_rows.shape[0]
    n_mat = 1 if imp is None else imp.shape[0]
    per_mat = n_rows // n_mat
    err = energy = 0.0
    for r0 in range(0, n_rows, ROWS_PER_BLOCK):
        r1 = min(n_rows, r0 + ROWS_PER_BLOCK)
        w = dequantize(base_rows[r0:r1], base_type).astype(np.float64)
        q = dequantize(quant_rows[r0:r1], quant_type).astype(np.float64)
        d2, e2 = np.square(w - q), np.square(w)
        if imp is None:
            err += float(d2.sum())
            energy += float(e2.sum())
            continue
        mats = np.arange(r0, r1) // per_mat  # the expert of each row (0 for a plain matrix)
        weights = imp[mats]
        err += float((d2 * weights).sum())
        energy += float((e2 * weights).sum())
    return err, energy


def measure(*, base: Entry, imatrix: Entry, tensor_type: str, toolchain: Toolchain, store: Store,
            threads: int | None = None) -> Entry:
    """The ``sensitivity`` entry of ``tensor_type``: ``sensitivity.json`` with every tensor's row."""
    if tensor_type not in CANDIDATES:
        raise ValueError(f"{tensor_type} is not a candidate type ({', '.join(CANDIDATES)})")
    inputs = sensitivity_inputs(base=base, imatrix=imatrix, tensor_type=tensor_type, toolchain=toolchain)
    threads = threads or os.cpu_count() or 1

    def produce(staging: Staging) -> None:
        from quantkit.digest import write_json_atomic

        out = staging.path / "pure.gguf"
        link = staging.path / IMATRIX_LINK
        link.symlink_to(imatrix.file("imatrix.gguf"))
        try:
            run = run_tool([toolchain.binary("llama-quantize"), "--pure", "--imatrix", IMATRIX_LINK,
                            base.file("model.gguf"), out.name, CANDIDATES[tensor_type], str(threads)], cwd=staging.path)
            start = time.perf_counter()
            tensors = tensor_errors(base_gguf=base.file("model.gguf"), quant_gguf=out,
                                    importance=read_importance(imatrix.file("imatrix.gguf")))
            compare_s = time.perf_counter() - start
            file_bytes = out.stat().st_size
        finally:
            link.unlink(missing_ok=True)
            out.unlink(missing_ok=True)  # the numbers are the result; the file is rebuilt in a second if wanted
        value = {"type": tensor_type, "ftype": CANDIDATES[tensor_type], "method": METHOD, "file_bytes": file_bytes,
                 "tensor_bytes": sum(r["bytes"] for r in tensors.values()), "tensors": tensors}
        write_json_atomic(staging.path / "sensitivity.json", value)
        staging.info.update(tool=toolchain.version, seconds=round(run.seconds + compare_s, 3),
                            quantize_seconds=round(run.seconds, 3), compare_seconds=round(compare_s, 3),
                            threads=threads, type=tensor_type)

    entry = store.ensure(STEP, inputs, produce)
    log.info("sensitivity %s: %s", tensor_type, "reused" if entry.reused else
             f"measured in {entry.info.get('seconds', 0):.1f}s")
    return entry


def load_table(entry: Entry) -> dict:
    import json

    return json.loads(entry.file("sensitivity.json").read_text())


# --- checking the proxy against KL divergence, per tensor group --------------------------------------

def calibration_inputs(*, base: Entry, imatrix: Entry, tables: dict[str, Entry], calibration_sha256: str,
                       ctx: int, chunks: int, toolchain: Toolchain) -> dict:
    return {"base_sha256": base.files["model.gguf"].sha256, "imatrix_sha256": imatrix.files["imatrix.gguf"].sha256,
            "tables": {t: e.key for t, e in sorted(tables.items())}, "calibration_sha256": calibration_sha256,
            "ctx": ctx, "chunks": chunks, "probe": PROBE_TYPE, "reference": REFERENCE_TYPE, "method": KLD_METHOD,
            "llama_cpp": toolchain.build}


def mix_file_text(assignment: dict[str, str]) -> str:
    """llama-quantize's --tensor-type-file: ``pattern=type`` separated by whitespace (tools/quantize/
    quantize.cpp, parse_tensor_type_file). Patterns are std::regex searched in the tensor name, first
    match wins, so each is anchored to one exact name."""
    return "".join(f"^{name.replace('.', chr(92) + '.')}$={ttype}\n" for name, ttype in sorted(assignment.items()))


def quantize_with_mix(*, base_gguf: Path, imatrix_gguf: Path, assignment: dict[str, str], ftype: str, workdir: Path,
                      out_name: str, toolchain: Toolchain, threads: int, dry_run: bool = False):
    """llama-quantize with a --tensor-type-file pinning every tensor in ``assignment`` (run in ``workdir``)."""
    mix = workdir / "tensor-types.txt"
    mix.write_text(mix_file_text(assignment))
    link = workdir / IMATRIX_LINK
    link.unlink(missing_ok=True)
    link.symlink_to(imatrix_gguf)
    try:
        cmd = [toolchain.binary("llama-quantize"), *(["--dry-run"] if dry_run else []), "--imatrix", IMATRIX_LINK,
               "--tensor-type-file", mix.name, base_gguf, *([] if dry_run else [out_name]), ftype, str(threads)]
        return run_tool(cmd, cwd=workdir)
    finally:
        link.unlink(missing_ok=True)


def calibrate_groups(*, base: Entry, imatrix: Entry, tables: dict[str, Entry], calibration_text: str,
                     calibration_sha256: str, ctx: int, chunks: int, toolchain: Toolchain, store: Store,
                     threads: int | None = None) -> Entry:
    """Measured KLD per tensor group (``calibration_group``: one per role) -> one factor per group (KLD per
    unit of proxy error).

    The reference model has every quantized tensor at q8_0; for each group a model has that group at
    q3_k and the rest at q8_0. ``factor[g] = (KLD_g - KLD_ref) / (proxy_g(q3_k) - proxy_g(q8_0))``."""
    from quantkit.scoring.llamacpp import base_logits, perplexity_until_parsed

    inputs = calibration_inputs(base=base, imatrix=imatrix, tables=tables, calibration_sha256=calibration_sha256,
                                ctx=ctx, chunks=chunks, toolchain=toolchain)
    threads = threads or os.cpu_count() or 1
    probe, ref = load_table(tables[PROBE_TYPE])["tensors"], load_table(tables[REFERENCE_TYPE])["tensors"]

    def produce(staging: Staging) -> None:
        from quantkit.digest import write_json_atomic

        start = time.perf_counter()
        text = staging.path / "calibration.txt"
        text.write_text(calibration_text, encoding="utf-8")
        # One chunk more than is measured: llama-perplexity can lose its last lines at exit (see
        # quantkit.scoring.llamacpp._perplexity), but the running mean after chunk ``chunks`` is printed
        # before the last chunk is computed, so it is always there.
        spec = SimpleNamespace(ctx=ctx, max_tokens=ctx * (chunks + 1))
        logits = base_logits(base_gguf=base.file("model.gguf"), text_file=text, spec=spec, toolchain=toolchain,
                             workdir=staging.path / "logits", threads=threads)
        quantized = sorted(n for n, r in ref.items() if r["quantized"])
        present = sorted({calibration_group(n) for n in quantized})

        def kld(assignment: dict[str, str], what: str) -> dict:
            work = staging.path / what
            work.mkdir()
            quantize_with_mix(base_gguf=base.file("model.gguf"), imatrix_gguf=imatrix.file("imatrix.gguf"),
                              assignment=assignment, ftype=CANDIDATES[REFERENCE_TYPE], workdir=work,
                              out_name="model.gguf", toolchain=toolchain, threads=threads)
            args = ["-m", work / "model.gguf", "--kl-divergence-base", logits, "--kl-divergence", "-c", str(ctx)]
            mean, err = perplexity_until_parsed(args, workdir=work, toolchain=toolchain, threads=threads, what=what,
                                                parse=lambda text, seconds: running_kld(text, chunks))
            (work / "model.gguf").unlink()
            return {"kld_mean": mean, "kld_mean_err": err}

        reference = kld({n: ref[n]["type"] for n in quantized}, "reference")
        groups = {}
        for g in present:
            members = [n for n in quantized if calibration_group(n) == g]
            assignment = {n: (probe[n]["type"] if calibration_group(n) == g else ref[n]["type"]) for n in quantized}
            measured = kld(assignment, f"group-{g}")
            proxy = sum(probe[n]["error"] - ref[n]["error"] for n in members)
            delta = measured["kld_mean"] - reference["kld_mean"]
            groups[g] = {"tensors": len(members), "proxy": proxy, "kld_mean": measured["kld_mean"],
                         "kld_mean_err": measured["kld_mean_err"], "kld_delta": delta,
                         "factor": delta / proxy if proxy > 0 and delta > 0 else None}
        known = sorted(v["factor"] for v in groups.values() if v["factor"] is not None)
        fallback = known[len(known) // 2] if known else 1.0
        for v in groups.values():
            if v["factor"] is None:  # no measurable change: the proxy's median scale, not zero
                v["factor"] = fallback
                v["note"] = "KLD change not measurable; median factor used"
        shutil_rm(staging.path / "logits")
        value = {"method": KLD_METHOD, "probe": PROBE_TYPE, "reference_type": REFERENCE_TYPE,
                 "reference": reference, "groups": groups, "ctx": ctx, "chunks": chunks}
        write_json_atomic(staging.path / "calibration.json", value)
        staging.info.update(tool=toolchain.version, seconds=round(time.perf_counter() - start, 3), threads=threads)
        for d in list(staging.path.iterdir()):
            if d.is_dir():
                shutil_rm(d)

    entry = store.ensure(KLD_STEP, inputs, produce)
    log.info("sensitivity check against KLD: %s", "reused" if entry.reused else f"measured in "
             f"{entry.info.get('seconds', 0):.1f}s")
    return entry


# llama-perplexity --kl-divergence, after each chunk: chunk, PPL ± err, ln(PPL(Q)/PPL(base)) ± err,
# mean KLD so far ± err, ... (tools/perplexity/perplexity.cpp, kl_divergence)
_CHUNK_LINE = re.compile(r"^\s*(\d+)\s+[-\d.naif]+ ±\s+[-\d.naif]+\s+[-\d.naif]+ ±\s+[-\d.naif]+\s+([-\d.]+) ±\s+([-\d.]+)",
                         re.MULTILINE)


def running_kld(text: str, chunk: int) -> tuple[float, float]:
    """The mean KLD (and its error) over the first ``chunk`` chunks, from the per-chunk lines."""
    for m in _CHUNK_LINE.finditer(text):
        if int(m.group(1)) == chunk:
            return float(m.group(2)), float(m.group(3))
    raise VerificationError(f"llama-perplexity printed no KL divergence line for chunk {chunk}")


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_factors(entry: Entry) -> dict[str, float]:
    import json

    groups = json.loads(entry.file("calibration.json").read_text())["groups"]
    return {g: v["factor"] for g, v in groups.items()}

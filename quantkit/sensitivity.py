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
weight 1 per column. The proxy's scale differs between tensor roles (measured: 60x between attn_v and
ffn_down on SmolLM2) and between types (a role's KLD does not grow in proportion to its error from q4_k
down to q2_k), so ``calibrate_groups`` measures real KL divergence for each role at each probe type
(q2_k, q3_k, q4_k; on calibration text, never the evaluation text): one factor per role and probe.

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
# /2: expert tensors also record each expert's error, with its own importance and with the layer's pooled one
METHOD = "imatrix-weighted-sse/2"
KLD_METHOD = "role-kld/4"
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
# calibrate_groups: the role under test goes to each probe type, everything else stays as in the base
# (so the reference is the base itself, KLD 0, and needs no run of its own).
PROBES = ("q2_k", "q3_k", "q4_k")
# Which probe prices each candidate: the nearest in bits per weight (above q4_k the q4_k factor holds:
# small errors, where KLD is closest to proportional to the proxy).
PRICED_BY = {"q2_k": "q2_k", "q3_k": "q3_k", "iq4_xs": "q4_k", "q4_k": "q4_k", "q5_k": "q4_k", "q6_k": "q4_k",
             "q8_0": "q4_k"}
# KLD measurements on calibration text: short chunks, many of them, so a per-chunk paired error exists.
# Probes read the text's second half, the closed-loop check (quantkit.budget) its first half.
KLD_CTX = 128
PROBE_CHUNKS = 4  # 512 tokens evaluated, 256 scored, per probe: about 6 % relative error on a role's KLD


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

def _read_sums(imatrix_gguf: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
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
    return sums, counts


def read_importance(imatrix_gguf: Path) -> dict[str, np.ndarray]:
    """Per weight tensor, the mean squared input activation per column: shape (n_mat, n_cols).

    The pinned llama-imatrix writes GGUF: for each tensor ``<name>.in_sum2`` (sum of squared inputs over
    the tokens it saw, per column and per expert) and ``<name>.counts`` (tokens per expert). An expert that
    saw no token gets all zeros here: unmeasured, not unimportant (quantkit.budget.price_uncovered_experts)."""
    sums, counts = _read_sums(imatrix_gguf)
    out = {}
    for name, s in sums.items():
        c = counts.get(name)
        s2 = s.reshape(len(c) if c is not None else 1, -1)
        n = np.maximum(c if c is not None else np.ones(1), 1.0)[:, None]
        out[name] = s2 / n
    return out


def read_pooled_importance(imatrix_gguf: Path) -> dict[str, np.ndarray]:
    """Per expert tensor (more than one expert), the layer's mean squared input per column over every token
    routed to any of its experts (in_sum2 summed over experts / counts summed): what an expert the calibration
    did not reach would see, were it routed like the others. Shape (n_cols,)."""
    sums, counts = _read_sums(imatrix_gguf)
    out = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None or len(c) < 2:
            continue
        out[name] = s.reshape(len(c), -1).sum(axis=0) / max(float(c.sum()), 1.0)
    return out


# --- one candidate type ------------------------------------------------------------------------------

def sensitivity_inputs(*, base: Entry, imatrix: Entry, tensor_type: str, toolchain: Toolchain) -> dict:
    return {"base_sha256": base.files["model.gguf"].sha256, "imatrix_sha256": imatrix.files["imatrix.gguf"].sha256,
            "type": tensor_type, "method": METHOD, "llama_cpp": toolchain.commit}


def read_tensors(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """Per tensor: (ggml type, its bytes as rows: shape (rows, bytes per row)), memory-mapped.

    The header is walked with quantkit.ggufinfo's cursor: gguf-py's GGUFReader builds a numpy view per
    vocabulary entry and took half of each comparison on SmolLM2 (py-spy)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from quantkit.ggufinfo import ARRAY, MAGIC, _Header

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(buf[:4]) != MAGIC:
        raise VerificationError(f"{path} is not a GGUF file")
    h = _Header(buf)
    h.pos = 8
    n_tensors, n_kv = h.take("Q"), h.take("Q")
    align = 32
    for _ in range(n_kv):
        key = h.string()
        vtype = h.take("I")
        value = h.value(vtype, keep=key == "general.alignment")
        if key == "general.alignment" and vtype != ARRAY:
            align = int(value)
    infos = []
    for _ in range(n_tensors):
        name = h.string()
        dims = [h.take("Q") for _ in range(h.take("I"))]
        infos.append((name, dims, h.take("I"), h.take("Q")))
    start = -(-h.pos // align) * align
    out = {}
    for name, dims, ttype, offset in infos:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        row_bytes = dims[0] // block * size
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        at = start + offset
        if at + rows * row_bytes > len(buf):
            raise VerificationError(f"{path}: tensor {name} runs past the end of the file (truncated)")
        out[name] = (ttype, buf[at:at + rows * row_bytes].reshape(rows, row_bytes))
    return out


def tensor_errors(*, base_gguf: Path, quant_gguf: Path, importance: dict[str, np.ndarray],
                  pooled: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Per tensor of ``quant_gguf``: its type, bytes, elements, group and (for quantized tensors) the
    importance-weighted squared error against ``base_gguf`` and the weighted energy of the base."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    base = read_tensors(base_gguf)
    out: dict[str, dict] = {}
    for name, (qtype, qraw) in read_tensors(quant_gguf).items():
        btype, braw = base[name]
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        row = {"type": GGMLQuantizationType(qtype).name.lower(), "bytes": int(qraw.nbytes),
               "elements": int(qraw.size // size * block), "group": tensor_group(name), "quantized": qtype != btype}
        if row["quantized"]:
            imp = importance.get(name)
            row["weighted"] = imp is not None
            pool = (pooled or {}).get(name) if imp is not None and imp.shape[0] > 1 else None
            row["error"], row["energy"], per_expert, per_expert_pooled = _weighted_error(
                braw, GGMLQuantizationType(btype), qraw, GGMLQuantizationType(qtype), imp, pool)
            if pool is not None:
                # one tensor holds every expert of a layer: each expert's share, with its own importance and
                # with the layer's pooled one (quantkit.budget prices an unrouted expert by the latter)
                row["expert_errors"], row["expert_errors_pooled"] = per_expert, per_expert_pooled
        out[name] = row
    return out


ROWS_PER_BLOCK = 8192  # rows dequantized at a time: bounds memory on large embeddings


def _weighted_error(base_rows: np.ndarray, base_type, quant_rows: np.ndarray, quant_type,
                    imp: np.ndarray | None, pooled: np.ndarray | None = None
                    ) -> tuple[float, float, list[float], list[float] | None]:
    """sum imp[col] * (W - Q)**2 and sum imp[col] * W**2 over a tensor; the error of each matrix (expert), and
    of each with the ``pooled`` importance instead of its own (None without ``pooled``).

    One vectorised pass per block of rows: squared differences summed over the rows of each matrix
    (float64 accumulation), then one dot product with that matrix's importance per column."""
    from gguf.quants import dequantize

    n_rows = base_rows.shape[0]
    n_mat = 1 if imp is None else imp.shape[0]
    per_mat = n_rows // n_mat
    err = energy = 0.0
    each: list[float] = []
    each_pooled: list[float] | None = [] if pooled is not None else None
    for m in range(n_mat):
        d2 = e2 = None
        for r0 in range(m * per_mat, (m + 1) * per_mat, ROWS_PER_BLOCK):
            r1 = min((m + 1) * per_mat, r0 + ROWS_PER_BLOCK)
            w = dequantize(base_rows[r0:r1], base_type)
            d = w - dequantize(quant_rows[r0:r1], quant_type)
            cols_d = np.einsum("ij,ij->j", d, d, dtype=np.float64)
            cols_e = np.einsum("ij,ij->j", w, w, dtype=np.float64)
            d2 = cols_d if d2 is None else d2 + cols_d
            e2 = cols_e if e2 is None else e2 + cols_e
        weights = np.ones_like(d2) if imp is None else imp[m]
        each.append(float(d2 @ weights))
        err += each[-1]
        energy += float(e2 @ weights)
        if each_pooled is not None:
            each_pooled.append(float(d2 @ pooled))
    return err, energy, each, each_pooled


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
            imatrix_gguf = imatrix.file("imatrix.gguf")
            tensors = tensor_errors(base_gguf=base.file("model.gguf"), quant_gguf=out,
                                    importance=read_importance(imatrix_gguf),
                                    pooled=read_pooled_importance(imatrix_gguf))
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
                       toolchain: Toolchain) -> dict:
    return {"base_sha256": base.files["model.gguf"].sha256, "imatrix_sha256": imatrix.files["imatrix.gguf"].sha256,
            "tables": {t: e.key for t, e in sorted(tables.items())}, "calibration_sha256": calibration_sha256,
            "ctx": KLD_CTX, "chunks": PROBE_CHUNKS, "probes": list(PROBES), "method": KLD_METHOD,
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


class KLDProbe:
    """KL divergence of variants of the base on a fixed set of calibration chunks, per chunk.

    ``logits()`` writes the base's log-probs once (``KLD_CTX``-token chunks of ``text``); ``measure``
    quantizes the base with an assignment (llama-quantize --tensor-type-file, every tensor not named
    kept as in the base) or takes a GGUF, and returns each chunk's mean KLD."""

    def __init__(self, *, base_gguf: Path, imatrix_gguf: Path, text: str, chunks: int, workdir: Path,
                 toolchain: Toolchain, threads: int):
        self.base_gguf, self.imatrix_gguf, self.text, self.chunks = base_gguf, imatrix_gguf, text, chunks
        self.workdir, self.toolchain, self.threads = workdir, toolchain, threads
        self.base_types = {n: t for n, (t, _) in read_tensors(base_gguf).items()}
        self.path: Path | None = None
        self.runs = 0

    def logits(self) -> Path:
        from quantkit.scoring.llamacpp import base_logits

        if self.path is None:
            text = self.workdir / "calibration.txt"
            text.write_text(self.text, encoding="utf-8")
            spec = SimpleNamespace(ctx=KLD_CTX, max_tokens=KLD_CTX * self.chunks)
            self.path = base_logits(base_gguf=self.base_gguf, text_file=text, spec=spec, toolchain=self.toolchain,
                                    workdir=self.workdir / "logits", threads=self.threads)
        return self.path

    def quantize(self, assignment: dict[str, str], what: str, *, ftype: str = "Q8_0") -> Path:
        """The base with ``assignment``'s tensors at their types and every other tensor as it is."""
        from gguf.constants import GGMLQuantizationType

        work = self.workdir / what
        work.mkdir()
        # Every tensor named: one left out would take the file type's default (q8_0). Pins on tensors
        # llama-quantize never quantizes (norms) are ignored by it.
        full = {n: GGMLQuantizationType(t).name.lower() for n, t in self.base_types.items()} | assignment
        quantize_with_mix(base_gguf=self.base_gguf, imatrix_gguf=self.imatrix_gguf, assignment=full, ftype=ftype,
                          workdir=work, out_name="model.gguf", toolchain=self.toolchain, threads=self.threads)
        return work / "model.gguf"

    def measure(self, gguf: Path, what: str) -> list[float]:
        """Each chunk's mean KLD of ``gguf`` against the base (at least all but the last chunk: see
        chunk_klds)."""
        from quantkit.scoring.llamacpp import perplexity_until_parsed

        work = gguf.parent if gguf.parent.name == what else self.workdir / what
        work.mkdir(exist_ok=True)
        args = ["-m", gguf, "--kl-divergence-base", self.logits(), "--kl-divergence", "-c", str(KLD_CTX)]
        self.runs += 1
        return perplexity_until_parsed(args, workdir=work, toolchain=self.toolchain, threads=self.threads,
                                       what=what, parse=lambda text, seconds: chunk_klds(text, self.chunks))

    def assignment_kld(self, assignment: dict[str, str], what: str) -> list[float]:
        gguf = self.quantize(assignment, what)
        try:
            return self.measure(gguf, what)
        finally:
            gguf.unlink(missing_ok=True)

    def close(self) -> None:
        shutil_rm(self.workdir / "logits")
        self.path = None


def paired(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """Mean of the per-chunk differences a - b over the chunks both have, its standard error, n."""
    n = min(len(a), len(b))
    d = np.asarray(a[:n]) - np.asarray(b[:n])
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    return float(d.mean()), se, n


def halves(text: str) -> tuple[str, str]:
    """The calibration text's paragraphs dealt alternately: (the closed-loop check's, the probes'). Disjoint
    tokens, the same kind of text at the start of both (llama-perplexity reads from the start)."""
    paragraphs = [x for x in text.split("\n\n") if x.strip()]
    if len(paragraphs) < 2:
        return text, text
    return "\n\n".join(paragraphs[0::2]) + "\n", "\n\n".join(paragraphs[1::2]) + "\n"


def calibrate_groups(*, base: Entry, imatrix: Entry, tables: dict[str, Entry], calibration_text: str,
                     calibration_sha256: str, toolchain: Toolchain, store: Store, threads: int | None = None) -> Entry:
    """Measured KLD per tensor role (``calibration_group``) at each probe type -> one factor per role and
    probe (KLD per unit of proxy error).

    For role g and probe p, a model has g's tensors as the p candidate made them (its --pure type,
    fallbacks included) and every other tensor as in the base, so the reference is the base itself:
    ``factor[g][p] = KLD(g at p) / proxy_g(p)``. Probes whose tensors come out identical to an earlier
    probe's (a fallback type shared by q2_k and q3_k) are measured once."""
    inputs = calibration_inputs(base=base, imatrix=imatrix, tables=tables, calibration_sha256=calibration_sha256,
                                toolchain=toolchain)
    threads = threads or os.cpu_count() or 1
    loaded = {p: load_table(tables[p])["tensors"] for p in PROBES}

    def produce(staging: Staging) -> None:
        from quantkit.digest import write_json_atomic

        start = time.perf_counter()
        probe = KLDProbe(base_gguf=base.file("model.gguf"), imatrix_gguf=imatrix.file("imatrix.gguf"),
                         text=halves(calibration_text)[1], chunks=PROBE_CHUNKS, workdir=staging.path,
                         toolchain=toolchain, threads=threads)
        quantized = sorted(n for n, r in loaded[PROBES[0]].items() if r["quantized"])
        roles = sorted({calibration_group(n) for n in quantized})
        measured: dict[tuple, list[float]] = {}
        groups = {}
        for g in roles:
            members = [n for n in quantized if calibration_group(n) == g]
            groups[g] = {"tensors": len(members), "probes": {}}
            for p in PROBES:
                assignment = {n: loaded[p][n]["type"] for n in members}
                key = tuple(sorted(assignment.items()))
                if key not in measured:
                    measured[key] = probe.assignment_kld(assignment, f"{g}-{p}")
                counts: dict[str, int] = {}
                for t in assignment.values():
                    counts[t] = counts.get(t, 0) + 1
                groups[g]["probes"][p] = {"types": counts, "proxy": sum(loaded[p][n]["error"] for n in members),
                                          "key": key}
        # Every probe over the same chunks (a run can lose its last line: see chunk_klds).
        n = min(len(v) for v in measured.values())
        for g, v in groups.items():
            for p, row in v["probes"].items():
                chunks = np.asarray(measured[row.pop("key")][:n])
                kld, se = float(chunks.mean()), float(chunks.std(ddof=1) / np.sqrt(n))
                row.update(kld_mean=kld, kld_se=se,
                           factor=kld / row["proxy"] if row["proxy"] > 0 and kld > 0 else None)
        known = sorted(r["factor"] for v in groups.values() for r in v["probes"].values() if r["factor"] is not None)
        fallback = known[len(known) // 2] if known else 1.0
        for v in groups.values():
            for r in v["probes"].values():
                if r["factor"] is None:  # no measurable change: the proxy's median scale, not zero
                    r["factor"] = fallback
                    r["note"] = "KLD not measurable; median factor used"
        probe.close()
        value = {"method": KLD_METHOD, "probes": list(PROBES), "priced_by": PRICED_BY, "reference": "base",
                 "groups": groups, "ctx": KLD_CTX, "chunks": n, "runs": probe.runs}
        write_json_atomic(staging.path / "calibration.json", value)
        staging.info.update(tool=toolchain.version, seconds=round(time.perf_counter() - start, 3), threads=threads,
                            runs=probe.runs)
        for d in list(staging.path.iterdir()):
            if d.is_dir():
                shutil_rm(d)
            elif d.name != "calibration.json":
                d.unlink()

    entry = store.ensure(KLD_STEP, inputs, produce)
    log.info("sensitivity check against KLD: %s", "reused" if entry.reused else f"measured in "
             f"{entry.info.get('seconds', 0):.1f}s ({entry.info.get('runs')} llama-perplexity runs)")
    return entry


# llama-perplexity --kl-divergence, after each chunk: chunk, PPL ± err, ln(PPL(Q)/PPL(base)) ± err,
# mean KLD so far ± err, ... (tools/perplexity/perplexity.cpp, kl_divergence)
_CHUNK_LINE = re.compile(r"^\s*(\d+)\s+[-\d.naif]+ ±\s+[-\d.naif]+\s+[-\d.naif]+ ±\s+[-\d.naif]+\s+([-\d.]+) ±\s+([-\d.]+)",
                         re.MULTILINE)


def chunk_klds(text: str, chunks: int) -> list[float]:
    """Each chunk's own mean KLD, from the running means printed after every chunk (equal scored tokens per
    chunk; 5 printed decimals, so chunk i carries about ±5e-6·i of rounding). llama-perplexity can lose its
    last lines at exit (quantkit.scoring.llamacpp._perplexity): all but the last chunk are required."""
    running = {}
    for m in _CHUNK_LINE.finditer(text):
        running[int(m.group(1))] = float(m.group(2))
    n = 0
    while n + 1 in running and n < chunks:
        n += 1
    if n < max(2, chunks - 1):
        raise VerificationError(f"llama-perplexity printed KL divergence lines for {n} of {chunks} chunks")
    return [running[1]] + [i * running[i] - (i - 1) * running[i - 1] for i in range(2, n + 1)]


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_factors(entry: Entry) -> dict[str, dict[str, float]]:
    """role -> candidate type -> KLD per unit of proxy error (each candidate priced by its PRICED_BY probe)."""
    import json

    value = json.loads(entry.file("calibration.json").read_text())
    return {g: {c: v["probes"][p]["factor"] for c, p in value["priced_by"].items()}
            for g, v in value["groups"].items()}

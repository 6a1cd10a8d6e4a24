"""Step 5 for GGUF variants: llama-perplexity (PPL, KL divergence) and llama-bench (speed).

The base GGUF's log-probs are written once per run (``--kl-divergence-base``,
about ``n_tokens/2 * n_vocab * 2`` bytes) and every variant is compared with
them (``--kl-divergence``). The graph's base-logits node makes that file only
when a score is missing from the store, and removes it when the run is done.

Numbers are parsed from llama-perplexity's own final lines and the printed
strings are kept, so what quantkit records is what a user running the tool by
hand reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from quantkit.digest import sha256_file
from quantkit.drainlog import preload_env
from quantkit.errors import ToolError, VerificationError
from quantkit.ggufinfo import read_gguf
from quantkit.proc import run_tool
from quantkit.recipe import Evaluation
from quantkit.scoring.windows import Score, Speed, base_logits_bytes, max_chunks, read_logits_header, scored_per_chunk
from quantkit.toolchain import Toolchain

log = logging.getLogger(__name__)
T = TypeVar("T")

LOG_FILE = "llama-perplexity.log"
BACKEND = "llama-perplexity"
LOGITS_NAME = "base-logits.bin"

_NUM = r"([-+]?(?:\d+\.?\d*|nan|inf))"
# Lines llama-perplexity prints at the end (perplexity.cpp of the pinned commit).
PATTERNS = {
    "ppl_final": re.compile(rf"Final estimate: PPL = {_NUM} \+/- {_NUM}"),
    "chunks_ppl": re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)"),
    "chunks_kld": re.compile(r"kl_divergence: computing over (\d+) chunks, n_ctx=(\d+)"),
    "ppl_q": re.compile(rf"Mean PPL\(Q\)\s+:\s+{_NUM} ± +{_NUM}"),
    "ppl_base": re.compile(rf"Mean PPL\(base\)\s+:\s+{_NUM} ± +{_NUM}"),
    "kld_mean": re.compile(rf"Mean    KLD:\s+{_NUM} ± +{_NUM}"),
    "kld_p99": re.compile(rf"99\.0%   KLD:\s+{_NUM}"),
    "kld_p999": re.compile(rf"99\.9%   KLD:\s+{_NUM}"),
    "same_top": re.compile(rf"Same top p:\s+{_NUM} ± +{_NUM} %"),
}


# One line per chunk in --kl-divergence mode: chunk, PPL ± , ln(PPL(Q)/PPL(base)) ± , KLD ± , ... (running means)
CHUNK_LINE = re.compile(rf"^\s*(\d+)\s+{_NUM} ±\s+\S+\s+\S+ ±\s+\S+\s+{_NUM} ±", re.MULTILINE)

# The same line's last column: the running same-top share; after the last chunk it is the final one.
CHUNK_SAME_TOP = re.compile(rf"^\s*(\d+)\s.*\s{_NUM} ±\s+{_NUM} %[ \t]*$", re.MULTILINE)

LOG_ATTEMPTS = 5


def chunk_klds(text: str) -> list[float] | None:
    """Each chunk's own mean KLD, from the running means llama-perplexity prints after every chunk (chunks score
    equally many tokens, so chunk k's mean is k*m_k - (k-1)*m_(k-1)); None when the lines are not all there.
    The printed 5 decimals bound each value's rounding error by about k * 1e-5: the paired per-chunk test."""
    running: dict[int, float] = {}
    for n, _, kld in CHUNK_LINE.findall(text):
        running[int(n)] = float(kld)
    if not running or sorted(running) != list(range(1, max(running) + 1)):
        return None
    out, prev = [], 0.0
    for k in range(1, max(running) + 1):
        out.append(round(k * running[k] - (k - 1) * prev, 6))
        prev = running[k]
    return out


def parse_perplexity_log(text: str) -> dict[str, tuple[str, ...]]:
    """The groups of every pattern found (last occurrence), as printed strings."""
    found = {}
    for name, pattern in PATTERNS.items():
        matches = pattern.findall(text)
        if matches:
            last = matches[-1]
            found[name] = last if isinstance(last, tuple) else (last,)
    return found


def _perplexity(args: list, *, workdir: Path, toolchain: Toolchain, threads: int) -> tuple[str, float]:
    """Run llama-perplexity with a log file (the output tail is too short for the statistics)."""
    log_path = workdir / LOG_FILE
    # Absolute paths: the tool runs in workdir.
    args = [Path(a).resolve() if isinstance(a, Path) else a for a in args]
    # --no-repack: scores must not depend on a CPU-specific weight layout, and llama.cpp's repacked
    # AMX/AVX-512 path crashes (SIGSEGV) on quantized GGUFs on some CPUs (seen on a 2-core AMX machine).
    run = run_tool([toolchain.binary("llama-perplexity"), *args, "-t", str(threads), *toolchain.offload_args(),
                    "--no-repack", "--log-file", log_path],
                   cwd=workdir, env=preload_env())
    # llama.cpp's logger (common/log.cpp) prints from a worker thread, and its singleton is
    # deliberately never destroyed (llama.cpp issue #22142), so nothing drains its queue at exit:
    # when the main thread returns first, the last lines (the statistics) are lost from both the
    # file and stdout. quantkit.drainlog pauses the exit; the captured output tail is read after the
    # file; the caller still retries.
    text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else ""
    return text + "\n" + run.output_tail, run.seconds


def base_logits(*, base_gguf: Path, text_file: Path, spec: Evaluation, toolchain: Toolchain, workdir: Path,
                threads: int | None = None) -> Path:
    """Write the base model's log-probs over the evaluation windows to ``workdir``; return the file."""
    threads = threads or os.cpu_count() or 1
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir.resolve() / LOGITS_NAME
    text, seconds = _perplexity(["-m", base_gguf, "-f", text_file, "-c", str(spec.ctx), "--chunks",
                                 str(max_chunks(spec)), "--kl-divergence-base", out],
                                workdir=workdir, toolchain=toolchain, threads=threads)
    found = parse_perplexity_log(text)
    # The file is the result; its size is checked below. The log's last lines (the final PPL) can
    # be lost at exit on a busy machine, so they are not required here.
    if not out.is_file():
        # llama-perplexity exits 0 when the text is too short for two contexts.
        raise VerificationError(f"llama-perplexity wrote no base logits for {base_gguf.name}; "
                                f"its output ended with:\n{_tail(text)}")
    header = read_logits_header(out)
    want = base_logits_bytes(n_ctx=header.n_ctx, n_chunks=header.n_chunks, n_vocab=header.n_vocab)
    if out.stat().st_size != want:
        raise VerificationError(f"{out} has {out.stat().st_size} bytes, expected {want} for {header.n_chunks} "
                                f"chunks of {header.n_ctx} tokens and {header.n_vocab} vocab entries")
    log.info("base logits: %d chunks x %d tokens, %.1f MiB in %.1fs (base PPL %s)", header.n_chunks,
             header.n_ctx, want / 2**20, seconds, found.get("ppl_final", ("not printed",))[0])
    return out


def score_gguf(*, gguf: Path, base_logits: Path | None, text_file: Path, spec: Evaluation, toolchain: Toolchain,
               threads: int | None = None, workdir: Path | None = None) -> Score:
    """PPL (and KLD against ``base_logits`` when given) of one GGUF, parsed from llama-perplexity.

    With base logits the tokens come from that file (the base's tokenization), so
    every variant is scored on identical tokens; without, the text is tokenized
    with the variant's own vocabulary (the same for variants of one base).
    The tool's log is kept in ``workdir`` when one is given.
    """
    threads = threads or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quantkit-score-")))
        if base_logits is not None:
            args = ["-m", gguf, "--kl-divergence-base", base_logits, "--kl-divergence", "-c", str(spec.ctx)]
        else:
            args = ["-m", gguf, "-f", text_file, "-c", str(spec.ctx), "--chunks", str(max_chunks(spec))]
        return perplexity_until_parsed(
            args, workdir=workdir, toolchain=toolchain, threads=threads, what=gguf.name,
            parse=lambda text, seconds: score_from_log(text, seconds=seconds, kld=base_logits is not None,
                                                       what=gguf.name))


def perplexity_until_parsed(args: list, *, workdir: Path, toolchain: Toolchain, threads: int, what: str,
                            parse: Callable[[str, float], T]) -> T:
    """Run llama-perplexity and parse its log, again (up to LOG_ATTEMPTS runs) when the log lost its end.

    ``parse(text, seconds)`` raises VerificationError on a log without the results. The lines are lost
    at exit (see _perplexity); the numbers are deterministic, so another run gives the same ones, and
    on a busy machine the logger thread loses the race more often.
    """
    for attempt in range(1, LOG_ATTEMPTS):
        try:
            return parse(*_perplexity(args, workdir=workdir, toolchain=toolchain, threads=threads))
        except VerificationError:
            log.warning("llama-perplexity output for %s ended early (attempt %d); running it again", what, attempt)
    return parse(*_perplexity(args, workdir=workdir, toolchain=toolchain, threads=threads))  # last: errors raise


def score_from_log(text: str, *, seconds: float, kld: bool, what: str) -> Score:
    found = parse_perplexity_log(text)
    if kld and "same_top" not in found and "chunks_kld" in found:
        # "Same top p" is the log's very last line, the one most often lost at exit (see _perplexity); the
        # last chunk's line prints the same running share to the same precision.
        last = {int(n): (p, e) for n, p, e in CHUNK_SAME_TOP.findall(text)}.get(int(found["chunks_kld"][0]))
        if last:
            found["same_top"] = last
    need = ("ppl_q", "kld_mean", "kld_p99", "same_top", "chunks_kld") if kld else ("ppl_final", "chunks_ppl")
    missing = [n for n in need if n not in found]
    if missing:
        raise VerificationError(f"llama-perplexity printed no {', '.join(missing)} for {what} (too few tokens? "
                                f"KL statistics need 100 scored tokens); its output ended with:\n{_tail(text)}")
    n_chunks, ctx = (int(v) for v in found["chunks_kld" if kld else "chunks_ppl"])
    ppl, ppl_err = found["ppl_q"] if kld else found["ppl_final"]
    printed = {"ppl": ppl, "ppl_err": ppl_err}
    if kld:
        printed |= {"kld_mean": found["kld_mean"][0], "kld_mean_err": found["kld_mean"][1],
                    "kld_p99": found["kld_p99"][0], "same_top_pct": found["same_top"][0]}
        if "kld_p999" in found:
            printed["kld_p999"] = found["kld_p999"][0]
        if "ppl_base" in found:
            printed["ppl_base"] = found["ppl_base"][0]

    def num(name: str) -> float | None:
        return float(printed[name]) if name in printed else None

    return Score(backend=BACKEND, ppl=float(ppl), ppl_err=float(ppl_err), kld_mean=num("kld_mean"),
                 kld_mean_err=num("kld_mean_err"), kld_p99=num("kld_p99"), same_top_pct=num("same_top_pct"),
                 n_tokens=n_chunks * scored_per_chunk(ctx), n_chunks=n_chunks, ctx=ctx, seconds=round(seconds, 3),
                 printed=printed, kld_p999=num("kld_p999"), chunk_kld=chunk_klds(text) if kld else None)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


KLD_STATS = "p99.9"  # in the score keys: scores stored before the 99.9th percentile was kept are made again


def score_inputs(*, gguf_sha256: str, base_sha256: str | None, text_sha256: str, spec, toolchain: Toolchain,
                 kld: bool | None = None) -> dict:
    """The store key's inputs of a GGUF score; ``spec`` is the Evaluation or an EvalSet (ctx, max_tokens)."""
    kld = spec.kld if kld is None else kld
    return {"gguf_sha256": gguf_sha256, "base_sha256": base_sha256, "text_sha256": text_sha256,
            "ctx": spec.ctx, "max_tokens": spec.max_tokens, "kld": kld and base_sha256 is not None,
            "llama_cpp": toolchain.build, **({"kld_stats": KLD_STATS} if kld and base_sha256 else {})}


def text_sha256(text_file: Path) -> str:
    return sha256_file(text_file)


def gguf_vocab_size(gguf: Path) -> int:
    """Entries in a GGUF's vocabulary (the n_vocab of its logits), for the plan's disk estimate."""
    size = read_gguf(gguf).vocab_size
    if size is None:
        raise VerificationError(f"{gguf} has no tokenizer.ggml.tokens")
    return size


def bench_gguf(*, gguf: Path, toolchain: Toolchain, threads: int, prompt_tokens: int = 128, gen_tokens: int = 32,
               reps: int = 2) -> Speed:
    """Prompt-processing and generation tokens/s from ``llama-bench -o jsonl``."""
    command = [toolchain.binary("llama-bench"), "-m", gguf, "-p", str(prompt_tokens), "-n", str(gen_tokens),
               "-r", str(reps), "-t", str(threads), *toolchain.offload_args(), "-o", "jsonl"]
    run = run_tool(command, check=False)
    repack = True
    if run.returncode < 0:  # killed by a signal: the repacked CPU path crashes on some CPUs (see _perplexity)
        log.warning("llama-bench died (signal %d) on %s; measuring again without weight repacking",
                    -run.returncode, gguf.name)
        run, repack = run_tool([*command, "--repack", "0"], check=False), False
    if run.returncode != 0:
        raise ToolError([str(a) for a in run.command], run.returncode, run.output_tail)
    rows = []
    for line in run.output_tail.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    pp = [r for r in rows if r.get("n_prompt") == prompt_tokens and r.get("n_gen") == 0]
    tg = [r for r in rows if r.get("n_gen") == gen_tokens and r.get("n_prompt") == 0]
    if not pp or not tg:
        raise ToolError([str(a) for a in run.command], run.returncode,
                        "llama-bench printed no pp/tg results in -o jsonl:\n" + run.output_tail)
    p, t = pp[-1], tg[-1]
    return Speed(pp_tokens_per_s=float(p["avg_ts"]), pp_stddev=float(p["stddev_ts"]),
                 tg_tokens_per_s=float(t["avg_ts"]), tg_stddev=float(t["stddev_ts"]), prompt_tokens=prompt_tokens,
                 gen_tokens=gen_tokens, reps=reps, threads=int(p.get("n_threads", threads)),
                 backend=str(p.get("backends", "")), cpu=str(p.get("cpu_info", "")), repack=repack)

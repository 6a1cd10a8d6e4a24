"""Scoring: llama-perplexity numbers as printed, KLD ordering, torch on the same windows.

Runs the real tools on the tiny trained Llama (f16 GGUF, Q8_0, Q2_K) over a
few short chunks of the held-out text, so it takes well under a minute once
the fixture model exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from quantkit.errors import VerificationError
from quantkit.proc import run_tool
from quantkit.recipe import Evaluation
from quantkit.scoring.llamacpp import (
    LOG_FILE,
    base_logits,
    bench_gguf,
    parse_perplexity_log,
    score_gguf,
)
from quantkit.scoring.windows import base_logits_bytes, estimate_base_logits_bytes, read_logits_header, scored_per_chunk

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "calibration" / "eval" / "en-prose-heldout.txt"
CTX = 128
SPEC = Evaluation(file="calibration/eval/en-prose-heldout.txt", ctx=CTX, max_tokens=8 * CTX)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama) -> Path:
    return Path(tiny_llama)


@pytest.fixture(scope="session")
def ggufs(tiny_f16_gguf, toolchain, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    f16 = tiny_f16_gguf
    files = {"F16": f16}
    for qtype in ("Q8_0", "Q2_K"):
        files[qtype] = out / f"{qtype}.gguf"
        run_tool([toolchain.binary("llama-quantize"), f16, files[qtype], qtype, "2"])
    return files


def _by_hand(log_text: str) -> dict[str, str]:
    """An independent reading of llama-perplexity's final lines."""
    lines, last_chunk_same_top = {}, None
    for line in log_text.splitlines():
        if m := re.match(r"Mean PPL\(Q\)\s*: +(\S+) ± +(\S+)$", line):
            lines["ppl"], lines["ppl_err"] = m.groups()
        elif m := re.match(r"Mean +KLD: +(\S+) ± +(\S+)$", line):
            lines["kld_mean"], lines["kld_mean_err"] = m.groups()
        elif m := re.match(r"99\.0% +KLD: +(\S+)$", line):
            lines["kld_p99"] = m.group(1)
        elif m := re.match(r"Same top p: +(\S+) ±", line):
            lines["same_top_pct"] = m.group(1)
        elif m := re.search(r"Final estimate: PPL = (\S+) \+/- (\S+)$", line):
            lines["ppl"], lines["ppl_err"] = m.groups()
        elif m := re.match(r"\s*\d+\s.*\s(\S+) ± +\S+ %\s*$", line):
            last_chunk_same_top = m.group(1)
    # "Same top p" is the last line, sometimes lost at exit; the last chunk's line has the same running share.
    if "same_top_pct" not in lines and "kld_mean" in lines and last_chunk_same_top:
        lines["same_top_pct"] = last_chunk_same_top
    return lines


@pytest.fixture(scope="session")
def scores(ggufs, toolchain, tmp_path_factory):
    """Every GGUF scored against the f16 logits, with each run's full log kept."""
    work = tmp_path_factory.mktemp("score")
    (work / "logits").mkdir()
    logits = base_logits(base_gguf=ggufs["F16"], text_file=HELDOUT, spec=SPEC, toolchain=toolchain,
                         workdir=work / "logits")
    out = {}
    for name, path in ggufs.items():
        d = work / name
        d.mkdir()
        score = score_gguf(gguf=path, base_logits=logits, text_file=HELDOUT, spec=SPEC, toolchain=toolchain, workdir=d)
        out[name] = (score, (d / LOG_FILE).read_text(encoding="utf-8"))
    return out, read_logits_header(logits), logits.stat().st_size


def test_recorded_numbers_are_the_printed_ones(scores):
    by_name, _, _ = scores
    for name, (score, log_text) in by_name.items():
        printed = _by_hand(log_text)
        assert printed.keys() >= {"ppl", "ppl_err", "kld_mean", "kld_p99", "same_top_pct"}, name
        for key, text in printed.items():
            assert score.printed[key] == text, (name, key)
            assert getattr(score, key) == float(text), (name, key)


def test_kld_orders_by_precision(scores):
    by_name, _, _ = scores
    f16, q8, q2 = (by_name[n][0] for n in ("F16", "Q8_0", "Q2_K"))
    assert f16.kld_mean < 1e-3  # the base against its own 16-bit logits
    assert q8.kld_mean < q2.kld_mean
    assert q8.same_top_pct > q2.same_top_pct
    assert f16.n_chunks == SPEC.max_tokens // CTX and f16.n_tokens == f16.n_chunks * scored_per_chunk(CTX)


def test_base_logits_file_size(scores, ggufs):
    _, header, size = scores
    assert (header.n_ctx, header.n_chunks) == (CTX, SPEC.max_tokens // CTX)
    assert size == base_logits_bytes(n_ctx=CTX, n_chunks=header.n_chunks, n_vocab=header.n_vocab)
    assert estimate_base_logits_bytes(SPEC, n_vocab=header.n_vocab) == size


def test_torch_matches_llama_perplexity_windows(scores, tiny_model_dir):
    from transformers import AutoTokenizer

    from quantkit.scoring.hf import eval_windows, score_hf
    from quantkit.scoring.windows import read_eval_text

    by_name, header, _ = scores
    # Same tokens: the HF tokenizer's windows equal what llama.cpp tokenized (before BOS substitution).
    windows = eval_windows(AutoTokenizer.from_pretrained(tiny_model_dir), read_eval_text(HELDOUT), SPEC)
    llama = list(header.tokens)
    for i, window in enumerate(windows.tolist()):
        assert window[1:] == llama[i * CTX + 1:(i + 1) * CTX], f"chunk {i} tokenized differently"

    torch_score = score_hf(model_dir=tiny_model_dir, text_file=HELDOUT, spec=SPEC, base_model_dir=tiny_model_dir)
    f16 = by_name["F16"][0]
    assert (torch_score.n_chunks, torch_score.n_tokens) == (f16.n_chunks, f16.n_tokens)
    assert torch_score.ppl == pytest.approx(f16.ppl, rel=0.02)
    assert torch_score.kld_mean == pytest.approx(0.0, abs=1e-9)
    assert torch_score.same_top_pct == 100.0


EVAL_RECIPE = """\
evaluation: {file: calibration/eval/en-prose-heldout.txt, ctx: 128, max_tokens: 512, bench: false}
gguf:
  imatrix: {enabled: false}
  types: [Q8_0]
"""


def test_scores_are_stored_and_base_logits_made_only_when_a_score_is_missing(tiny_llama, repo_root, tmp_path,
                                                                             capsys, monkeypatch):
    from test_pipeline import make_project, tiny_recipe

    from quantkit.cli import main

    recipe = make_project(tmp_path / "proj", repo_root, tiny_llama)
    recipe.write_text(tiny_recipe("tiny-eval", EVAL_RECIPE))
    store = tmp_path / "store"
    monkeypatch.setenv("QUANTKIT_STORE", str(store))
    assert main(["run", "--no-publish", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "built: convert, quantize:Q8_0, base-logits, score-gguf:F16, score-gguf:Q8_0" in out, out
    assert not list(store.glob("base-logits/[!.]*")), "the base logits are removed when the run no longer needs them"
    manifest = json.loads((recipe.parents[1] / "runs" / "tiny-eval" / "manifest.json").read_text())
    q8 = next(v for v in manifest["variants"] if v["label"] == "Q8_0")
    assert q8["scores"]["kld_mean"] > 0

    assert main(["run", "--no-publish", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "built: nothing" in out and "base-logits" not in out, out  # stored scores need no logits
    again = json.loads((recipe.parents[1] / "runs" / "tiny-eval" / "manifest.json").read_text())
    assert next(v for v in again["variants"] if v["label"] == "Q8_0")["scores"] == q8["scores"]


def test_too_short_text_is_an_error(ggufs, toolchain, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    with pytest.raises(VerificationError, match="too few tokens|two contexts|no base logits|printed no"):
        score_gguf(gguf=ggufs["Q8_0"], base_logits=None, text_file=short, spec=SPEC, toolchain=toolchain)


def test_parse_ignores_per_chunk_lines():
    text = ("kl_divergence: computing over 3 chunks, n_ctx=128, batch_size=2048, n_seq=16\n"
            "Mean PPL(Q)                   :  12.345678 ±   0.500000\n"
            "Mean    KLD:   0.004000 ±   0.000100\n99.0%   KLD:   0.030000\n"
            "Same top p: 97.255 ± 0.123 %\n")
    found = parse_perplexity_log(text)
    assert found["ppl_q"] == ("12.345678", "0.500000")
    assert found["kld_mean"] == ("0.004000", "0.000100")
    assert found["kld_p99"] == ("0.030000",)
    assert found["same_top"] == ("97.255", "0.123")
    assert found["chunks_kld"] == ("3", "128")


def test_same_top_lost_at_exit_is_read_from_the_last_chunk_line():
    """The log's last line ("Same top p") is the one llama.cpp's logger loses at exit on a busy machine; the
    last chunk's running share is the same number. A log cut before the last chunk is still an error."""
    from quantkit.errors import VerificationError
    from quantkit.scoring.llamacpp import score_from_log

    chunks = ["   1     399.6191 ±   91.1398      -0.00002 ±    0.00131       0.00013 ±    0.00001     0.094 ±  0.018 %    100.000 ±  0.000 %",
              "   2     306.0013 ±   39.0682      -0.00070 ±    0.00081       0.00012 ±    0.00001     0.082 ±  0.010 %    99.206 ±  0.396 %"]
    head = "kl_divergence: computing over 2 chunks, n_ctx=128, batch_size=2048, n_seq=16\n"
    stats = ("Mean PPL(Q)                   : 306.001266 ±  39.068173\n"
             "Mean    KLD:   0.000123 ±   0.000006\n99.9%   KLD:   0.000979\n99.0%   KLD:   0.000745\n")
    score = score_from_log(head + "\n".join(chunks) + "\n" + stats, seconds=1.0, kld=True, what="Q8_0.gguf")
    assert score.same_top_pct == 99.206 and score.kld_mean == 0.000123
    with_line = score_from_log(head + "\n".join(chunks) + "\n" + stats + "Same top p: 99.206 ± 0.396 %\n",
                               seconds=1.0, kld=True, what="Q8_0.gguf")
    assert with_line.same_top_pct == score.same_top_pct
    with pytest.raises(VerificationError, match="same_top"):
        score_from_log(head + chunks[0] + "\n" + stats, seconds=1.0, kld=True, what="Q8_0.gguf")


def test_bench(ggufs, toolchain):
    speed = bench_gguf(gguf=ggufs["Q8_0"], toolchain=toolchain, threads=2, prompt_tokens=32, gen_tokens=8, reps=1)
    assert speed.pp_tokens_per_s > 0 and speed.tg_tokens_per_s > 0
    assert speed.threads == 2 and speed.prompt_tokens == 32

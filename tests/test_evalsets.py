"""evaluation.sets (issue #26): recipe checks, chat rendering, the chat reference logits, the per-set report."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.publish.markdown import render_markdown
from quantkit.publish.report import build_report
from quantkit.recipe import load_recipe
from quantkit.scoring.chat import ChatSetError, parse_conversations, render_tokens

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "calibration" / "eval" / "chat-heldout.jsonl"

RECIPE = """\
name: tiny
model:
  path: models/tiny
calibration:
  files: [calibration/calib.txt]
evaluation:
  file: calibration/eval/heldout.txt
  sets:
    - {name: chat, file: calibration/eval/chat.jsonl, ctx: 4096, max_tokens: 8192}
    - {name: code, file: calibration/eval/code.txt}
gguf:
  types: [Q8_0]
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration" / "eval").mkdir(parents=True)
    (tmp_path / "calibration" / "calib.txt").write_text("A calibration paragraph about something else. " * 4 + "\n")
    (tmp_path / "calibration" / "eval" / "heldout.txt").write_text("A different, held-out paragraph. " * 10 + "\n")
    (tmp_path / "calibration" / "eval" / "code.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    shutil.copy(CHAT, tmp_path / "calibration" / "eval" / "chat.jsonl")
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    return tmp_path


def _validate(project: Path, capsys, text: str = RECIPE) -> tuple[int, list[str]]:
    path = project / "recipes" / "r.yaml"
    path.write_text(textwrap.dedent(text))
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err.splitlines()


def test_sets_validate_with_their_own_context(project):
    (project / "recipes" / "r.yaml").write_text(RECIPE)
    recipe = load_recipe(project / "recipes" / "r.yaml")
    sets = recipe.evaluation.all_sets()
    assert [(s.name, s.kind, s.ctx) for s in sets] == [("heldout", "text", 512), ("chat", "chat", 4096),
                                                       ("code", "text", 512)]


def test_duplicate_set_names_are_refused_at_their_line(project, capsys):
    code, err = _validate(project, capsys, RECIPE.replace("name: code", "name: chat"))
    assert code == 2
    assert err == ["recipes/r.yaml:10: evaluation.sets[1].name: evaluation set name 'chat' is used twice "
                   "(fix: give each set its own name)"], err


def test_a_broken_conversation_is_refused_at_its_own_line(project, capsys):
    chat = project / "calibration" / "eval" / "chat.jsonl"
    lines = chat.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "wizard", "content": "hi"}]})
    chat.write_text("\n".join(lines) + "\n")
    code, err = _validate(project, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("calibration/eval/chat.jsonl:3: evaluation.sets[0].file: chat set "
                                               "'chat': a message is {\"role\": one of system, user, assistant, tool"), err


def test_a_set_that_shares_text_with_calibration_is_refused(project, capsys):
    msg = json.loads(CHAT.read_text().splitlines()[5])["messages"][1]["content"]
    (project / "calibration" / "calib.txt").write_text("Some calibration text.\n\n" + msg + "\n")
    assert len(msg) >= 80
    code, err = _validate(project, capsys)
    assert code == 2
    assert err == ["recipes/r.yaml:9: evaluation.sets[0].file: evaluation set 'chat' shares paragraphs with "
                   "calibration file 'calibration/calib.txt' (fix: use held-out text that the calibration never saw)"]


def test_a_set_behind_a_symlink_is_refused(project, capsys):
    code_txt = project / "calibration" / "eval" / "code.txt"
    code_txt.unlink()
    os.symlink(project / "calibration" / "calib.txt", code_txt)
    code, err = _validate(project, capsys)
    assert code == 2
    assert any("evaluation.sets[1].file: evaluation set 'code' 'calibration/eval/code.txt' is a symlink" in e
               for e in err), err


def test_shipped_sets_are_held_out_from_every_calibration_file(capsys):
    """The demo's sets pass the same overlap check as its prose (validate reads every file)."""
    assert main(["validate", str(REPO / "recipes" / "smollm2-135m-demo.yaml")]) == 0, capsys.readouterr().err
    recipe = load_recipe(REPO / "recipes" / "smollm2-135m-demo.yaml")
    assert {s.name: s.kind for s in recipe.evaluation.all_sets()} == {"prose": "text", "code": "text", "chat": "chat"}


def test_shipped_chat_set():
    convs = parse_conversations(CHAT.read_bytes())
    assert len(convs) >= 50
    assert sum(1 for c in convs if c.messages[0]["role"] == "system") >= 10
    assert sum(1 for c in convs if c.uses_tools) >= 10
    assert all(sum(m["role"] == "user" for m in c.messages) >= 2 or c.uses_tools for c in convs)  # multi-turn
    with pytest.raises(ChatSetError) as e:
        parse_conversations(b'{"messages": []}\n')
    assert e.value.line == 1


def test_chat_is_rendered_with_special_tokens_as_tokens(tiny_llama):
    """The template's BOS/EOS text becomes the special ids, once per conversation and message; tool
    conversations are left out when the template does not mention tools."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    convs = parse_conversations(CHAT.read_bytes())
    chat = render_tokens(tok, convs)
    plain = [c for c in convs if not c.uses_tools]
    assert (chat.conversations, chat.skipped_tools) == (len(plain), len(convs) - len(plain))
    assert chat.ids.count(tok.bos_token_id) == len(plain)
    assert chat.ids.count(tok.eos_token_id) == sum(len(c.messages) for c in plain)
    assert "<s>" not in tok.decode([i for i in chat.ids if i not in (tok.bos_token_id, tok.eos_token_id)])


@pytest.mark.slow
def test_chat_reference_logits_are_read_by_llama_perplexity(tiny_llama, tiny_f16_gguf, toolchain, tmp_path):
    """quantkit writes the HF checkpoint's log-probs in llama-perplexity's own format: the F16 GGUF of the same
    weights then scores almost no divergence and the same perplexity, and Q2_K diverges more than Q8_0."""
    from quantkit.ggufinfo import adds_bos
    from quantkit.proc import run_tool
    from quantkit.recipe import EvalSet
    from quantkit.scoring.hf import write_base_logits
    from quantkit.scoring.llamacpp import gguf_vocab_size, score_gguf

    spec = EvalSet(name="chat", file="calibration/eval/chat-heldout.jsonl", ctx=128, max_tokens=1024)
    logits = tmp_path / "base-logits.bin"
    info = write_base_logits(model_dir=tiny_llama, conversations=parse_conversations(CHAT.read_bytes()), spec=spec,
                             n_vocab=gguf_vocab_size(tiny_f16_gguf), gguf_adds_bos=adds_bos(tiny_f16_gguf), out=logits)
    scores = {}
    for qtype in ("F16", "Q8_0", "Q2_K"):
        gguf = tiny_f16_gguf
        if qtype != "F16":
            gguf = tmp_path / f"{qtype}.gguf"
            run_tool([toolchain.binary("llama-quantize"), tiny_f16_gguf, gguf, qtype, "2"])
        work = tmp_path / qtype
        work.mkdir()
        scores[qtype] = score_gguf(gguf=gguf, base_logits=logits, text_file=CHAT, spec=spec, toolchain=toolchain,
                                   workdir=work)
    f16 = scores["F16"]
    assert f16.n_chunks == info["n_chunks"] == 8
    assert f16.kld_mean < 1e-3 and f16.same_top_pct > 99.0, f16
    assert abs(f16.ppl / info["base_ppl"] - 1) < 2e-3, (f16.ppl, info)
    assert scores["Q2_K"].kld_mean > 10 * scores["Q8_0"].kld_mean, scores
    assert scores["Q2_K"].kld_p999 >= scores["Q2_K"].kld_p99 > scores["Q2_K"].kld_mean


def _manifest_with_sets() -> dict:
    """A synthetic run: two sets; Q4 is worse on chat, Q3 on prose; GPTQ was scored on both."""
    def v(fmt, label, size, sets):
        scores = {**sets["prose"], "sets": {n: {**sc, "kind": "chat" if n == "chat" else "text", "ctx": 512,
                                                "n_tokens": 1020} for n, sc in sets.items()}}
        return {"format": fmt, "label": label, "file": f"m-{label}", "scores": scores,
                "files": {"model.gguf" if fmt == "gguf" else "model.safetensors": {"sha256": "ab" * 32, "size": size}},
                "info": {"gguf": {"parameters": 10**8}} if fmt == "gguf" else {}}

    def sc(kld, p999=None):
        return {"ppl": 10.0, "ppl_err": 0.1, "kld_mean": kld, "kld_mean_err": kld / 40, "kld_p99": kld * 5,
                "kld_p999": p999 if p999 is not None else kld * 9, "same_top_pct": 90.0}

    variants = [v("gguf", "F16", 2 * 10**8, {"prose": sc(0.0), "chat": sc(0.0)}),
                v("gguf", "Q8_0", 10**8, {"prose": sc(0.001), "chat": sc(0.002)}),
                v("gguf", "Q4_K_M", 6 * 10**7, {"prose": sc(0.02), "chat": sc(0.07)}),
                v("gguf", "Q3_K_M", 5 * 10**7, {"prose": sc(0.045), "chat": sc(0.03)}),
                v("gguf", "Q2_K", 4 * 10**7, {"prose": sc(0.2), "chat": sc(0.3)})]
    return {"schema": 2, "recipe": {"name": "r", "resolved": {"evaluation": {
        "file": "calibration/eval/en-prose-heldout.txt", "name": "prose", "ctx": 512,
        "sets": [{"name": "chat", "file": "calibration/eval/chat-heldout.jsonl", "ctx": 512}]}}},
        "model": {"path": "models/m"}, "variants": variants}


def test_recommendations_use_each_variants_worst_set():
    report = build_report(_manifest_with_sets())
    rows = {r["label"]: r for r in report["variants"]}
    assert report["sets"] == ["prose", "chat"]
    assert (rows["Q4_K_M"]["worst_set"], rows["Q4_K_M"]["worst_kld_mean"]) == ("chat", 0.07)
    assert (rows["Q3_K_M"]["worst_set"], rows["Q3_K_M"]["worst_kld_mean"]) == ("prose", 0.045)
    # On prose alone Q4_K_M (0.02) would be the smallest under 0.05 after Q3_K_M; on its worst set it is not.
    smallest = [rec for rec in report["recommended"] if rec["why"].startswith("smallest variant")]
    assert smallest == [{"id": "gguf:Q3_K_M", "why": "smallest variant with mean KLD under 0.05 on its worst "
                                                      "evaluation set (set `prose`: 0.0450 ± 0.0011)"}]
    md = render_markdown(report)
    assert "### Set `prose`" in md and "### Set `chat`" in md
    assert "| gguf | Q4_K_M (worst) | 0.056 | 10.0000 | 0.07000 ± 0.00175 ◀ | 0.35000 | 0.63000 | 90.00 |" in md
    assert "Pareto frontier (size vs mean KLD on each variant's worst evaluation set" in md


def test_one_set_keeps_the_single_table():
    m = _manifest_with_sets()
    for v in m["variants"]:
        del v["scores"]["sets"]
    report = build_report(m)
    assert report["sets"] == [] and report["pareto_metric"] == "kld_mean"
    assert "## Evaluation sets" not in render_markdown(report)


def test_calibration_conversations_are_rendered_between_the_paragraphs(tiny_llama):
    """calibration.conversations go through the chat template and are spread through the text, so the imatrix's
    bounded chunks see them; the text is marked for llama-imatrix --parse-special."""
    from quantkit.calibration import interleave, load_calibration
    from quantkit.recipe import Calibration

    spec = Calibration(files=["calibration/en-prose.txt"], conversations=["calibration/chat-calibration.jsonl"])
    calib = load_calibration(spec, root=REPO, model_dir=tiny_llama)
    plain = load_calibration(Calibration(files=["calibration/en-prose.txt"]), root=REPO)
    assert calib.parse_special and not plain.parse_special
    assert calib.sources == ("calibration/en-prose.txt", "chat:calibration/chat-calibration.jsonl")
    n = len(parse_conversations((REPO / "calibration" / "chat-calibration.jsonl").read_bytes()))
    assert calib.text.count("<|assistant|>") == sum(
        m["role"] == "assistant" for c in parse_conversations((REPO / "calibration" / "chat-calibration.jsonl")
                                                                .read_bytes()) for m in c.messages)
    first_chat = calib.text.index("<|user|>")
    assert 0 < first_chat < len(calib.text) // n + len(calib.text) // 10  # not all at the end
    assert interleave("a\n\nb\n\nc\n", ["X", "Y"]) == "a\n\nX\n\nb\n\nY\n\nc\n"


def test_conversations_count_as_calibration_text_for_the_overlap_check(project, capsys):
    shutil.copy(CHAT, project / "calibration" / "talk.jsonl")
    code, err = _validate(project, capsys, RECIPE.replace(
        "  files: [calibration/calib.txt]", "  files: [calibration/calib.txt]\n  conversations: [calibration/talk.jsonl]"))
    assert code == 2
    assert any("evaluation.sets[0].file: evaluation set 'chat' shares paragraphs with calibration file "
               "'calibration/talk.jsonl'" in e for e in err), err


def test_conversation_text_is_data_not_template(tiny_llama):
    """A message that looks like Jinja reaches the rendering as a value: printed as written, never run."""
    from transformers import AutoTokenizer

    from quantkit.scoring.chat import render_texts

    hostile = b'{"messages": [{"role": "user", "content": "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %}"}]}\n'
    texts, skipped = render_texts(AutoTokenizer.from_pretrained(tiny_llama), parse_conversations(hostile))
    assert skipped == 0 and "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %}" in texts[0] and "49" not in texts[0]

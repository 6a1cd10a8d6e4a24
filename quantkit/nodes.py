"""What a node is, and what its step functions share: the vocabulary below ``quantkit.graph``.

``quantkit.graph`` lists the node kinds (``KINDS``, filled there) and builds a recipe's graph; modules that
define a kind's steps (``quantkit.evalsets``, ``quantkit.budget``) import from here, so nothing below the graph
imports it. The variant formats a kind produces are in ``quantkit.formats``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.calibration import CalibrationText
from quantkit.context import RunContext
from quantkit.digest import write_json_atomic
from quantkit.recipe import Recipe
from quantkit.source import ModelSnapshot
from quantkit.store import Entry, Store


@dataclass(frozen=True)
class Node:
    name: str  # unique in the graph: "quantize:Q4_K_M", "score-gguf:F16", "tasks-hf:HF:arc_easy"
    kind: str  # key of KINDS
    label: str  # the variant (or step detail) in the user's words
    needs: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)  # plain data from the recipe

    @property
    def spec(self) -> StepKind:
        return KINDS[self.kind]  # filled by quantkit.graph


@dataclass(frozen=True)
class Source:
    """The source node's result: the pinned model folder and the calibration text."""

    model: ModelSnapshot
    calibration: CalibrationText


Results = Mapping[str, Any]  # node name -> result, for the node's needs


@dataclass(frozen=True)
class StepKind:
    """What one kind of node is, the one definition every tool reads (run, plan, preflight, flow, gc, report).

    ``inputs`` is the store key's source (None for nodes that are not stored); ``run`` produces the result;
    ``store_step`` is the store folder its output lives in. ``cost`` and ``seconds`` estimate it
    (``f(recipe, params, facts)``, quantkit.estimate; params are the node's with its label); ``large``: `store
    gc --entries` keeps its entries only when a manifest names their key. ``format``: the variant format its
    output is (None: not a variant). ``scores``: how its result enters its variant's scores
    (``f(scores, result)``), for the measuring kinds. ``check``: run on its result, built or reused (the chance
    test of a task)."""

    run: Callable[[RunContext, Node, Results], Any]
    produces: str
    inputs: Callable[[RunContext, Node, Results], dict] | None = None
    store_step: str | None = None
    gpu: bool = False
    network: Callable[[Recipe], bool] = lambda recipe: False
    lazy: bool = False  # made only when a dependent that is not stored yet needs it
    transient: bool = False  # removed from the store when the run no longer needs it
    time_class: str = "minutes"
    cost: Callable[[Recipe, Mapping, Any], Any] | None = None
    seconds: Callable[[Recipe, Mapping, Any], float] | None = None
    large: bool = False
    format: str | None = None
    scores: Callable[[dict, Any], None] | None = None
    check: Callable[[RunContext, Node, Any], None] | None = None
    found: Callable[[RunContext], Any] | None = None  # the plan's result of a kind not in the store, when on disk

    def key(self, ctx: RunContext, node: Node, deps: Results) -> str | None:
        return None if self.inputs is None else Store.key(self.inputs(ctx, node, deps))

    def stored(self, ctx: RunContext, node: Node, deps: Results) -> Entry | None:
        """The finished result without running, when the store holds it: the one answer to "is this node
        done?" (the executor's reuse, the plan, the preflight)."""
        if self.inputs is None or self.store_step is None:
            return None
        return ctx.store.get(self.store_step, self.inputs(ctx, node, deps))


KINDS: dict[str, StepKind] = {}  # kind name -> definition; the kinds are listed in quantkit.graph


# Checkpoints GPTQModel makes, each kind also the name of its recipe list; rtn is a reference, never published.
CHECKPOINT_KINDS = ("gptq", "awq", "rtn")


def gguf_file(entry: Entry) -> tuple[Path, str]:
    """A GGUF variant's file and sha256."""
    return entry.file("model.gguf"), entry.files["model.gguf"].sha256


def model_dir_and_identity(node: Node, deps: Results) -> tuple[Path, str]:
    """The folder of a torch variant (the source model or a stored checkpoint) and its identity."""
    made = deps[node.needs[0]]
    if isinstance(made, Source):
        made.model.check_links()  # transformers follows links: none may have appeared since fetch_model
        return made.model.path, made.model.digest
    return made.path, made.key


def stored_json(store: Store, step: str, inputs: dict, what: str, compute: Callable[[Any], Any]) -> Entry:
    """A step whose result is one JSON value: ``compute(staging)`` runs only when the store lacks it; the
    value is kept as ``<what>.json`` and in ``entry.info[what]``."""
    def produce(staging) -> None:
        value = compute(staging)
        write_json_atomic(staging.path / f"{what}.json", value)
        staging.info[what] = value

    return store.ensure(step, inputs, produce)

"""`quantkit plan`: every node of the run's graph, whether it is done, and what it costs.

Status comes from the store: a node is done when the store holds the output under the key the node
would compute, from the results of the nodes before it that are done themselves. Costs come from
quantkit.estimate. The preflight reads the same totals.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quantkit.context import RunContext
from quantkit.errors import QuantkitError
from quantkit.estimate import Cost, FactsUnavailable, GiB, ModelFacts, read_hub_facts, read_local_facts
from quantkit.formats import FORMATS
from quantkit.graph import KINDS, Node, Source, build_graph, node_cost, node_seconds

DONE, TODO = "done", "to do"


@dataclass(frozen=True)
class PlannedNode:
    name: str
    kind: str
    label: str
    status: str  # "done" or "to do"
    why: str  # what decides the status
    needs: tuple[str, ...]
    key: str | None
    disk_bytes: int | None
    ram_bytes: int | None
    time_class: str
    gpu: bool
    network: bool
    unknown: str | None = None  # why disk or RAM is unknown
    seconds: float | None = None  # estimated wall time on the reference machine (quantkit.estimate.seconds)
    shards: int | None = None  # a GGUF over publish.max_file_gib: the llama-gguf-split shards it is published as


@dataclass(frozen=True)
class Totals:
    disk_bytes: int | None  # new disk of the nodes still to do
    ram_bytes: int | None  # the largest peak of a node still to do
    ram_node: str | None
    unknown: tuple[str, ...]  # nodes whose figures are unknown


@dataclass(frozen=True)
class Machine:
    free_disk: int
    available_ram: int


def machine(store_root: Path) -> Machine:
    path = store_root
    while not path.exists():
        path = path.parent
    from quantkit.hardware import available_memory

    return Machine(shutil.disk_usage(path).free, available_memory() or 1 << 62)


def plan(ctx: RunContext, *, publish: bool = True, names: set[str] | None = None,
         cost_done: bool = True) -> list[PlannedNode]:
    """Every node of the run (with ``names``, those nodes: a set closed under their needs), its status and its
    estimates. ``cost_done=False`` leaves the figures of done nodes out (None): what a run's preflight needs,
    which a warm run would otherwise spend most of its time on."""
    nodes = [n for n in build_graph(ctx.recipe, publish=publish) if names is None or n.name in names]
    source = next((found(ctx) for n in nodes if (found := n.spec.found) is not None), None)
    facts: list = []  # read when a figure is first needed (the safetensors headers)
    lazy = {n.name for n in nodes if n.spec.lazy}
    results: dict[str, Any] = {}
    statuses = {node.name: _status(ctx, node, results, source, lazy) for node in nodes}
    # a lazy node is made only for a dependent still to do
    wanted = {d for n in nodes if statuses[n.name][0] != DONE for d in n.needs}
    out = []
    for node in nodes:
        status, why, key = statuses[node.name]
        spec = node.spec
        if not cost_done and (status == DONE or (spec.lazy and node.name not in wanted)):
            c, secs, unknown_why = Cost(None, None), None, None
        else:
            if not facts:
                facts.extend(model_facts(ctx, source))
            c, secs, unknown_why = node_cost(ctx.recipe, node, facts[0]), node_seconds(ctx.recipe, node, facts[0]), facts[1]
        out.append(PlannedNode(node.name, node.kind, node.label, status, why, node.needs, key, c.disk_bytes,
                               c.ram_bytes, spec.time_class, spec.gpu, spec.network(ctx.recipe),
                               c.unknown and (unknown_why or c.unknown), secs,
                               publish_shards(ctx.recipe, spec.format, c.disk_bytes)))
    return out


def publish_shards(recipe, fmt: str | None, size: int | None) -> int | None:
    """How many shards a published GGUF (a variant of format ``fmt``) of ``size`` bytes is published as
    (``publish.max_file_gib``), when more than one."""
    from quantkit.publish.release import shard_bytes_for, split_names
    from quantkit.recipe import Publish

    limit = (recipe.publish or Publish()).max_file_bytes
    if fmt is None or not FORMATS[fmt].split or size is None or size <= limit:
        return None
    return len(split_names("x.gguf", size, shard_bytes=shard_bytes_for(limit)))


def model_facts(ctx: RunContext, source: Source | None) -> tuple[ModelFacts | None, str | None]:
    """The model's facts (shapes, config) and, when they are missing, why: from the folder on disk, or
    for a Hub model not downloaded yet from its safetensors headers (Range requests, no weights)."""
    if source is not None:
        return read_local_facts(source.model.path), None
    model = ctx.recipe.model
    if model.repo:
        try:
            return read_hub_facts(model.repo, model.revision), None
        except FactsUnavailable as e:
            return None, str(e)
    return None, f"the model folder {model.path} is missing"


def _status(ctx: RunContext, node: Node, results: dict, source: Source | None,
            lazy: set[str]) -> tuple[str, str, str | None]:
    """(status, why, store key when it can be computed yet); a done node's result goes into ``results``."""
    if node.spec.found is not None:  # not in the store: on disk (the model folder) or not
        if source is None:
            return TODO, "not on disk yet" if ctx.recipe.model.repo else "the model folder is missing", None
        results[node.name] = source
        return DONE, f"on disk, digest {source.model.digest[:12]}", None
    if ctx.toolchain is None:
        return TODO, "the toolchain is not built", None
    if node.spec.lazy:
        return TODO, "made only if a score that needs it is missing; deleted after the run", None
    missing = [d for d in node.needs if d not in results and d not in lazy]
    if missing:
        return TODO, f"after {missing[0]}", None
    if node.spec.inputs is None or node.spec.store_step is None:
        # tasks: their key holds the items' digest, which only lm-eval's loader knows
        return TODO, "checked when it runs" if node.spec.store_step else "every run", None
    deps = {d: results[d] for d in node.needs if d in results}
    try:
        key = node.spec.key(ctx, node, deps)
        stored = node.spec.stored(ctx, node, deps)
    except QuantkitError as e:  # e.g. GPTQModel not installed: its version is part of the key
        return TODO, str(e), None
    if stored is None:
        return TODO, "not in the store", key
    results[node.name] = stored
    return DONE, f"in the store ({node.spec.store_step}/{key[:12]})", key


def totals(rows: list[PlannedNode]) -> Totals:
    todo = [r for r in rows if r.status != DONE]  # the source too: a download adds its bytes
    # a kind that takes measurable time has a peak RAM; the source, the run folder and publishing have none
    unknown = tuple(r.name for r in todo if r.disk_bytes is None or (r.ram_bytes is None and KINDS[r.kind].seconds))
    disk = sum(r.disk_bytes or 0 for r in todo)
    worst = max(todo, key=lambda r: r.ram_bytes or 0, default=None)
    return Totals(disk, worst.ram_bytes if worst else None, worst.name if worst else None, unknown)


def _duration(s: float) -> str:
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.0f} min"


def _fmt(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def render(rows: list[PlannedNode], *, have: Machine | None = None) -> str:
    table = [("node", "status", "why", "disk", "peak RAM", "time", "needs")]
    for r in rows:
        flags = "/".join(f for f, on in (("gpu", r.gpu), ("net", r.network)) if on)
        disk = _fmt(r.disk_bytes) + (f" ({r.shards} shards)" if r.shards else "")
        table.append((r.name, r.status, r.why, disk, _fmt(r.ram_bytes),
                      (f"~{_duration(r.seconds)}" if r.seconds is not None else r.time_class)
                      + (f" {flags}" if flags else ""),
                      ", ".join(r.needs) if len(r.needs) <= 3 else f"{len(r.needs)} nodes"))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    t = totals(rows)
    todo = len([r for r in rows if r.status != DONE])
    if t.unknown and not t.disk_bytes and not t.ram_bytes:  # nothing is known: no figure is better than 0
        lines.append(f"{todo} of {len(rows)} nodes to do; new disk and peak RAM: unknown (estimates)")
    else:
        at_least = "at least " if t.unknown else ""
        lines.append(f"{todo} of {len(rows)} nodes to do; new disk: {at_least}{_fmt(t.disk_bytes)}; peak RAM: "
                     f"{at_least}{_fmt(t.ram_bytes)} ({t.ram_node or 'nothing to do'}) (estimates)")
    if t.unknown:
        whys = sorted({r.unknown for r in rows if r.name in t.unknown and r.unknown})
        lines.append(f"unknown: disk and RAM of {len(t.unknown)} nodes ({', '.join(t.unknown[:4])}"
                     f"{', ...' if len(t.unknown) > 4 else ''}): {'; '.join(whys) or 'no estimate for this kind'}")
    if have:
        lines.append(verdict(t, have))
    return "\n".join(lines)


def verdict(t: Totals, have: Machine) -> str:
    """Whether this machine can hold the run, with the numbers (the preflight refuses on the same)."""
    short = []
    if t.disk_bytes and t.disk_bytes > have.free_disk:
        short.append("disk")
    if t.ram_bytes and t.ram_bytes > have.available_ram:
        short.append("RAM")
    need = f"needs {_fmt(t.disk_bytes)} disk, {_fmt(t.ram_bytes)} RAM ({t.ram_node or 'nothing to do'})"
    has = f"this machine has {_fmt(have.free_disk)} free disk, {_fmt(have.available_ram)} RAM available"
    if short:
        return f"this machine cannot hold the run: it {need}; {has}: not enough {' and '.join(short)} " \
               "(`quantkit run` refuses before any work)"
    if t.unknown and not t.disk_bytes and not t.ram_bytes:
        return f"whether it fits is unknown; {has}"
    if t.unknown:
        return f"the known part {need}; {has}"
    return f"the run {need}; {has}: it fits"


def to_json(rows: list[PlannedNode], have: Machine | None = None) -> str:
    t = totals(rows)
    return json.dumps({"schema": 1, "nodes": [asdict(r) for r in rows], "totals": asdict(t),
                       "machine": asdict(have) if have else None}, indent=2)

"""The recipe's graph: every node the run executes, in dependency order; and the executor's rules
(dependencies first, bounded concurrency, lazy nodes only when needed, the first failure stops it)."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from quantkit import graph
from quantkit.graph import KINDS, Node, StepKind, build_graph
from quantkit.executor import execute
from quantkit.recipe import load_recipe
from quantkit.sensitivity import CANDIDATES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    return load_recipe(REPO / "recipes" / "smollm2-135m-demo.yaml")


def test_demo_graph_has_every_unit_of_work(demo):
    nodes = build_graph(demo)
    names = [n.name for n in nodes]
    assert len(names) == len(set(names))
    labels = [label for _, _, label in demo.variant_labels()]
    stock = ["F16", *[demo.gguf.label(v) for v in demo.gguf.types]]
    searched = [t.name for t in demo.gguf.targets]
    gguf = stock + searched
    checkpoints = [v.name for v in demo.gptq] + [v.name for v in demo.awq]
    expected = {"source", "convert", "imatrix", "base-logits", "run-folder", "publish",
                *(f"task-items:{t.name}" for t in demo.evaluation.tasks),
                *(f"quantize:{label}" for label in stock[1:]),
                # gguf.targets: a sensitivity table per candidate type, the KLD per role, then a mix per target
                *(f"sensitivity:{t}" for t in CANDIDATES), "sensitivity-kld",
                *(f"{kind}:{label}" for label in searched for kind in ("mix", "quantize-mix")),
                *(f"{kind}-gguf:{label}" for label in gguf for kind in ("score", "bench")),
                *(f"tasks-gguf:{label}:{t.name}" for label in gguf for t in demo.evaluation.tasks),
                *(f"gptq:{v.name}" for v in demo.gptq), *(f"awq:{v.name}" for v in demo.awq),
                *(f"{kind}-hf:{label}" for label in ["HF", *checkpoints] for kind in ("score", "bench")),
                *(f"tasks-hf:{label}:{t.name}" for label in ["HF", *checkpoints] for t in demo.evaluation.tasks),
                *(f"serve-gguf:{label}" for label in gguf), *(f"serve-hf:{label}" for label in checkpoints),
                # evaluation.sets: the reference on each set, every variant scored on each (quantkit.evalsets)
                *(f"set-logits:{s.name}" for s in demo.evaluation.sets),
                *(f"score-set-gguf:{label}:{s.name}" for label in gguf for s in demo.evaluation.sets),
                *(f"score-set-hf:{label}:{s.name}" for label in ["HF", *checkpoints] for s in demo.evaluation.sets)}
    assert set(names) == expected
    assert sorted(labels) == sorted(gguf + checkpoints)
    # Dependencies come first, and every kind is defined once.
    seen: set[str] = set()
    for node in nodes:
        assert set(node.needs) <= seen, node
        assert node.kind in KINDS
        seen.add(node.name)
    by = {n.name: n for n in nodes}
    assert by["quantize:Q4_K_M"].needs == ("convert", "imatrix")
    assert by["score-gguf:Q2_K"].needs == ("quantize:Q2_K", "convert", "base-logits")
    assert by["score-gguf:F16"].needs == ("convert",)  # the base is scored without KLD, so no logits
    assert by["serve-gguf:Q2_K"].needs == ("quantize:Q2_K", "source")  # the source's template is the reference
    assert by["serve-hf:GPTQ-4bit-g64"].needs == ("gptq:GPTQ-4bit-g64", "source")
    # a task node is keyed by the digest of its task's items, made once for every variant
    assert by["tasks-gguf:Q2_K:which-word-fits"].needs == ("quantize:Q2_K", "task-items:which-word-fits")
    assert by["score-set-gguf:F16:code"].needs == ("convert",)  # a text set: the base against itself
    assert by["score-set-gguf:F16:chat"].needs == ("convert", "source", "set-logits:chat")  # against the HF model
    assert by["score-set-gguf:Q2_K:code"].needs == ("quantize:Q2_K", "convert", "set-logits:code")
    assert by["score-set-gguf:Q2_K:code"].params["logits"] == "set-logits:code"  # what the step reads its reference by
    assert by["score-set-gguf:F16:code"].params["logits"] is None
    # the size-budget search reads each candidate type's table by the node the graph named for it
    for name in ("sensitivity-kld", *(f"mix:{label}" for label in searched)):
        tables = by[name].params["tables"]
        assert [t for t, _ in tables] == list(CANDIDATES) and {n for _, n in tables} <= set(by[name].needs)
    lazy = {"base-logits", *(f"set-logits:{s.name}" for s in demo.evaluation.sets)}
    assert set(by["run-folder"].needs) == set(names) - {"run-folder", "publish"} - lazy
    variants = [label for _, label, _ in by["run-folder"].params["variants"]]
    assert variants == [*gguf, "HF", *checkpoints]


def test_a_variants_scores_on_each_set_are_its_own_set_nodes(demo):
    """variant_scores finds a variant's score on every evaluation set through the graph: the set nodes whose
    first need is the node that made it, never another variant's of the same set."""
    from types import SimpleNamespace

    from quantkit.graph import variant_scores

    nodes = build_graph(demo)
    sets = [s.name for s in demo.evaluation.sets]
    scored = [n for n in nodes if n.kind in ("score-gguf", "score-set-gguf", "score-hf", "score-set-hf")]
    # each node's score is its own name, so the test sees which node a value came from
    deps = {n.name: SimpleNamespace(info={"score": {"kld_mean": 0.5, "ppl": n.name}}) for n in scored}
    ctx = SimpleNamespace(recipe=demo)
    q2k = variant_scores(ctx, "quantize:Q2_K", deps, nodes)["sets"]
    assert {name: v["ppl"] for name, v in q2k.items()} == {
        demo.evaluation.set_name: "score-gguf:Q2_K", **{s: f"score-set-gguf:Q2_K:{s}" for s in sets}}
    hf = variant_scores(ctx, "source", deps, nodes)["sets"]
    assert {name: v["ppl"] for name, v in hf.items()} == {
        demo.evaluation.set_name: "score-hf:HF", **{s: f"score-set-hf:HF:{s}" for s in sets}}
    assert {v["reference"] for v in hf.values()} == {"HF checkpoint"}


def test_until_takes_the_node_and_what_it_needs(demo):
    from quantkit.graph import UnknownNode, needed_for

    nodes = build_graph(demo)
    assert [n.name for n in needed_for(nodes, "score-gguf:Q2_K")] == [
        "source", "convert", "imatrix", "quantize:Q2_K", "base-logits", "score-gguf:Q2_K"]
    assert [n.name for n in needed_for(nodes, "convert")] == ["source", "convert"]
    with pytest.raises(UnknownNode, match="no node 'quantize:Q9_K'; it has quantize:Q8_0, quantize:Q6_K"):
        needed_for(nodes, "quantize:Q9_K")


def test_flags_and_publish_switch(demo):
    nodes = {n.name: n for n in build_graph(demo, publish=False)}
    assert "publish" not in nodes
    gpu = {n.kind for n in nodes.values() if n.spec.gpu}
    assert gpu == {"imatrix", "base-logits", "score-gguf", "tasks-gguf", "bench-gguf", "gptq", "awq", "score-hf",
                   "tasks-hf", "bench-hf", "set-logits", "score-set-gguf", "score-set-hf",
                   "sensitivity-kld", "mix"}  # the size-budget search measures KLD with llama-perplexity
    assert not any(n.spec.network(demo) for n in nodes.values())  # a local model folder, local publish
    hub = demo.model_copy(update={"model": demo.model.model_copy(update={"repo": "a/b", "path": None})})
    assert [n.name for n in build_graph(hub) if n.spec.network(hub)] == ["source"]


# --- the executor, on a graph of its own kinds ----------------------------------------------------

class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.in_flight = self.most = 0

    def run(self, ctx, node, deps):
        with self.lock:
            self.started.append(node.name)
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.05)
        with self.lock:
            self.in_flight -= 1
        if node.params.get("fail"):
            raise RuntimeError(f"{node.name} failed")
        return {"node": node.name, "deps": sorted(deps)}


@pytest.fixture
def kinds(monkeypatch):
    rec = Recorder()
    stored: dict[str, dict] = {}

    def stored_result(ctx, node, deps):
        return stored.get(node.name)

    monkeypatch.setitem(KINDS, "t", StepKind(rec.run, "a result"))
    monkeypatch.setitem(KINDS, "t-lazy", StepKind(rec.run, "a lazy input", lazy=True))
    # A kind whose result may be "in the store" already (then its lazy input is not needed).
    kind = StepKind(rec.run, "a stored result", inputs=lambda ctx, node, deps: {"n": node.name}, store_step="x")
    monkeypatch.setitem(KINDS, "t-stored", kind)
    monkeypatch.setattr(StepKind, "stored", lambda self, ctx, node, deps: stored_result(ctx, node, deps))
    monkeypatch.setattr(graph, "with_reuse", lambda r: r | {"reused": True})
    import quantkit.executor
    monkeypatch.setattr(quantkit.executor, "with_reuse", lambda r: r | {"reused": True})
    return rec, stored


def run(nodes, parallel, keep=frozenset()):
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        return execute(None, nodes, lambda node, deps: pool.submit(KINDS[node.kind].run, None, node, deps),
                       parallel=parallel, poll=0.005, keep=keep)


def test_dependencies_first_and_bounded(kinds):
    rec, _ = kinds
    nodes = [Node("a", "t", "a"), *[Node(f"b{i}", "t", "b", ("a",)) for i in range(6)],
             Node("c", "t", "c", tuple(f"b{i}" for i in range(6)))]
    results = run(nodes, parallel=3)
    assert rec.started[0] == "a" and rec.started[-1] == "c"
    assert rec.most == 3
    assert results["c"]["deps"] == [f"b{i}" for i in range(6)]
    assert list(results) == [n.name for n in nodes]  # graph order, whatever order they finished in


def test_lazy_node_only_when_a_dependent_is_missing(kinds):
    rec, stored = kinds
    nodes = [Node("base", "t", "b"), Node("logits", "t-lazy", "l", ("base",)),
             Node("s1", "t-stored", "1", ("base", "logits")), Node("s2", "t-stored", "2", ("base", "logits"))]
    stored.update({"s1": {"node": "s1"}, "s2": {"node": "s2"}})
    results = run(nodes, parallel=1)
    assert rec.started == ["base"] and "logits" not in results
    assert results["s1"] == {"node": "s1", "reused": True}
    del stored["s2"]
    rec.started.clear()
    results = run(nodes, parallel=1)
    assert rec.started == ["base", "logits", "s2"]
    assert results["s2"]["deps"] == ["base", "logits"]


def test_a_lazy_node_asked_for_runs(kinds):
    """``quantkit run --until base-logits``: the lazy node is the target, so it runs with no dependent."""
    rec, _ = kinds
    nodes = [Node("base", "t", "b"), Node("logits", "t-lazy", "l", ("base",))]
    assert "logits" not in run(nodes, parallel=1)
    results = run(nodes, parallel=1, keep=frozenset({"logits"}))
    assert rec.started == ["base", "base", "logits"] and results["logits"]["deps"] == ["base"]


def test_first_failure_stops_new_work_and_is_raised(kinds):
    rec, _ = kinds
    nodes = [Node("a", "t", "a", params={"fail": True}), Node("b", "t", "b", ("a",)), Node("c", "t", "c")]
    with pytest.raises(RuntimeError, match="a failed"):
        run(nodes, parallel=1)
    assert "b" not in rec.started


def test_library_output_of_parallel_nodes_goes_to_each_nodes_log(tmp_path, capsys):
    from quantkit.executor import _printed_to

    def node(i):
        with open(tmp_path / f"{i}.log", "w") as f, _printed_to(f):
            for k in range(200):
                print(f"node {i} line {k}")
                print(f"\rnode {i} bar {k}%", end="", file=sys.stderr)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("quantkit's own line")
    for i in range(4):
        text = (tmp_path / f"{i}.log").read_text()
        assert text.startswith(f"node {i} line 0\n")
        assert text.count(f"node {i} line") == 200 and text.count("bar") == 200
        assert f"node {(i + 1) % 4}" not in text
    assert capsys.readouterr().out == "quantkit's own line\n"


def test_manifest_round_trips_and_refuses_an_unknown_schema(tmp_path):
    from quantkit.errors import StoreError
    from quantkit.manifest import Manifest, ManifestStep

    m = Manifest(recipe={"name": "r"}, model={"digest": "d"}, calibration={"sha256": "c"}, toolchain=None,
                 steps=(ManifestStep("convert", "k" * 32, False, 1.5),), variants=({"format": "gguf", "label": "F16"},))
    (tmp_path / "manifest.json").write_text(json.dumps(m.to_dict()))
    assert Manifest.read(tmp_path / "manifest.json") == m
    with pytest.raises(StoreError, match="schema 99"):
        Manifest.from_dict(m.to_dict() | {"schema": 99})


def test_threads_a_lone_node_starts_print_to_its_log(tmp_path, capsys):
    """GPTQModel quantizes in worker threads of its own: while one node runs, their output is the node's."""
    from quantkit.executor import _printed_to

    with open(tmp_path / "n.log", "w") as f, _printed_to(f):
        worker = threading.Thread(target=lambda: print("Quantizing layer 3 of 29", file=sys.stderr))
        worker.start()
        worker.join()
    print("after the node")
    assert (tmp_path / "n.log").read_text() == "Quantizing layer 3 of 29\n"
    assert capsys.readouterr().out == "after the node\n"

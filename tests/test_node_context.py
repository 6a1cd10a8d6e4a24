"""A node builds its world where it runs (#24): its context from the run's RunSpec and this process's
environment, keys of machine-dependent results that say which machine facts went in, the machine that
built each entry in the manifest, and a preflight of the node on the machine that picked it."""

from __future__ import annotations

import dataclasses
import pickle
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from quantkit import context, graph
from quantkit.errors import NodeDoesNotFit, RecipeChanged, ResourceError
from quantkit.graph import Node, StepKind
from quantkit.executor import execute, local_submit, run_node
from quantkit.plan import Machine, PlannedNode
from quantkit.recipe import load_recipe
from quantkit.manifest import Manifest, ManifestStep
from quantkit.runfolder import _made_by
from quantkit.store import Store
from quantkit.toolchain import Toolchain

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "smollm2-135m-demo.yaml"
GiB = 2**30


def fake_toolchain(*, cuda: bool | None = None) -> Toolchain:
    return Toolchain(src=Path("/nowhere/src"), bin_dir=Path(f"/tools/{'cuda' if cuda else 'cpu'}/bin"),
                     commit="abc1234", origin="cache", cuda=bool(cuda))


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.setattr(context, "ensure_toolchain", fake_toolchain)
    monkeypatch.delenv(context.CUDA_ENV, raising=False)
    return context.RunSpec(DEMO.resolve(), REPO, tmp_path / "store", context._sha256(DEMO))


def test_a_node_builds_its_context_from_its_own_environment(spec, monkeypatch):
    monkeypatch.setenv(context.THREADS_ENV, "3")
    ctx = pickle.loads(pickle.dumps(spec)).context()  # what a Ray task receives, unpickled there
    assert (ctx.threads, ctx.toolchain.cuda, ctx.store.root, ctx.recipe.name) == (
        3, False, spec.store_root, "smollm2-135m-demo")
    assert spec.context() is ctx  # built once per process
    assert ctx.store.made_by == {"host": socket.gethostname(), "toolchain": "abc1234",
                                 "toolchain_dir": "/tools/cpu/bin", "threads": 3}
    monkeypatch.setenv(context.THREADS_ENV, "5")
    monkeypatch.setenv(context.CUDA_ENV, "1")  # another worker's environment
    other = spec.context()
    assert (other.threads, other.toolchain.build, other.store.made_by["toolchain_dir"]) == (
        5, "abc1234+cuda", "/tools/cuda/bin")
    assert ctx.spec == spec  # the head's spec is what every node carries


def test_a_recipe_edited_after_planning_is_refused_where_the_node_runs(spec):
    stale = context.RunSpec(spec.recipe_file, spec.root, spec.store_root, "0" * 64)
    with pytest.raises(RecipeChanged, match="changed since the run was planned"):
        stale.context()


def machine_ctx(recipe, *, threads: int, device: str, store: Path | None = None):
    return SimpleNamespace(recipe=recipe, threads=threads, device=device, root=REPO, store=store,
                           tools=fake_toolchain(), toolchain=fake_toolchain())


def test_keys_of_machine_dependent_results_name_the_machine():
    recipe = load_recipe(DEMO, root=REPO)
    made = SimpleNamespace(path=Path("/store/gptq/k"), key="k" * 32)
    bench_hf = Node("bench-hf:W4", "bench-hf", "W4", ("gptq:W4",))
    score_hf = Node("score-hf:HF", "score-hf", "HF", ("source",), {"is_base": True})
    source = graph.Source(SimpleNamespace(path=Path("/m"), digest="d" * 64, check_links=lambda: None), None)
    cpu3, cpu2, gpu3 = (machine_ctx(recipe, threads=3, device="cpu"), machine_ctx(recipe, threads=2, device="cpu"),
                        machine_ctx(recipe, threads=3, device="cuda"))
    hf = graph._bench_hf_inputs(cpu3, bench_hf, {"gptq:W4": made})
    assert (hf["threads"], hf["device"]) == (3, "cpu")
    keys = {Store.key(graph._bench_hf_inputs(c, bench_hf, {"gptq:W4": made})) for c in (cpu3, cpu2, gpu3)}
    assert len(keys) == 3
    scores = {Store.key(graph._score_hf_inputs(c, score_hf, {"source": source})) for c in (cpu3, cpu2, gpu3)}
    assert len(scores) == 2  # the device, not the threads, changes a score
    task = recipe.evaluation.tasks[0].name
    tasks_hf = Node(f"tasks-hf:HF:{task}", "tasks-hf", "HF", ("source", f"task-items:{task}"), {"task": task})
    items = SimpleNamespace(info={"items_sha256": "i" * 64})
    tasks = {Store.key(graph._tasks_hf_inputs(c, tasks_hf, {"source": source, f"task-items:{task}": items}))
             for c in (cpu3, cpu2, gpu3)}
    assert len(tasks) == 2  # tasks-hf runs on the worker's device too, which its key says as score-hf's does
    gguf = SimpleNamespace(file=lambda name: Path("/q.gguf"),
                           files={"model.gguf": SimpleNamespace(sha256="s" * 64)})
    bench_gguf = Node("bench-gguf:Q4_K_M", "bench-gguf", "Q4_K_M", ("quantize:Q4_K_M",))
    assert graph._bench_gguf_inputs(cpu2, bench_gguf, {"quantize:Q4_K_M": gguf})["threads"] == 2


def test_a_checkpoint_key_names_the_device_and_on_the_cpu_the_threads():
    """GPTQ on the CPU gives other bytes with another torch thread count (the two-node Ray test found it)."""
    recipe = load_recipe(DEMO, root=REPO)
    node = Node("gptq:W4", "gptq", "W4", ("source",), {"index": 0})
    source = graph.Source(SimpleNamespace(path=Path("/m"), digest="d" * 64, check_links=lambda: None),
                          SimpleNamespace(sha256="c" * 64))
    keys = {(t, d): Store.key(graph._checkpoint_inputs(machine_ctx(recipe, threads=t, device=d), node,
                                                       {"source": source}))
            for t in (2, 3) for d in ("cpu", "cuda")}
    assert keys[2, "cpu"] != keys[3, "cpu"] and keys[2, "cuda"] == keys[3, "cuda"] != keys[2, "cpu"]


def test_the_manifest_names_the_machine_that_built_each_step(tmp_path):
    store = Store(tmp_path)
    store.made_by = {"host": "gpu-1", "toolchain": "abc1234+cuda", "toolchain_dir": "/tools/cuda/bin", "threads": 7}
    entry = store.ensure("x", {"a": 1}, lambda staging: (staging.path / "f").write_text("x"))
    assert entry.info["made_by"]["host"] == "gpu-1"
    step = ManifestStep("imatrix", entry.key, entry.reused, entry.info["seconds"], *_made_by(entry))
    assert (step.host, step.toolchain, step.toolchain_dir, step.threads) == (
        "gpu-1", "abc1234+cuda", "/tools/cuda/bin", 7)
    m = Manifest(recipe={}, model={}, calibration={}, toolchain=None, steps=(step,), variants=())
    assert Manifest.from_dict(m.to_dict()) == m
    old = m.to_dict() | {"steps": [{"step": "convert", "key": "k", "reused": False, "seconds": 1.0}]}
    assert Manifest.from_dict(old).steps[0].host is None  # manifests written before #24 still read


def estimate(name: str, *, disk: int | None, ram: int | None) -> PlannedNode:
    return PlannedNode(name, "t-big", name, "to do", "not in the store", (), None, disk, ram, "minutes", False, False)


@pytest.fixture
def big_kind(monkeypatch, tmp_path):
    """A kind whose estimate the test sets, on a machine with 2 GiB free disk and 3 GiB available RAM."""
    ran: list[str] = []
    stored: dict[str, object] = {}
    kind = StepKind(lambda ctx, node, deps: ran.append(node.name) or node.name, "a big result",
                    inputs=lambda ctx, node, deps: {"n": node.name}, store_step="big")
    monkeypatch.setitem(graph.KINDS, "t-big", kind)
    monkeypatch.setattr(StepKind, "stored", lambda self, ctx, node, deps: stored.get(node.name))
    import quantkit.plan

    monkeypatch.setattr(quantkit.plan, "machine", lambda root: Machine(free_disk=2 * GiB, available_ram=3 * GiB))
    ctx = SimpleNamespace(store=Store(tmp_path / "store"), recipe=SimpleNamespace(name="r"))
    return ctx, ran, stored


def test_a_node_is_refused_by_its_own_machine_with_the_numbers(big_kind):
    ctx, ran, stored = big_kind
    node = Node("quantize:Q4_K_M", "t-big", "Q4_K_M")
    with pytest.raises(NodeDoesNotFit) as refused:
        run_node(ctx, node, {}, estimate(node.name, disk=1 * GiB, ram=5 * GiB))
    assert str(refused.value) == (f"{socket.gethostname()} cannot run quantize:Q4_K_M: it needs about 5.00 GiB "
                                  "of RAM, 3.00 GiB is available")
    assert isinstance(refused.value, ResourceError) and ran == []
    again = pickle.loads(pickle.dumps(refused.value))  # Prefect and Ray carry it back to the head
    assert str(again) == str(refused.value) and again.need_ram == 5 * GiB
    with pytest.raises(NodeDoesNotFit, match=r"about 4\.00 GiB of disk, 2\.00 GiB is free; and about 6\.00 GiB"):
        run_node(ctx, node, {}, estimate(node.name, disk=4 * GiB, ram=6 * GiB))
    assert run_node(ctx, node, {}, estimate(node.name, disk=1 * GiB, ram=2 * GiB)) == node.name
    entry = stored[node.name] = SimpleNamespace(step="big", key="0" * 32)  # done already: it needs no room
    assert run_node(ctx, node, {}, estimate(node.name, disk=4 * GiB, ram=6 * GiB)) is entry
    assert ran == [node.name]  # reused, not run again


def test_a_source_the_plan_found_on_disk_needs_no_room(big_kind, monkeypatch):
    ctx, ran, _ = big_kind
    monkeypatch.setitem(graph.KINDS, "t-src", StepKind(lambda ctx, node, deps: "model", "the model folder"))
    node = Node("source", "t-src", "m")
    row = estimate("source", disk=40 * GiB, ram=None)
    with pytest.raises(NodeDoesNotFit, match="40.00 GiB of disk"):
        run_node(ctx, node, {}, row)  # a download still to do
    assert run_node(ctx, node, {}, dataclasses.replace(row, status="done")) == "model"


def test_the_local_executor_preflights_each_node_where_it_runs(big_kind):
    import concurrent.futures

    ctx, ran, _ = big_kind
    nodes = [Node("small", "t-big", "s"), Node("huge", "t-big", "h", ("small",))]
    rows = {"small": estimate("small", disk=GiB, ram=GiB), "huge": estimate("huge", disk=GiB, ram=64 * GiB)}
    with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(NodeDoesNotFit, match="cannot run huge"):
        execute(ctx, nodes, local_submit(ctx, pool, rows), poll=0.005)
    assert ran == ["small"]

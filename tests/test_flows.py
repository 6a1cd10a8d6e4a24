"""The Prefect flow on the tiny trained Llama, against a temporary Prefect server.

Every step is a task; the store is the one cache (Prefect caches and persists nothing): an unchanged
re-run builds nothing, changing one type recomputes only that type; a node that does not fit the
machine that runs it is refused there with the numbers; tool output reaches the run's logs; the
variants and the report, with its Serving table, become artifacts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

prefect = pytest.importorskip("prefect", reason="the Prefect flow needs the 'prefect' extra")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler  # noqa: E402
from prefect.settings import (  # noqa: E402
    PREFECT_LOCAL_STORAGE_PATH,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from test_pipeline import PLANTED_TOKEN, make_project, tiny_recipe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.quantize import quantize  # noqa: E402

pytestmark = pytest.mark.slow

RECIPE = tiny_recipe("tiny-flow", """\
gguf:
  imatrix: {enabled: true, ctx: 128, chunks: 8}
  types: [Q8_0, Q4_K_M, %s]
serve: {max_tokens: 24}
""")  # serve: the report artifact carries the Serving table (a llama-server start per GGUF, about 1 s each)
PREFECT_RESULTS: list[Path] = []  # where the server fixture keeps Prefect's result records
STORE_STEPS = {"convert", "imatrix", "quantize-Q8_0", "quantize-Q4_K_M", "serve-gguf-F16", "serve-gguf-Q8_0",
               "serve-gguf-Q4_K_M"}
KEPT = ["convert", "imatrix", "quantize:Q8_0", "quantize:Q4_K_M"]  # the nodes a changed third type leaves alone
SERVED = ["serve-gguf:F16", "serve-gguf:Q8_0", "serve-gguf:Q4_K_M"]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A temporary Prefect API (SQLite in a temp folder) with the `gpu` limit the flow holds."""
    results = tmp_path_factory.mktemp("prefect-results")
    PREFECT_RESULTS.append(results)
    settings = {PREFECT_LOCAL_STORAGE_PATH: results, PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(settings), prefect_test_harness(server_startup_timeout=120):
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=1))
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root, tiny_llama):
    root = tmp_path_factory.mktemp("flow-proj")
    recipe = make_project(root, repo_root, tiny_llama).with_name("tiny-flow.yaml")
    store = tmp_path_factory.mktemp("flow-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTKIT_STORE", str(store))
        mp.setenv("QUANTKIT_THREADS", "2")
        mp.setenv("HF_TOKEN", PLANTED_TOKEN)  # the worker's token: nothing Prefect records may hold it
        yield recipe


def run_flow(recipe: Path, third_type: str) -> tuple[dict, dict[str, str], str]:
    """Run the flow; return its result (plus its flow run id), {task run name: state name}, its log text."""
    recipe.write_text(RECIPE % third_type)
    state = quantize(str(recipe), return_state=True)
    assert state.is_completed(), state
    APILogHandler().flush()  # logs are sent in batches: send what is queued
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs, page = [], None
        while page is None or len(page) == 200:  # the API's page size
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                    offset=len(logs))
            logs += page
    result = state.result() | {"flow_run_id": flow_run_id}
    return result, {r.name: r.state.name for r in runs}, "\n".join(entry.message for entry in logs)


def manifest_shas(result: dict) -> dict[str, str]:
    manifest = json.loads(Path(result["manifest"]).read_text())
    return {v["label"]: v["files"]["model.gguf"]["sha256"] for v in manifest["variants"]}


@pytest.fixture(scope="module")
def first(prefect_server, project):
    return run_flow(project, "Q2_K")


def test_every_step_is_a_task_and_builds(first, project):
    result, states, logs = first
    assert set(states) == {"source", *STORE_STEPS, "quantize-Q2_K", "serve-gguf-Q2_K", "run-folder",
                           "publish"}  # the graph's nodes
    assert all(s == "Completed" for s in states.values()), states
    assert result["built"] == [*KEPT, "quantize:Q2_K", *SERVED, "serve-gguf:Q2_K"]
    assert result["reused"] == []
    assert set(manifest_shas(result)) == {"F16", "Q8_0", "Q4_K_M", "Q2_K"}
    # The tools' own lines reach the run's logs, not only quantkit's summaries.
    assert "[llama-quantize]" in logs and "[llama-imatrix]" in logs
    assert "quantize Q4_K_M: built" in logs


def test_variants_become_artifacts(first):
    result, _, _ = first
    manifest = json.loads(Path(result["manifest"]).read_text())
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[result["flow_run_id"]])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"tiny-flow-variants", "tiny-flow-summary", "tiny-flow-manifest", "tiny-flow-report"}
    report = by_key["tiny-flow-report"].data
    assert report.startswith("**published ") and "plot.png" in report
    assert (Path(result["manifest"]).parent / "report" / "report.md").read_text() in report
    assert "\n## Serving\n" in report and "| gguf:Q4_K_M | llama-server |" in report
    assert by_key["tiny-flow-variants"].type == "table"
    assert "# tiny-flow" in by_key["tiny-flow-summary"].data
    assert Path(result["manifest"]).resolve().as_uri() in by_key["tiny-flow-manifest"].data  # a link (markdown)
    table = next(a for a in arts if a.type == "table")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["variant"] for r in rows] == [v["label"] for v in manifest["variants"]]
    assert rows[1]["sha256"] == manifest["variants"][1]["files"]["model.gguf"]["sha256"][:12]


def test_unchanged_rerun_is_all_store_hits(first, project):
    before, _, _ = first
    result, states, logs = run_flow(project, "Q2_K")
    third = {"quantize-Q2_K", "serve-gguf-Q2_K"}
    assert {n: s for n, s in states.items() if n in STORE_STEPS | third} == dict.fromkeys(
        STORE_STEPS | third, "Completed")  # no Prefect cache: the store says it is done
    assert result["built"] == []
    assert result["reused"] == [*KEPT, "quantize:Q2_K", *SERVED, "serve-gguf:Q2_K"]
    assert manifest_shas(result) == manifest_shas(before)
    assert "quantize:Q4_K_M: reused from the store (quantize/" in logs  # the worker asked the store
    persisted = [p for p in PREFECT_RESULTS[0].rglob("*") if p.is_file()]
    assert persisted == [], "Prefect persisted results beside the store"


def test_changed_type_recomputes_only_that_type(first, project):
    before, _, _ = first
    result, states, _ = run_flow(project, "Q3_K_S")
    assert states["quantize-Q3_K_S"] == "Completed"
    assert result["built"] == ["quantize:Q3_K_S", "serve-gguf:Q3_K_S"]
    assert result["reused"] == [*KEPT, *SERVED]
    shas = manifest_shas(result)
    unchanged = ("F16", "Q8_0", "Q4_K_M")
    assert {k: shas[k] for k in unchanged} == {k: manifest_shas(before)[k] for k in unchanged}


def test_planted_token_not_in_prefect_records(first, project):
    result, _, logs = first
    flow_run_id = result["flow_run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    records = {
        "flow run (parameters, state)": flow_run.model_dump_json(),
        "task runs (inputs, states)": "".join(t.model_dump_json() for t in tasks),
        "artifacts": "".join(a.model_dump_json() for a in arts),
        "logs": logs,
    }
    assert len(logs) > 1000 and len(arts) == 4  # what is searched is really there
    leaked = [name for name, text in records.items() if PLANTED_TOKEN in text]
    leaked += [str(p) for p in PREFECT_RESULTS[0].rglob("*") if p.is_file() and PLANTED_TOKEN.encode() in p.read_bytes()]
    leaked += [str(p) for p in project.parent.parent.rglob("*")
               if p.is_file() and p.stat().st_size < 1 << 24 and PLANTED_TOKEN.encode() in p.read_bytes()]
    assert leaked == []


def test_a_node_that_does_not_fit_its_machine_is_refused_there(first, project, monkeypatch):
    """The flow's process only plans; the task that picks quantize:Q5_K_S checks its own machine (here one
    with no free disk and 1 KiB of RAM) and fails with the numbers. Stored nodes need no room and are reused."""
    import quantkit.plan
    from quantkit.errors import NodeDoesNotFit

    monkeypatch.setattr(quantkit.plan, "machine", lambda root: quantkit.plan.Machine(0, 1024))
    project.write_text(RECIPE % "Q5_K_S")
    state = quantize(str(project), return_state=True)
    assert state.is_failed(), state
    refused = state.result(raise_on_failure=False)
    assert isinstance(refused, NodeDoesNotFit), refused
    assert refused.node == "quantize:Q5_K_S" and (refused.free_disk, refused.available_ram) == (0, 1024)
    assert refused.need_disk > 0 and refused.need_ram > 1024
    assert "cannot run quantize:Q5_K_S: it needs about" in str(refused)
    assert "GiB of disk, 0.00 GiB is free; and about" in str(refused)


def test_the_nightly_schedule_runs_the_flow_with_track(prefect_server, tmp_path_factory, repo_root, tiny_llama):
    """prefect.yaml gives a tracking recipe's schedule ``track: true``: the flow resolves the new commit on
    the (local) Hub, runs every task with the new pins, publishes, and its report artifact names the pin bump."""
    import shutil

    from localhub import LocalHub
    from test_nightly import C1, RECIPE as NIGHTLY, on_local_hub, push_template_fix

    root = tmp_path_factory.mktemp("nightly-flow")
    (root / "recipes").mkdir()
    recipe = root / "recipes" / "tiny.yaml"
    recipe.write_text(NIGHTLY)
    shutil.copytree(repo_root / "calibration", root / "calibration")
    with LocalHub("org/tiny-llama", tiny_llama, C1) as hub, pytest.MonkeyPatch.context() as mp:
        on_local_hub(mp, hub, root)
        assert quantize(str(recipe), track=True, return_state=True).is_completed()  # nothing moved: a plain run
        c2, _ = push_template_fix(hub)
        state = quantize(str(recipe), track=True, return_state=True)
        assert state.is_completed(), state
        result = state.result()
        assert "convert" in result["built"] and json.loads(Path(result["manifest"]).read_text())["model"]["commit"] == c2
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        report = next(a for a in arts if a.key == "tiny-nightly-report").data
        assert report.startswith("**published ")
        assert f"pin bump (a tracking run's new pins, for the recipe): `{root / 'runs' / 'tiny-nightly' / 'pin-bump.patch'}`" \
            in report
        assert f"What changed: model commit `{C1}` → `{c2}`" in report

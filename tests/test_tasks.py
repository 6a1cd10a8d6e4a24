"""lm-eval tasks on both backends: lm-eval's hf model in torch and llama-perplexity --multiple-choice on a GGUF."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from quantkit.errors import ChanceLevelError
from quantkit.publish.stats import paired_difference
from quantkit.recipe import Evaluation, TaskSpec
from quantkit.scoring.taskitems import p_above_chance
from quantkit.scoring.tasks import check_tasks, items_sha256, load_items, resolve_task, task_manager
from quantkit.store import Store

# The tiny test model learnt Python syntax, not English: test the backends on code it can finish.
SHIPPED = TaskSpec(name="code-lines", path="tests/data/tasks/code-lines", limit=60)
BROKEN = TaskSpec(name="code-lines-shuffled", path="tests/data/tasks/code-lines-shuffled", limit=60)


def test_p_value_is_the_exact_binomial_tail():
    # 4 choices, 10 items: P(X >= 6) for Binomial(10, 1/4) = 0.019727...
    assert p_above_chance([1] * 6 + [0] * 4, [4] * 10) == pytest.approx(0.0197277, rel=1e-5)
    assert p_above_chance([0] * 10, [4] * 10) == pytest.approx(1.0)
    # Poisson-binomial: one 2-choice item right, nothing else, -> P(X >= 1) = 1 - 0.5 * 0.75
    assert p_above_chance([1, 0], [2, 4]) == pytest.approx(0.625)


def test_recipe_accepts_task_names_and_dicts():
    e = Evaluation(file="x.txt", tasks=["which-word-fits", {"name": "arc_easy", "num_fewshot": 5, "limit": 100}])
    assert [(t.name, t.num_fewshot, t.limit) for t in e.tasks] == [("which-word-fits", 0, 200), ("arc_easy", 5, 100)]
    with pytest.raises(ValueError, match="twice"):
        Evaluation(file="x.txt", tasks=["arc_easy", "arc_easy"])


def test_items_are_lm_evals_prompts(repo_root):
    pytest.importorskip("lm_eval")
    shipped = TaskSpec(name="which-word-fits", limit=60)
    broken = TaskSpec(name="which-word-fits-shuffled", path="tests/data/tasks/which-word-fits-shuffled", limit=60)
    tasks = [resolve_task(shipped, root=repo_root), resolve_task(broken, root=repo_root)]
    assert tasks[0].local_dir == repo_root / "calibration/tasks/which-word-fits"
    with task_manager(tasks) as manager:
        good, broken = (load_items(t, manager) for t in tasks)
    assert len(good) == 60 and good[0].context == "The cat sat on the" and good[0].choices[good[0].gold] == " mat."
    # the broken copy: same prompts, every gold label moved to a wrong choice
    assert [(i.context, i.choices) for i in good] == [(i.context, i.choices) for i in broken]
    assert all(g.gold != b.gold for g, b in zip(good, broken))
    assert items_sha256(good) != items_sha256(broken)


def test_finish_the_sentence_is_what_its_script_writes_from_held_out_text(repo_root, tmp_path):
    """The demo's discriminating task: reproducible from the held-out text, and none of it in calibration."""
    import json
    import runpy

    script = runpy.run_path(str(repo_root / "scripts" / "make_finish_the_sentence.py"))
    script["main"](tmp_path / "items.jsonl")
    shipped = repo_root / "calibration" / "tasks" / "finish-the-sentence" / "items.jsonl"
    assert (tmp_path / "items.jsonl").read_bytes() == shipped.read_bytes()
    items = [json.loads(line) for line in shipped.read_text(encoding="utf-8").splitlines()]
    heldout = (repo_root / "calibration" / "eval" / "en-prose-heldout.txt").read_text(encoding="utf-8")
    calibration = " ".join((repo_root / "calibration" / f).read_text(encoding="utf-8")
                           for f in ("en-prose.txt", "code-python.txt", "ja-prose.txt"))
    for item in items:
        real = item["question"].split(". ")[-1] + " " + item["choices"][item["answer"]]
        assert real.split(". ")[-1] in heldout  # the sentence and its real ending are held-out text
        assert real.split(". ")[-1] not in calibration
        assert len(set(item["choices"])) == 4
    assert len(items) > 300 and {i["answer"] for i in items} == {0, 1, 2, 3}


def test_chance_error_is_picklable_and_says_why():
    e = ChanceLevelError("t", "Q8_0", "llama-perplexity", "acc_token_norm", 0.25, 60, 0.25, 0.6, 0.01)
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) == ("task t scores at chance on Q8_0 (llama-perplexity): acc_token_norm 0.250 over "
                                   "60 items, chance 0.250, one-sided exact binomial p = 0.6 >= 0.01")


@pytest.mark.slow
def test_both_backends_beat_chance_and_agree(tmp_path, repo_root, tiny_llama):
    """The shipped task above chance on the HF checkpoint and its F16 GGUF; the shuffled one fails on both."""
    pytest.importorskip("lm_eval")
    from quantkit.convert import convert
    from quantkit.digest import DigestCache
    from quantkit.recipe import ModelSource
    from quantkit.scoring.tasks import score_tasks_gguf, score_tasks_hf
    from quantkit.source import fetch_model
    from quantkit.toolchain import ensure_toolchain

    toolchain = ensure_toolchain()
    store = Store(tmp_path / "store")
    model = fetch_model(source=ModelSource(path=tiny_llama.name), root=tiny_llama.parent,
                        digests=DigestCache(tmp_path / "digests.json"))
    gguf = convert(model=model, base_type="f16", model_name="tiny-llama", toolchain=toolchain, store=store)

    hf = score_tasks_hf(model_dir=tiny_llama, identity=model.digest, specs=[SHIPPED, BROKEN], root=repo_root,
                        store=store, label="HF")
    gg = score_tasks_gguf(gguf=gguf.file("model.gguf"), gguf_sha256=gguf.files["model.gguf"].sha256,
                          specs=[SHIPPED, BROKEN], root=repo_root, store=store, toolchain=toolchain, label="F16")
    good_hf, good_gg = hf["code-lines"], gg["code-lines"]
    assert good_hf["backend"] == "lm-eval-hf" and good_gg["backend"] == "llama-perplexity"
    assert good_hf["n"] == good_gg["n"] == 60
    check_tasks({"code-lines": good_hf}, label="HF", alpha=0.01)
    check_tasks({"code-lines": good_gg}, label="F16", alpha=0.01)
    # The one metric both compute, by one definition (mean log-likelihood per token after the tokens all choices
    # share): the same weights in F16 and float32 can only move near-ties, so the two agree item by item within
    # the paired error, and on most items exactly.
    assert good_hf["metric"] == good_gg["metric"] == "acc_token_norm"
    a, b = good_hf["per_item"]["acc_token_norm"], good_gg["per_item"]["acc_token_norm"]
    assert sum(x != y for x, y in zip(a, b)) <= 3
    diff, se = paired_difference(a, b)
    assert abs(diff) <= 3 * se or diff == 0
    assert good_hf["items_sha256"] == good_gg["items_sha256"]

    for scores, label, backend in ((hf, "HF", "lm-eval-hf"), (gg, "F16", "llama-perplexity")):
        with pytest.raises(ChanceLevelError) as err:
            check_tasks({"code-lines-shuffled": scores["code-lines-shuffled"]}, label=label, alpha=0.01)
        assert str(err.value).startswith(f"task code-lines-shuffled scores at chance on {label} ({backend}): ")
        assert "over 60 items, chance 0.250, one-sided exact binomial p = " in str(err.value)

    # stored: a second call reuses the results instead of scoring again
    again = score_tasks_gguf(gguf=gguf.file("model.gguf"), gguf_sha256=gguf.files["model.gguf"].sha256,
                             specs=[SHIPPED], root=repo_root, store=store, toolchain=toolchain, label="F16")
    assert again["code-lines"] == good_gg
    assert len(list((Path(store.root) / "tasks-gguf").glob("*/task.json"))) == 2
    # the items are stored once per task, and a task result's key holds their digest (what `plan` computes)
    from quantkit.scoring.tasks import gguf_task_inputs, make_items, resolve_task

    assert len(list((Path(store.root) / "task-items").glob("*/items.json"))) == 2
    task = resolve_task(SHIPPED, root=repo_root)
    items = make_items(task, store=store)
    assert items.reused and items.info["items_sha256"] == good_gg["items_sha256"]
    assert store.get("tasks-gguf", gguf_task_inputs(task, items, gguf_sha256=gguf.files["model.gguf"].sha256,
                                                   toolchain=toolchain)) is not None


# A model whose architecture only its own code defines: transformers loads it with trust_remote_code alone.
REMOTE_CODE = '''\
from transformers import LlamaConfig, LlamaForCausalLM


class RemoteConfig(LlamaConfig):
    model_type = "quantkit-remote"


class RemoteLlama(LlamaForCausalLM):
    config_class = RemoteConfig
'''


def test_tasks_in_torch_pass_the_recipes_trust_remote_code(tmp_path, repo_root, tiny_llama, monkeypatch):
    """model.trust_remote_code reaches transformers when a task is scored on a checkpoint, as in the other
    torch scorers, and only when the worker allows it too (QUANTKIT_ALLOW_REMOTE_CODE)."""
    import json
    import shutil

    pytest.importorskip("lm_eval")
    from quantkit.scoring.tasks import make_items, score_task_hf_stored, task_summary
    from quantkit.source import SourceError

    model = tmp_path / "remote-tiny"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="quantkit-remote", architectures=["RemoteLlama"],
                  auto_map={"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteLlama"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "remote.py").write_text(REMOTE_CODE)
    store = Store(tmp_path / "store")
    task = resolve_task(TaskSpec(name="code-lines", path="tests/data/tasks/code-lines", limit=4), root=repo_root)
    items = make_items(task, store=store)

    def score(trust: bool):
        return score_task_hf_stored(model_dir=model, identity="remote-tiny", task=task, items=items, store=store,
                                    trust_remote_code=trust)

    monkeypatch.delenv("QUANTKIT_ALLOW_REMOTE_CODE", raising=False)
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers: the recipe did not ask
        score(False)
    with pytest.raises(SourceError, match="QUANTKIT_ALLOW_REMOTE_CODE"):  # the recipe asks, the worker refuses
        score(True)
    monkeypatch.setenv("QUANTKIT_ALLOW_REMOTE_CODE", "1")
    scored = task_summary(score(True))
    assert scored["backend"] == "lm-eval-hf" and scored["n"] == 4

"""Step 5, task part: lm-eval multiple-choice tasks scored for every variant.

Both backends score the *same items*: the prompts are the strings lm-eval
builds (``task.build_all_requests``: the doc's text, few-shot examples
included, and each choice after the task's target delimiter), limited to the
first ``limit`` documents, as ``simple_evaluate(limit=...)`` does.

- Hugging Face checkpoints (base, GPTQ, AWQ): lm-eval's ``hf`` model in this
  process, over the model ``evaluate_torch.load_causal_lm`` loads.
  ``acc``: the choice with the highest summed log-likelihood of its
  continuation tokens; ``acc_norm``: the highest summed log-likelihood divided
  by the continuation's length in bytes (lm-eval's definitions).
- GGUF files: ``llama-perplexity --multiple-choice`` (``tasks_gguf``). lm-eval's
  gguf backend against llama-server scores at chance (the server ignores
  ``echo``), so it is not used. llama.cpp picks the choice with the highest
  *mean* log-likelihood per answer token (tokens after the prefix all choices
  share); that is neither ``acc`` nor ``acc_norm``, so it is recorded as
  ``acc_token_norm``. The HF backend computes ``acc_token_norm`` by the same
  definition (``token_norm_choice``): from lm-eval's per-choice log-likelihoods
  when the choices share no token past the context, else from the model's
  per-token log-probabilities over exactly llama.cpp's tokens. So every format
  has one metric in common, item by item, and that is the one a task is
  reported, compared and gated on (``REPORTED_METRIC``); ``acc`` and
  ``acc_norm`` stay in the result for the torch backends.

A task counts as above chance when an exact one-sided test rejects "every
item is answered by a uniform guess": the number correct is compared with a
Poisson-binomial distribution (item i right with probability 1/k_i, k_i its
choices; the binomial test when every item has k choices). ``check_above_chance``
raises ``ChanceLevelError`` when p >= alpha.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from quantkit.digest import write_json_atomic
from quantkit.errors import VerificationError
from quantkit.nofollow import SymlinkError, open_beneath, regular_files_below, sha256_of, symlink_on_path
from quantkit.recipe import TaskSpec
from quantkit.scoring.taskconfig import read_task_config, task_folder
from quantkit.scoring.tasks_llamacpp import BACKEND, BATCH_CTX, PARALLEL, score_task_gguf
from quantkit.scoring.taskitems import TaskItem, TaskResult, check_above_chance, p_above_chance
from quantkit.store import Entry, Store

log = logging.getLogger(__name__)
HF_TASK_BATCH = 8  # requests lm-eval's HFLM scores at once (quantkit.estimate prices their logits)

LOCAL_TASKS_DIR = "calibration/tasks"
TASK_YAML = "task.yaml"
RESULT_FILE = "task.json"
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed; the GGUF items are built with the same
BACKEND_HF = "lm-eval-hf"
# The metric every backend computes (llama-perplexity computes only this one): a task's column, its paired
# comparisons and the regression gate use it, so two formats are never compared on different definitions.
REPORTED_METRIC = "acc_token_norm"
# Bumped when the HF scorer's result changes meaning (2: acc_token_norm by llama.cpp's exact definition,
# per-item results for every metric), so an older stored result is not reused.
HF_SCORER_VERSION = 2


# ---------------------------------------------------------------- task loading

@dataclass(frozen=True)
class ResolvedTask:
    spec: TaskSpec
    local_dir: Path | None  # a folder with task.yaml and its jsonl, or None for a task lm-eval ships
    files_sha256: dict[str, str]  # local task files (name -> sha256); empty for lm-eval's own tasks

    @property
    def name(self) -> str:
        return self.spec.name


def resolve_task(spec: TaskSpec, *, root: Path) -> ResolvedTask:
    """A recipe task: local (``path``, or ``calibration/tasks/<name>/`` when present) or one lm-eval ships.

    A local task is data (``quantkit.scoring.taskconfig``): its ``task.yaml`` is checked here, before
    anything is scored, and RecipeError names the line that is not allowed. Nothing in it is read
    through a symlink (SymlinkError): not its folder, a folder above it in the project, nor a file in it."""
    rel = task_folder(spec.name, spec.path)
    if (link := symlink_on_path(root, rel)) is not None:
        raise SymlinkError(f"task {spec.name}: {Path(root) / link} is a symlink")
    folder = Path(root) / rel
    if spec.path and not (folder / TASK_YAML).is_file():
        raise VerificationError(f"task {spec.name}: {folder} has no {TASK_YAML}")
    if not (folder / TASK_YAML).is_file():
        return ResolvedTask(spec, None, {})
    files = {}
    for p in regular_files_below(folder):
        name = p.relative_to(folder).as_posix()
        with open_beneath(folder, name) as f:
            files[name] = sha256_of(f)
    task = ResolvedTask(spec, folder, files)
    _checked(spec, folder, tuple(sorted(files.items())))
    return task


@functools.lru_cache(maxsize=64)
def _checked(spec: TaskSpec, folder: Path, files: tuple) -> None:
    """``_task_config`` once per task and content (its files' sha256 are the key): each variant's task node
    resolves the task again, and parsing its YAML is most of that."""
    _task_config(ResolvedTask(spec, folder, dict(files)))


def _task_bytes(task: ResolvedTask, rel: str) -> bytes:
    """A file of a local task as it was digested by ``resolve_task`` (read again without following links)."""
    with open_beneath(task.local_dir, rel) as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != task.files_sha256.get(rel):
        raise VerificationError(f"task {task.name}: {task.local_dir / rel} changed since the task was resolved")
    return raw


def _task_config(task: ResolvedTask) -> dict:
    """The allow-listed lm-eval config of a local task (``taskconfig.check_task_config``)."""
    shown = task.local_dir / TASK_YAML
    shown = os.path.relpath(shown) if shown.is_relative_to(Path.cwd()) else str(shown)
    return read_task_config(_task_bytes(task, TASK_YAML), file=shown, name=task.name, folder=task.local_dir)


def _resolved_yaml(task: ResolvedTask, dest: Path) -> None:
    """Write lm-eval the checked config of a local task (never the file's own mapping), reading copies of
    its data files made here: what lm-eval loads is what ``resolve_task`` digested. The datasets cache of
    the copies stays in ``dest`` too (removed with it)."""
    import yaml

    config = _task_config(task)
    data = dest / f"{task.name}.data"
    data.mkdir()
    files = {}
    for split, rel in config["dataset_kwargs"]["data_files"].items():
        copy = data / f"{split}{Path(rel).suffix}"
        copy.write_bytes(_task_bytes(task, rel))
        files[split] = str(copy)
    config["dataset_kwargs"] = {"data_files": files, "cache_dir": str(dest / f"{task.name}.datasets-cache")}
    (dest / f"{task.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@contextlib.contextmanager
def task_manager(tasks: list[ResolvedTask], *, store: Store | None = None) -> Iterator[object]:
    """An lm-eval TaskManager that also knows the local tasks (through a temporary include path).

    The include folder is in ``store``'s scratch space when a store is given (a killed run's is
    removed by the next run), else a system temp folder; either is removed when the block ends."""
    from lm_eval.tasks import TaskManager

    local = [t for t in tasks if t.local_dir is not None]
    with contextlib.ExitStack() as stack:
        include = None
        if local:
            include = Path(stack.enter_context(store.scratch("tasks") if store is not None
                                               else tempfile.TemporaryDirectory(prefix="quantkit-tasks-")))
            for t in local:
                _resolved_yaml(t, include)
        # Indexing the thousands of tasks lm-eval ships takes 10-30 s per manager: only when a task needs them.
        yield TaskManager(include_path=str(include) if include else None, include_defaults=len(local) < len(tasks))


def load_items(task: ResolvedTask, manager) -> list[TaskItem]:
    """The items lm-eval's ``simple_evaluate`` would score: same documents, few-shot seed and prompt strings."""
    from lm_eval.tasks import get_task_dict

    obj = get_task_dict([task.name], manager)[task.name]
    if obj.get_config("output_type") != "multiple_choice":
        raise VerificationError(f"task {task.name} is {obj.get_config('output_type')!r}; "
                                "quantkit scores multiple_choice tasks only")
    obj.set_config(key="num_fewshot", value=task.spec.num_fewshot)
    obj.set_fewshot_seed(seed=FEWSHOT_SEED)
    obj.build_all_requests(limit=task.spec.limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in obj.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    items = []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        context = insts[0].arguments[0]
        choices = tuple(i.arguments[1] for i in insts)
        target = obj.doc_to_target(insts[0].doc)
        if isinstance(target, str):
            raw = obj.doc_to_choice(insts[0].doc)
            target = raw.index(target)
        items.append(TaskItem(context, choices, int(target)))
    return items


def items_sha256(items: list[TaskItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(asdict(it), ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- HF backend

def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text (llama.cpp then does too)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos]


def score_task_hf(*, model_dir: Path, task: ResolvedTask, items: list[TaskItem], manager,
                  batch_size: int = HF_TASK_BATCH, device: str = "cpu", trust_remote_code: bool = False) -> TaskResult:
    """lm-eval's ``hf`` backend in process on a checkpoint (plain, GPTQ or AWQ); ``trust_remote_code``: the
    recipe's, passed on when the worker allows it too (``load_causal_lm``)."""
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    from quantkit.scoring.hf import load_causal_lm

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(model_dir, device=device, trust_remote_code=trust_remote_code)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              add_bos_token=_adds_bos(tokenizer))
    out = lm_eval.simple_evaluate(model=lm, tasks=[task.name], num_fewshot=task.spec.num_fewshot,
                                  limit=task.spec.limit, task_manager=manager, log_samples=True,
                                  fewshot_random_seed=FEWSHOT_SEED, bootstrap_iters=0)
    samples = sorted(out["samples"][task.name], key=lambda s: s["doc_id"])
    if len(samples) != len(items):
        raise VerificationError(f"lm-eval scored {len(samples)} documents of {task.name}, quantkit built {len(items)}")
    acc, acc_norm, tok_norm, n_choices = [], [], [], []
    for s, item in zip(samples, items):
        if s["arguments"][0][0] != item.context:
            raise VerificationError(f"{task.name} doc {s['doc_id']}: lm-eval's prompt differs from the GGUF item's")
        lls = [float(r[0]) for r in s["filtered_resps"]]
        acc.append(int(s["acc"]))
        acc_norm.append(int(s["acc_norm"]))
        tok_norm.append(int(token_norm_choice(lm, item, lls) == item.gold))
        n_choices.append(len(lls))
    n = len(items)
    versions = {"lm_eval": lm_eval.__version__, "transformers": transformers.__version__}
    return TaskResult(task=task.name, backend=BACKEND_HF, acc=sum(acc) / n, acc_norm=sum(acc_norm) / n,
                      acc_token_norm=sum(tok_norm) / n, n=n, chance=sum(1 / k for k in n_choices) / n,
                      metric=REPORTED_METRIC, p_value=p_above_chance(tok_norm, n_choices), correct=tuple(tok_norm),
                      seconds=round(time.perf_counter() - start, 3), versions=versions,
                      per_item={"acc": tuple(acc), "acc_norm": tuple(acc_norm), REPORTED_METRIC: tuple(tok_norm)})


def token_norm_choice(lm, item: TaskItem, lls: list[float]) -> int:
    """The choice llama-perplexity's ``--multiple-choice`` picks, from the HF model: the highest mean
    log-likelihood over the tokens of ``context + choice`` after the prefix all choices' token sequences share.

    lm-eval's ``lls[i]`` is the summed log-likelihood of choice i's tokens after the context's tokens (the same
    token sequences: lm-eval encodes context + continuation whole, as llama.cpp does). When the shared prefix is
    exactly the context, the mean is ``lls[i]`` over that token count. When the choices share more (a common
    first word) or the context's tokens are not a prefix of every sequence, llama.cpp's mean covers other
    tokens: those are scored here from the model's own per-token log-probabilities."""
    pairs = [lm._encode_pair(item.context, c) for c in item.choices]
    seqs = [ctx + cont for ctx, cont in pairs]
    shared = 0
    while all(len(s) > shared + 1 for s in seqs) and len({s[shared] for s in seqs}) == 1:
        shared += 1
    if all(len(ctx) == shared and s[:shared] == ctx for s, (ctx, _) in zip(seqs, pairs)):
        means = [ll / (len(s) - shared) for ll, s in zip(lls, seqs)]
    else:
        means = [_mean_logprob_after(lm, s, shared) for s in seqs]
    return max(range(len(means)), key=lambda i: means[i])


def _mean_logprob_after(lm, tokens: list[int], start: int) -> float:
    """Mean log-probability of ``tokens[start:]``, each given the tokens before it (one forward pass)."""
    import torch

    with torch.no_grad():
        logits = lm._model_call(torch.tensor([tokens[:-1]], device=lm.device))[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs[torch.arange(start - 1, len(tokens) - 1), torch.tensor(tokens[start:])]
    return float(picked.mean())


# ---------------------------------------------------------------- stored steps

@functools.lru_cache(maxsize=None)
def _version(package: str) -> str:
    """An installed package's version without importing it (lm-eval and transformers take seconds to import,
    and a stored task result is checked on every run)."""
    from importlib.metadata import version

    return version(package)


ITEMS_FILE = "items.json"


def items_inputs(task: ResolvedTask) -> dict:
    """The key of a task's items (the ``task-items`` node): what lm-eval builds them from."""
    return {"task": task.name, "task_files": task.files_sha256, "num_fewshot": task.spec.num_fewshot,
            "limit": task.spec.limit, "fewshot_seed": FEWSHOT_SEED, "lm_eval": _version("lm_eval")}


def make_items(task: ResolvedTask, *, store: Store) -> Entry:
    """The task's items, built once by lm-eval's loader and stored (``items.json``, their digest in the entry):
    every variant's task node reads them from the store and is keyed by their digest."""
    def produce(staging) -> None:
        with task_manager([task], store=store) as manager:
            items = load_items(task, manager)
        write_json_atomic(staging.path / ITEMS_FILE, [asdict(it) for it in items])
        staging.info.update(items_sha256=items_sha256(items), n=len(items))

    return store.ensure("task-items", items_inputs(task), produce)


def stored_items(entry: Entry) -> list[TaskItem]:
    items = [TaskItem(d["context"], tuple(d["choices"]), d["gold"])
             for d in json.loads(entry.file(ITEMS_FILE).read_text(encoding="utf-8"))]
    if items_sha256(items) != entry.info["items_sha256"]:
        raise VerificationError(f"{entry.file(ITEMS_FILE)} does not hold the items its entry records")
    return items


def task_inputs(task: ResolvedTask, items_digest: str, *, variant: str, backend: str, backend_version: str) -> dict:
    return {"variant": variant, "task": task.name, "task_files": task.files_sha256, "items_sha256": items_digest,
            "num_fewshot": task.spec.num_fewshot, "limit": task.spec.limit, "lm_eval": _version("lm_eval"),
            "backend": backend, "backend_version": backend_version}


def hf_task_inputs(task: ResolvedTask, items: Entry, *, identity: str, device: str) -> dict:
    # the device as in score-hf's key: a GPU sums in another order (and loads in the saved dtype), which can
    # move a near-tie
    return {**task_inputs(task, items.info["items_sha256"], variant=identity, backend=BACKEND_HF,
                          backend_version=f"transformers {_version('transformers')}; scorer {HF_SCORER_VERSION}"),
            "device": device}


def gguf_task_inputs(task: ResolvedTask, items: Entry, *, gguf_sha256: str, toolchain) -> dict:
    # the batch layout is in the key: another one can move a near-tie
    return task_inputs(task, items.info["items_sha256"], variant=gguf_sha256, backend=BACKEND,
                       backend_version=f"llama.cpp {toolchain.build}; np {PARALLEL} ctx {BATCH_CTX}")


def _stored(store: Store, step: str, inputs: dict, produce_result) -> Entry:
    def produce(staging) -> None:
        result = produce_result()
        write_json_atomic(staging.path / RESULT_FILE, result.to_dict())
        staging.info.update(task=result.to_dict())

    return store.ensure(step, inputs, produce)


def score_task_hf_stored(*, model_dir: Path, identity: str, task: ResolvedTask, items: Entry, store: Store,
                         device: str = "cpu", trust_remote_code: bool = False) -> Entry:
    """One task on one checkpoint (lm-eval's ``hf`` model), stored under ``hf_task_inputs``."""
    def produce() -> TaskResult:
        with task_manager([task], store=store) as manager:
            return score_task_hf(model_dir=model_dir, task=task, items=stored_items(items), manager=manager,
                                 device=device, trust_remote_code=trust_remote_code)

    return _stored(store, "tasks-hf", hf_task_inputs(task, items, identity=identity, device=device), produce)


def score_task_gguf_stored(*, gguf: Path, gguf_sha256: str, task: ResolvedTask, items: Entry, store: Store, toolchain,
                           threads: int | None = None) -> Entry:
    """One task on one GGUF through llama-perplexity, stored under ``gguf_task_inputs``."""
    return _stored(store, "tasks-gguf", gguf_task_inputs(task, items, gguf_sha256=gguf_sha256, toolchain=toolchain),
                   lambda: score_task_gguf(gguf=gguf, task=task.name, items=stored_items(items), toolchain=toolchain,
                                           threads=threads, store=store))


def score_tasks_hf(*, model_dir: Path, identity: str, specs: list[TaskSpec], root: Path, store: Store,
                   label: str, trust_remote_code: bool = False) -> dict[str, dict]:
    """Every task of ``specs`` on one checkpoint, stored; ``{task: summary}`` as ``Variant.scores["tasks"]``."""
    out = {}
    for spec in specs:
        task = resolve_task(spec, root=root)
        entry = score_task_hf_stored(model_dir=model_dir, identity=identity, task=task,
                                     items=make_items(task, store=store), store=store,
                                     trust_remote_code=trust_remote_code)
        log_task(entry, label)
        out[task.name] = task_summary(entry)
    return out


def score_tasks_gguf(*, gguf: Path, gguf_sha256: str, specs: list[TaskSpec], root: Path, store: Store, toolchain,
                     label: str, threads: int | None = None) -> dict[str, dict]:
    """Every task of ``specs`` on one GGUF, stored; same return shape as ``score_tasks_hf``."""
    out = {}
    for spec in specs:
        task = resolve_task(spec, root=root)
        entry = score_task_gguf_stored(gguf=gguf, gguf_sha256=gguf_sha256, task=task,
                                       items=make_items(task, store=store), store=store, toolchain=toolchain,
                                       threads=threads)
        log_task(entry, label)
        out[task.name] = task_summary(entry)
    return out


def task_summary(entry: Entry) -> dict:
    """A stored task result as ``Variant.scores["tasks"][task]`` holds it; the items' digest lets the report
    pair two variants item by item only when they saw the same items."""
    return _summary(entry.info["task"]) | {"items_sha256": entry.inputs["items_sha256"]}


def log_task(entry: Entry, label: str) -> None:
    r = entry.info["task"]
    log.info("task %s on %s (%s): %s %.3f over %d items (chance %.3f, p=%.2g)%s", r["task"], label, r["backend"],
             r["metric"], r[r["metric"]], r["n"], r["chance"], r["p_value"], " reused" if entry.reused else "")


def _summary(r: dict) -> dict:
    # ``correct`` (per item, for ``metric``) lets the report compare two variants item by item (paired)
    return {k: r[k] for k in ("acc", "acc_norm", "acc_token_norm", "n", "chance", "p_value", "metric", "backend",
                              "correct")} | {"task": r["task"], "per_item": r.get("per_item") or {r["metric"]: r["correct"]}}


def check_tasks(scores: dict[str, dict], *, label: str, alpha: float) -> None:
    """``check_above_chance`` for every task of one variant (the base model and Q8_0 must pass)."""
    for result in scores.values():
        check_above_chance(result, label=label, alpha=alpha)


__all__ = ["TaskItem", "TaskResult", "ResolvedTask", "resolve_task", "task_manager", "load_items", "items_sha256",
           "p_above_chance", "check_above_chance", "check_tasks", "score_task_hf", "make_items", "stored_items",
           "score_task_hf_stored", "score_task_gguf_stored", "task_summary", "score_tasks_hf",
           "score_tasks_gguf"]

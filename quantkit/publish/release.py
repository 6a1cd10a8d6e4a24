"""Step 7: gate a scored run against the last published one, then publish it.

Targets: the local artifact store ``<dir>/<recipe>/<run-id>/`` with a ``latest`` symlink
(always), and the Hugging Face Hub when the recipe says ``publish.target: hub``: one repo per
format (``{owner}/{model}-GGUF``, ``{owner}/{model}-GPTQ-{bits}bit-g{group}``, ``{owner}/{model}-AWQ``
by default; ``quantkit.publish.hublayout`` decides which file goes where and why), each with its own card,
one commit per repo per run, tagged with the run id. A run folder is built under a temp name and
renamed into place, so it is complete or absent; a published run id is never replaced. The Hub upload
happens from the staged folder before that rename: if it fails, nothing is published locally, and
every repo is created and checked for the run's tag before the first commit.

A GGUF over ``publish.max_file_gib`` (default just under the Hub's 50 GB per-file limit) is published, locally
and on the Hub, as the pinned ``llama-gguf-split`` shards, made in the staged folder (``shard_staged``); the
published manifest and report list each shard with its sha256, and the run folder keeps its one file.

Rendering lives in ``quantkit.publish.report``; this module only decides and moves files.

Trying the Hub path against real repositories (the tests use the local Hub of tests/localhub.py)::

    export HF_TOKEN=hf_...            # a write token; read from the environment only, never logged
    python -c "from pathlib import Path; from quantkit.publish.release import publish_hub; print(publish_hub(
        folder=Path('artifacts/smollm2-135m-demo/latest').resolve(), repo_id='YOU/quantkit-test',
        private=True, run_id=Path('artifacts/smollm2-135m-demo/latest').resolve().name, recipe='smollm2-135m-demo'))"

That pushes one folder to one repo: it creates the private repo if missing, refuses a run id that is
already a tag there, pushes every file of the folder in one commit and tags it with the run id. A whole
release (``publish: {target: hub, owner: YOU}`` in the recipe) goes through ``publish_hub_repos``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from quantkit.formats import FORMATS, format_of
from quantkit import __version__
from quantkit.errors import PublishError, RegressionError
from quantkit.manifest import Manifest, Shard, differing_files
from quantkit.ggufinfo import chat_template as gguf_chat_template
from quantkit.paths import inside, not_a_link, open_fixed, project_parts, write_atomic
from quantkit.publish.hublayout import CARD, SPLIT_RE, HubRepo, gguf_commands, plan_repos
from quantkit.publish.markdown import refused, serving_md, variants_table
from quantkit.publish.report import build_report, load_report, write_report
from quantkit.publish.stats import paired_difference, paired_items, task_se
from quantkit.store import exclusive

log = logging.getLogger(__name__)
RENDERED = ".rendered"  # in report/: the digest of what the report was rendered from (hidden: never published)

LATEST = "latest"
HUB_MAX_FILE_BYTES = 50 * 1000**3  # the Hub refuses single files over 50 GB
SPLIT_MAX_BYTES = 45 * 1000**3  # a shard size for estimates (split_names); publishing asks shard_bytes_for
TOKEN_ENV = "HF_TOKEN"


UNCHANGED_LOG = "unchanged.jsonl"  # <store>/<recipe>/: one line per run that published nothing new


@dataclass(frozen=True)
class Published:
    run_id: str
    path: Path  # <store>/<recipe>/<run-id>
    hub_commit: str | None = None  # commit URL of the first Hub repo (the GGUF one) when pushed
    unchanged_since: str | None = None  # set when nothing new was published: the run this one equals
    hub_commits: dict[str, str] = field(default_factory=dict)  # repo id -> commit URL, every repo pushed
    refused: dict[str, str] = field(default_factory=dict)  # variant id -> why its serve check failed (not published)
    held: str | None = None  # a tracking run not published, and why (quantkit.publish.since.hold_reason)
    pin_patch: Path | None = None  # a published tracking run's pin bump (quantkit.tracking.PATCH)
    pin_pr: str | None = None  # the pull request that proposes it, when the worker names a repository

    @property
    def status(self) -> str:
        if self.held:
            return f"held: {self.held}"
        done = f"unchanged since {self.unchanged_since}" if self.unchanged_since else f"published {self.run_id}"
        return done + "".join(f"; not published {vid}: {why}" for vid, why in self.refused.items())


# --- regression gate ------------------------------------------------------------------------------

def regression_gate(current: dict, previous: dict | None, *, thresholds: Any, previous_run: str | None = None) -> dict:
    """Compare ``current`` report with the last published one and with the recovery floors, each check with its
    error: a check **fails** only when even its optimistic bound (``gate_sigmas`` standard errors above the
    estimate) is under the limit, **passes** when its pessimistic bound clears the limit, and is **inconclusive**
    when the two bounds straddle it. Inconclusive checks block only with ``thresholds.strict``.

    Task checks use the per-item results (paired) when both sides scored the same items with the same metric.
    Pure: returns ``{"previous_run", "failed", "findings", "inconclusive", "changes", "sigmas", "strict"}``;
    ``findings`` are the checks that block, ``changes`` every check (for the report).
    ``thresholds``: anything with the attributes of ``recipe.PublishThresholds``.
    """

    z = getattr(thresholds, "gate_sigmas", 3.0)
    strict = bool(getattr(thresholds, "strict", False))
    changes: list[dict] = []
    before = {v["id"]: v for v in (previous or {}).get("variants", [])}
    floors = {name: getattr(thresholds, f.recovery_floor) for name, f in FORMATS.items() if f.recovery_floor}
    metrics_now, metrics_before = current.get("task_metrics") or {}, (previous or {}).get("task_metrics") or {}

    def check(v: dict, name: str, now: float, limit: float, margin: float, se: float | None, scale: float,
              previous_value: float | None, message: str) -> None:
        """``margin``: how far the estimate is above its limit in the measured unit; ``scale`` turns it into the
        unit of ``now`` and ``limit`` (a recovery ratio divides by the base score)."""
        bound = None if se is None else tuple(sorted((round(now - z * se * scale, 6), round(now + z * se * scale, 6))))
        if se is None:  # no error known: the point estimate decides, and the report says so
            verdict = "passed" if margin >= 0 else "failed"
        else:
            verdict = "passed" if margin - z * se >= 0 else "failed" if margin + z * se < 0 else "inconclusive"
        changes.append({"id": v["id"], "check": name, "previous": previous_value, "now": now, "limit": round(limit, 6),
                        "bound": bound, "se": None if se is None else se * abs(scale), "verdict": verdict,
                        "message": message + (f"; {z:g}-SE bounds {bound[0]:.4f}–{bound[1]:.4f}" if bound else
                                              "; its error is unknown")})

    for v in current["variants"]:
        if v.get("is_base") or v.get("reference"):  # a reference (RTN) is compared with, never gated
            continue
        old = before.get(v["id"])
        if old and old.get("kld_mean") is not None and v.get("kld_mean") is not None:
            limit = old["kld_mean"] * (1 + thresholds.max_kld_increase)
            # Lower is better: the margin is the room left under the limit. Both means are over the same tokens,
            # so their errors are not independent; without per-token values the difference's error is bounded
            # by treating them as independent, except that the same value twice is the same file scored again
            # (the scorer is deterministic): then the difference has no error.
            same = v["kld_mean"] == old["kld_mean"]
            se = 0.0 if same else math.hypot(old.get("kld_mean_err") or 0.0, v.get("kld_mean_err") or 0.0) or None
            check(v, "kld_mean", v["kld_mean"], limit, limit - v["kld_mean"], se, -1.0, old["kld_mean"],
                  f"mean KLD {old['kld_mean']:.5f} → {v['kld_mean']:.5f} "
                  f"({100 * (v['kld_mean'] / old['kld_mean'] - 1):+.1f}%, limit {limit:.5f})")
        for task, now in v.get("tasks", {}).items():
            verdict = (current.get("task_checks") or {}).get(task, {})
            if not verdict.get("discriminates", True):
                # A task that separates no variants (base at the ceiling, all within their error) cannot show
                # a regression either: one item of 16 is not evidence (the report names the task).
                changes.append({"id": v["id"], "check": f"task:{task}", "previous": None, "now": now,
                                "skipped": verdict.get("why"), "verdict": "skipped"})
                continue
            prev = (old or {}).get("tasks", {}).get(task)
            if prev is not None and metrics_before.get(task) != metrics_now.get(task):
                changes.append({"id": v["id"], "check": f"task:{task}", "previous": prev, "now": now,
                                "verdict": "skipped", "skipped": "the last release scored this task with another "
                                "metric: the two numbers are not comparable"})
            elif prev is not None:
                drop = thresholds.max_task_drop
                pair = _paired(v, old, task)
                se = (_diff_se(*pair) if pair else
                      _hypot(task_se(now, v.get("tasks_n", {}).get(task)), task_se(prev, old.get("tasks_n", {}).get(task))))
                check(v, f"task:{task}", now, prev - drop, now - prev + drop, se, 1.0, prev,
                      f"{task} {prev:.4f} → {now:.4f} (limit {prev - drop:.4f})")
            floor = floors.get(v["format"])
            ratio = v.get("recovery", {}).get(task)
            base = _recovery_base(current, v, task)
            if floor is None or ratio is None or base is None:
                continue
            b = base["tasks"][task]
            pair = _paired(v, base, task)
            if pair:  # the per-item differences v_i - floor * b_i: their mean is >= 0 exactly when ratio >= floor
                se = _diff_se(pair[0], [floor * x for x in pair[1]])
            else:
                se = _hypot(task_se(now, v.get("tasks_n", {}).get(task)),
                            None if (e := task_se(b, base.get("tasks_n", {}).get(task))) is None else floor * e)
            check(v, f"recovery:{task}", ratio, floor, now - floor * b, se, 1 / b, None,
                  f"{task} recovery {ratio:.3f} of the base score ({base['id']}), floor {floor:g}")
    findings = [c for c in changes if c["verdict"] == "failed" or (strict and c["verdict"] == "inconclusive")]
    return {"previous_run": previous_run, "failed": bool(findings), "findings": findings,
            "inconclusive": [c for c in changes if c["verdict"] == "inconclusive"], "changes": changes,
            "sigmas": z, "strict": strict}


def _recovery_base(report: dict, v: dict, task: str) -> dict | None:
    """The row a variant's recovery is measured against (quantkit.publish.report: the HF base for torch formats
    when it has task scores, else the first row)."""
    rows = report["variants"]
    hf = next((r for r in rows if format_of(r).base and r.get("tasks")), None)
    ref = hf if format_of(v).torch and not format_of(v).base and hf else rows[0]
    return ref if task in ref.get("tasks", {}) else None


def _paired(a: dict, b: dict, task: str):

    return paired_items(a, b, task)


def _diff_se(a, b) -> float:

    return paired_difference(a, b)[1]


def _hypot(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else math.hypot(a, b)


def release_fingerprint(manifest: Manifest | dict) -> str:
    """sha256 of what a release holds: every variant's files (by sha256) and its quality scores. Speed
    (llama-bench tokens/s) is left out: it is timing noise, not an output. Two runs with the same
    fingerprint are the same release."""
    manifest = Manifest.coerce(manifest)
    variants = [{"format": v.format, "label": v.label, "file": v.file,
                 "files": {name: rec.sha256 for name, rec in v.files.items()},
                 "scores": {k: val for k, val in v.scores.to_dict().items() if k != "speed"}}
                for v in manifest.variants]
    if manifest.projectors:  # absent for text models: their fingerprints stay as they were
        variants.append({"projectors": {p.file: p.sha256 for p in manifest.projectors}})
    return hashlib.sha256(json.dumps(variants, sort_keys=True, default=str).encode()).hexdigest()


def _differing_unsplit(published_manifest: Path, run_dir: Path, manifest: Manifest) -> list[str]:
    """``manifest.differing_files`` of a published run, leaving out the GGUFs it published as shards (their
    shards' sha256 are in its manifest; the whole file is not there to compare)."""
    split = {v.file for v in Manifest.read(published_manifest).variants if v.shards}
    return [rel for rel in differing_files(Path(published_manifest).parent, run_dir, manifest) if rel not in split]


def _record_unchanged(folder: Path, *, manifest_path: Path, since: str) -> None:
    """Append this run to ``<store>/<recipe>/unchanged.jsonl`` (the published runs stay untouched)."""
    line = {"at": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "unchanged_since": since,
            "manifest_sha256": hashlib.sha256(Path(manifest_path).read_bytes()).hexdigest()}
    with _publish_lock(folder, "recording an unchanged run"), \
            os.fdopen(open_fixed(folder / UNCHANGED_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a",
                      encoding="utf-8") as fh:
        fh.write(json.dumps(line, sort_keys=True) + "\n")


def _publish_lock(folder: Path, what: str):
    """The recipe's publish lock, ``<store>/<recipe>/.publish.lock``. The folder is in the project, where a
    pull request can add files: a symlink planted at the lock's name is refused, not truncated through."""
    folder.mkdir(parents=True, exist_ok=True)
    os.close(open_fixed(folder / ".publish.lock", os.O_WRONLY | os.O_CREAT))
    return exclusive(folder / ".publish.lock", what)


def latest_report(store: Path, recipe: str) -> tuple[str, dict] | None:
    """(run id, report) of the last published run of ``recipe`` in the local store, or None."""
    latest = inside(store, recipe, LATEST)
    if not latest.is_symlink():
        return None
    run_id = os.readlink(latest)
    return Path(run_id).name, load_report(latest / "report.json")


def check_chat_templates(*, run_dir: Path, manifest: Manifest | dict, chat_template: str | None) -> None:
    """Every GGUF of the run carries the checkpoint's chat template (``tokenizer.chat_template``).

    Ollama and llama-server chat with the template inside the GGUF, and the Modelfiles leave every
    template quantkit does not convert to it: a GGUF without it would chat in the wrong format.
    Raises PublishError naming the files that lack it; a template that differs is logged."""
    if not chat_template:
        return
    missing = []
    for v in Manifest.coerce(manifest).variants:
        if not format_of(v).llama_cpp or not v.file:
            continue
        found = gguf_chat_template(Path(run_dir) / v.file)
        if found is None:
            missing.append(v.file)
        elif found != chat_template:
            log.warning("%s carries a chat template that differs from the checkpoint's", v.file)
    if missing:
        raise PublishError(f"{', '.join(missing)} lack tokenizer.chat_template although the checkpoint has one: "
                           "Ollama and llama-server would not chat in the model's format; not published "
                           "(check that the converter saw tokenizer_config.json or chat_template.jinja)")


# --- local artifact store ---------------------------------------------------------------------------

def run_id_for(manifest_path: Path, *, now: datetime | None = None) -> str:
    """``20250101T020000Z-<first 8 of the manifest's sha256>``: sorts by time, names the content."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{hashlib.sha256(Path(manifest_path).read_bytes()).hexdigest()[:8]}"


def collect_files(run_dir: Path, report_dir: Path, *, skip: frozenset[str] = frozenset()) -> dict[str, Path]:
    """``{path in the published folder: source}``: the run folder's files, then the rendered report
    (README.md, report.*, plot.png, Modelfiles) at the top level. Hidden files are skipped, and so is
    everything under a top-level name in ``skip`` (an artifact that failed its serve check). A symlink
    anywhere in either folder is refused: publishing hard-links or copies what it finds, and a link
    (committed in a pull request under runs/) would publish the file it points at."""
    run_dir, report_dir = Path(run_dir), Path(report_dir)
    files: dict[str, Path] = {}
    for folder in (run_dir, report_dir):
        if folder.is_symlink():
            raise PublishError(f"{folder} is a symlink; nothing is published through one")
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if p.is_symlink():
                raise PublishError(f"{p} is a symlink; nothing is published through one (remove it from the "
                                   "run folder: quantkit writes no links there)")
            if p.is_file() and not any(part.startswith(".") for part in rel.parts) and \
                    not (folder == run_dir and (p.is_relative_to(report_dir) or rel.parts[0] in skip)):
                files[rel.as_posix()] = p
    return files


def _place(src: Path, dest: Path) -> None:
    """A file into the staged folder: a hard link (GGUFs are big) or, across filesystems, a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dest, follow_symlinks=False)
    if dest.is_symlink():  # src became a link after collect_files looked: the link is not published either
        dest.unlink()
        raise PublishError(f"{src} is a symlink; nothing is published through one")


def publish_local(*, run_dir: Path, report_dir: Path, store: Path, recipe: str, run_id: str,
                  before_rename: Callable[[Path], None] | None = None, skip: frozenset[str] = frozenset()) -> Path:
    """Publish into ``<store>/<recipe>/<run_id>/`` and point ``latest`` at it; return the folder.

    Built as ``.tmp-<run_id>-*`` and renamed; ``before_rename(staged)`` (the Hub upload) runs on
    the complete staged folder first. Refuses an existing run id: published runs are never replaced.
    """
    folder = inside(store, recipe)
    final = inside(folder, run_id)
    with _publish_lock(folder, f"publishing {recipe}"):
        if final.exists():
            raise PublishError(f"{final} is already published; a published run is never overwritten "
                               "(a new run gets a new run id)")
        # We hold the recipe's lock: any temp folder here is from a publish that died.
        for stale in [*folder.glob(".tmp-*"), *folder.glob(f".{LATEST}.tmp-*")]:
            log.info("removing an unfinished publish: %s", stale)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
        tmp = folder / f".tmp-{run_id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for rel, src in collect_files(run_dir, report_dir, skip=skip).items():
                _place(src, inside(tmp, *rel.split("/")))
            if before_rename is not None:
                before_rename(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        link = folder / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
        os.symlink(run_id, link)
        os.replace(link, folder / LATEST)
    log.info("published %s/%s to %s", recipe, run_id, final)
    return final


# --- Hugging Face Hub ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubFile:
    path_in_repo: str
    local: Path
    size: int
    split: bool = False  # needs llama-gguf-split before upload


def plan_hub_files(folder: Path, *, max_file_bytes: int = HUB_MAX_FILE_BYTES) -> list[HubFile]:
    """Every file of a staged run folder with its path in the repo; GGUFs over the limit are
    marked for splitting, and any other file over it is refused."""
    out = []
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file():
            continue
        rel, size = p.relative_to(folder).as_posix(), p.stat().st_size
        inside(folder, *rel.split("/"))  # every part of a path in the repo is one safe name
        if size > max_file_bytes and not rel.endswith(".gguf"):
            raise PublishError(f"{rel} is {size / 1e9:.1f} GB, over the Hub's {max_file_bytes / 1e9:.0f} GB per-file "
                               "limit, and only GGUF files can be split")
        out.append(HubFile(rel, p, size, size > max_file_bytes))
    return out


def shard_bytes_for(max_file_bytes: int) -> int:
    """The shard size asked of llama-gguf-split for files of at most ``max_file_bytes``. It bounds the
    tensor data of a shard; the first shard also carries the metadata (the vocabulary: megabytes), so
    3% is left for it."""
    return max(1000**2, int(max_file_bytes * 0.97) // 1000**2 * 1000**2)


def split_names(path_in_repo: str, size: int, *, shard_bytes: int = SPLIT_MAX_BYTES) -> list[str]:
    """The shard names llama-gguf-split writes, ``<stem>-00001-of-00003.gguf``, for an estimate of the
    count (it splits between tensors, so the real count can be one more: ``split_gguf`` lists what it wrote)."""
    n = max(1, math.ceil(size / shard_bytes))
    stem = path_in_repo.removesuffix(".gguf")
    return [f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


def hub_operations(files: list[HubFile]):
    """The CommitOperationAdd list of one run's commit (pure; split files must already be shards)."""
    from huggingface_hub import CommitOperationAdd

    big = [f.path_in_repo for f in files if f.split]
    if big:
        raise PublishError(f"{', '.join(big)} must be split with llama-gguf-split before upload")
    return [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local)) for f in files]


def _size_arg(shard_bytes: int) -> str:
    """llama-gguf-split's --split-max-size: N followed by G or M (decimal units, as it reads them)."""
    return f"{shard_bytes // 1000**3}G" if shard_bytes % 1000**3 == 0 else f"{max(1, shard_bytes // 1000**2)}M"


def _missing_splitter(name: str, size: int, max_file_bytes: int) -> PublishError:
    return PublishError(f"{name} is {size / 2**30:.3g} GiB, over publish.max_file_gib ({max_file_bytes / 2**30:.3g} "
                        "GiB), and llama-gguf-split is not built: run `quantkit toolchain --build`")


def split_gguf(src: Path, *, dest: Path, gguf_split: Path, max_file_bytes: int) -> list[Path]:
    """Split ``src`` into ``dest/<stem>-0000i-of-0000n.gguf`` with llama-gguf-split; return the shards in
    order. The shards are what llama.cpp loads by the first one and ``--merge`` joins again. A shard over
    ``max_file_bytes`` (one tensor larger than the limit) is refused."""
    from quantkit.proc import run_tool

    src, stem = Path(src), Path(src).name.removesuffix(".gguf")

    def written() -> list[Path]:  # this file's shards only (``M-Q4_K_M-noimat-…`` are not ``M-Q4_K_M``'s)
        return sorted(p for p in Path(dest).glob(f"{stem}-*-of-*.gguf")
                      if (m := SPLIT_RE.match(p.name.removesuffix(".gguf"))) and m.group(1) == stem)

    if written():
        raise PublishError(f"{dest} already holds shards of {src.name}")
    run_tool([gguf_split, "--split", "--split-max-size", _size_arg(shard_bytes_for(max_file_bytes)),
              src, Path(dest) / stem])
    shards = written()
    counts = {SPLIT_RE.match(p.name.removesuffix(".gguf")).group(3) for p in shards}
    if not shards or len(counts) != 1 or int(counts.pop()) != len(shards):
        raise PublishError(f"llama-gguf-split wrote {[p.name for p in shards]} for {src.name}; "
                           "expected <stem>-00001-of-0000N.gguf … (its shard naming may have changed)")
    big = [p.name for p in shards if p.stat().st_size > max_file_bytes]
    if big:
        raise PublishError(f"{', '.join(big)} is still over publish.max_file_gib ({max_file_bytes / 2**30:.3g} GiB) "
                           "after splitting: one tensor is larger than that; raise it")
    return shards


def split_large_ggufs(files: list[HubFile], *, work: Path, gguf_split: Path | None,
                      max_file_bytes: int = HUB_MAX_FILE_BYTES) -> list[HubFile]:
    """Replace GGUFs over the limit by their shards (llama-gguf-split), or refuse when it is missing."""
    if not any(f.split for f in files):
        return files
    if gguf_split is None or not Path(gguf_split).is_file():
        big = next(f for f in files if f.split)
        raise _missing_splitter(big.path_in_repo, big.size, max_file_bytes)
    out = []
    for f in files:
        if not f.split:
            out.append(f)
            continue
        dest = (work / f.path_in_repo).parent
        dest.mkdir(parents=True, exist_ok=True)
        for shard in split_gguf(f.local, dest=dest, gguf_split=gguf_split, max_file_bytes=max_file_bytes):
            out.append(HubFile(shard.relative_to(work).as_posix(), shard, shard.stat().st_size))
    return out


def oversized_ggufs(staged: Path, manifest: Manifest | dict, *, max_file_bytes: int) -> list[str]:
    """The manifest's GGUF files in the staged folder larger than ``max_file_bytes``."""
    return [v.file for v in Manifest.coerce(manifest).variants if format_of(v).llama_cpp and v.file
            and (Path(staged) / v.file).is_file() and (Path(staged) / v.file).stat().st_size > max_file_bytes]


def shard_staged(staged: Path, manifest: Manifest | dict, *, gguf_split: Path | None,
                 max_file_bytes: int) -> Manifest:
    """Replace each GGUF of the staged run over ``max_file_bytes`` by its shards, in place; return the
    manifest with each split variant's ``shards`` (file, size, sha256 of every shard, in order), which is
    also written as the staged ``manifest.json`` (the run folder's stays as the run wrote it)."""
    from quantkit.digest import sha256_file, write_json_atomic

    staged, manifest = Path(staged), Manifest.coerce(manifest)
    big = oversized_ggufs(staged, manifest, max_file_bytes=max_file_bytes)
    variants = []
    for v in manifest.variants:
        name = v.file
        if name not in big:
            variants.append(v)
            continue
        size = (staged / name).stat().st_size
        if gguf_split is None or not Path(gguf_split).is_file():
            raise _missing_splitter(name, size, max_file_bytes)
        shards = split_gguf(staged / name, dest=staged, gguf_split=gguf_split, max_file_bytes=max_file_bytes)
        (staged / name).unlink()  # a hard link into the run folder: the run keeps its file
        variants.append(replace(v, shards=tuple(Shard(file=p.name, size=p.stat().st_size, sha256=sha256_file(p))
                                                for p in shards)))
        log.info("%s (%.3g GiB) is published as %d shards (publish.max_file_gib %.3g)", name, size / 2**30,
                 len(shards), max_file_bytes / 2**30)
    out = replace(manifest, variants=tuple(variants))
    if big:
        (staged / "manifest.json").unlink(missing_ok=True)  # a hard link to the run's: replaced, not written through
        write_json_atomic(staged / "manifest.json", out.to_dict())
    return out


def _hub_api(api=None):
    """An HfApi with the token from ``$HF_TOKEN`` (never logged, never written), or the one given."""
    if api is not None:
        return api
    from huggingface_hub import HfApi

    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise PublishError(f"publishing to the Hub needs a write token in ${TOKEN_ENV} (it is not set)")
    return HfApi(token=token)


def _hub_error(repo_id: str, e: Exception) -> PublishError:
    return PublishError(f"Hub upload to {repo_id} failed: {e.__class__.__name__}: {str(e).splitlines()[0]}")


def publish_hub(*, folder: Path, repo_id: str, private: bool, run_id: str, recipe: str,
                gguf_split: Path | None = None, api=None, max_file_bytes: int = HUB_MAX_FILE_BYTES) -> str:
    """Push a folder as one commit to one repo, tagged ``run_id``; return the commit URL. A GGUF over
    ``max_file_bytes`` goes up as its llama-gguf-split shards (a release's are split when staged).

    The token comes from ``$HF_TOKEN`` only and is never logged or written.
    """
    from huggingface_hub.errors import HfHubHTTPError

    if api is None and not os.environ.get(TOKEN_ENV):
        raise PublishError(f"publishing to the Hub needs a write token in ${TOKEN_ENV} (it is not set)")
    work = Path(folder).parent / f".split-{run_id}-{uuid.uuid4().hex[:8]}"
    try:
        files = split_large_ggufs(plan_hub_files(folder, max_file_bytes=max_file_bytes), work=work,
                                  gguf_split=gguf_split, max_file_bytes=max_file_bytes)
        ops = hub_operations(files)
        api = _hub_api(api)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if run_id in {t.name for t in api.list_repo_refs(repo_id).tags}:
            raise PublishError(f"{repo_id} already has a run tagged {run_id}; a published run is never overwritten")
        commit = api.create_commit(repo_id=repo_id, repo_type="model", operations=ops,
                                   commit_message=f"quantkit: {recipe} run {run_id}",
                                   commit_description=f"{len(ops)} files, run {run_id} of recipe {recipe}")
        api.create_tag(repo_id, tag=run_id, revision=commit.oid, tag_message=f"quantkit run {run_id}")
    except HfHubHTTPError as e:
        raise _hub_error(repo_id, e) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("pushed %s (%d files) to %s", run_id, len(ops), commit.commit_url)
    return commit.commit_url


def hub_paths(repo: HubRepo) -> list[str]:
    """The repo's file paths (a release's big GGUFs are already shards in ``repo.files``)."""
    return sorted([CARD, *repo.files])


def repo_cards(report: dict, repos: list[HubRepo], *, recipe_yaml: str,
               calibration_readme: str | None = None) -> dict[str, str]:
    """``{repo id: README.md text}``: each repo's own card (its rows of the report, the base row for
    reference, its settings, the commands that fetch its files, links to the other repos)."""
    from quantkit.publish.card import render_repo_card

    cards = {}
    for repo in repos:
        rows = [r for r in report["variants"] if r["id"] in repo.variant_ids or r["is_base"]]
        paths = hub_paths(repo)
        own = {**report, "variants": rows}
        cards[repo.repo_id] = str(render_repo_card(
            report, repo=repo, siblings=repos, table=variants_table(own) + serving_md(own),
            recipe_yaml=recipe_yaml, commands=gguf_commands(repo, paths) if FORMATS[repo.format].llama_cpp else None,
            files=paths, calibration_readme=calibration_readme))
    return cards


def publish_hub_repos(*, staged: Path, manifest: Manifest | dict, report: dict, settings: Any, run_id: str, recipe: str,
                      recipe_yaml: str, calibration_readme: str | None = None, gguf_split: Path | None = None,
                      api=None, max_file_bytes: int = HUB_MAX_FILE_BYTES) -> dict[str, str]:
    """Push a staged run as one repo per format (``quantkit.publish.hublayout.plan_repos``); return
    ``{repo id: commit URL}``. GGUFs over ``max_file_bytes`` are split first (``shard_staged``; ``release``
    has done it already, and its ``manifest`` and ``report`` list the shards). Every repo is created (or
    found) and checked for the run's tag before the first commit, so a missing permission or a reused run id
    stops the release before anything is pushed.
    ``settings``: ``recipe.Publish`` (owner, repo templates, private)."""
    from huggingface_hub.errors import HfHubHTTPError

    manifest = shard_staged(staged, manifest, gguf_split=gguf_split, max_file_bytes=max_file_bytes)
    repos = plan_repos(staged=staged, manifest=manifest, settings=settings)
    if not repos:
        raise PublishError(f"{recipe} has no GGUF, GPTQ or AWQ variant to push to the Hub")
    cards = repo_cards(report, repos, recipe_yaml=recipe_yaml, calibration_readme=calibration_readme)
    api = _hub_api(api)
    for repo in repos:
        try:
            api.create_repo(repo.repo_id, private=settings.private, exist_ok=True, repo_type="model")
            tags = {t.name for t in api.list_repo_refs(repo.repo_id).tags}
        except HfHubHTTPError as e:
            raise _hub_error(repo.repo_id, e) from e
        if run_id in tags:
            raise PublishError(f"{repo.repo_id} already has a run tagged {run_id}; "
                               "a published run is never overwritten")
    # Beside the staged run, under a name publish_local sweeps when a publish died.
    work = Path(staged).parent / f".tmp-hub-{run_id}-{uuid.uuid4().hex[:8]}"
    urls = {}
    try:
        for i, repo in enumerate(repos):
            folder = work / str(i)
            for name, src in repo.files.items():
                _place(src, inside(folder, *name.split("/")))
            (folder / CARD).write_text(cards[repo.repo_id], encoding="utf-8")
            urls[repo.repo_id] = publish_hub(folder=folder, repo_id=repo.repo_id, private=settings.private,
                                             run_id=run_id, recipe=recipe, gguf_split=gguf_split, api=api,
                                             max_file_bytes=max_file_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return urls


def _toolchain_splitter() -> Path | None:
    """The pinned toolchain's llama-gguf-split, or None when there is none (refused only if a file needs it)."""
    from quantkit.errors import ToolchainError
    from quantkit.toolchain import find_toolchain

    try:
        return find_toolchain().binary("llama-gguf-split")
    except ToolchainError:
        return None


def base_origin(manifest: Manifest | dict, *, root: Path) -> dict | None:
    """Provenance of a base checkpoint that is not original weights (the demo's dequantized Q4_1):
    ``quantkit.demo.ORIGIN_MARKER`` in the model folder the manifest names."""
    from quantkit.demo import read_origin

    path = Manifest.coerce(manifest).model.path
    return read_origin(Path(root) / path) if path else None


# --- the whole step ---------------------------------------------------------------------------------

def release(*, run_dir: Path, manifest: Manifest | dict, root: Path, settings: Any, recipe_yaml: str,
            config: dict | None = None, chat_template: str | None = None, eos_token: str | None = None,
            calibration_readme: str | None = None, run_id: str | None = None,
            gguf_split: Path | None = None, hub_api=None, verify: Callable[[], None] | None = None,
            tracking: dict | None = None) -> Published:
    """Report, gate, publish: render into ``run_dir/report/``; raise RegressionError (report
    written, nothing published) if the gate fails; else publish to the recipe's target.

    ``settings``: ``recipe.publish or recipe.Publish()``; ``hub_api``: an ``HfApi`` to push with
    (default: one with ``$HF_TOKEN``); ``verify``: called before anything is published (the run
    checks every file against the manifest's sha256); ``gguf_split``: llama-gguf-split (default: the
    pinned toolchain's), which splits every GGUF over ``settings.max_file_gib`` in the staged folder,
    whose manifest and report then list the shards (the run folder keeps its file). A previous release
    whose files no longer have the sizes of the run folder's (damaged since, and rebuilt) is not
    "unchanged": the run is published again.

    ``tracking``: the record of a tracking run with new pins (``quantkit.tracking.record_for``). Its report
    gets the "since last release" table (``quantkit.publish.since``); it is published only when every gate
    check passes with its error, else held (returned with ``held``, the reason in the report, nothing raised);
    once published, the pin bump is written to ``run_dir/pin-bump.patch``.
    """
    run_dir, manifest = Path(run_dir), Manifest.coerce(manifest)
    recipe = manifest.recipe.name
    store = inside(Path(root), *project_parts(settings.dir))  # a symlinked artifacts/ leading out is refused
    th = settings.thresholds
    prev = latest_report(store, recipe)
    origin = base_origin(manifest, root=Path(root))
    draft = build_report(manifest, config=config, chat_template=chat_template, recommend_max_kld=th.recommend_max_kld,
                         base_origin=origin)
    gate = regression_gate(draft, prev[1] if prev else None, thresholds=th, previous_run=prev[0] if prev else None)
    report = build_report(manifest, config=config, chat_template=chat_template,
                          recommend_max_kld=th.recommend_max_kld, regression=gate, base_origin=origin)
    held = _track_against(report, tracking, store=store, recipe=recipe, prev=prev, manifest=manifest, gate=gate,
                          run_dir=run_dir)
    bad = refused(report)
    publishable = _without(manifest, bad)
    check_chat_templates(run_dir=run_dir, manifest=publishable, chat_template=chat_template)
    unchanged_since = None
    if prev and not gate["failed"]:
        prev_manifest = Path(store) / recipe / prev[0] / "manifest.json"
        if prev_manifest.is_file() and \
                release_fingerprint(Manifest.read(prev_manifest)) == release_fingerprint(manifest) \
                and not _differing_unsplit(prev_manifest, run_dir, publishable):
            unchanged_since = report["unchanged_since"] = prev[0]
    # a symlinked report/ (from a pull request): rmtree would leave the link and write_report fill its target
    report_dir = not_a_link(run_dir / "report")
    rendered = hashlib.sha256(json.dumps([__version__, report, recipe_yaml, chat_template, eos_token,
                                          calibration_readme], sort_keys=True, default=str).encode()).hexdigest()
    marker = report_dir / RENDERED
    if not (marker.is_file() and marker.read_text(encoding="utf-8").strip() == rendered):
        # A warm re-run renders the same report: kept, since the card and the plot load huggingface_hub and
        # matplotlib (seconds). The marker is written last, so a render cut short is done again.
        shutil.rmtree(report_dir, ignore_errors=True)  # no Modelfile of a variant the recipe dropped
        write_report(report, report_dir, recipe_yaml=recipe_yaml, chat_template=chat_template, eos_token=eos_token,
                     calibration_readme=calibration_readme)
        write_atomic(marker, rendered.encode())
    else:
        log.info("report for %s: unchanged (%s)", recipe, report_dir)
    if held and not unchanged_since:
        log.warning("%s: held, not published: %s", recipe, held)
        return Published(prev[0] if prev else "", report_dir, held=held, refused=bad)
    if gate["failed"]:
        raise RegressionError(recipe, gate["findings"], str(report_dir / "report.md"))
    if unchanged_since:
        # Same files, same scores: a new release would be a copy. Nothing is published (nor pushed).
        _record_unchanged(store / recipe, manifest_path=run_dir / "manifest.json", since=unchanged_since)
        log.info("%s: unchanged since %s; nothing published", recipe, unchanged_since)
        return Published(unchanged_since, store / recipe / unchanged_since, unchanged_since=unchanged_since,
                         refused=bad)
    if bad:
        for vid, why in bad.items():
            log.warning("not publishing %s: its serve check failed: %s", vid, why)
        if not any(v.file and format_of(v).served for v in publishable.variants):
            reasons = "; ".join(f"{vid}: {why}" for vid, why in bad.items())
            raise PublishError(f"nothing published: every artifact failed its serve check ({reasons}); "
                               f"see {report_dir / 'report.md'}")
    if verify is not None:
        verify()
    run_id = run_id or run_id_for(run_dir / "manifest.json")
    max_file_bytes = getattr(settings, "max_file_bytes", HUB_MAX_FILE_BYTES)
    hub: dict[str, str] = {}

    def stage(staged: Path) -> None:
        """GGUFs over publish.max_file_gib become shards in the staged folder, and its manifest, report,
        card and Modelfiles are rendered again to list them; then the Hub upload, if any."""
        needed = oversized_ggufs(staged, publishable, max_file_bytes=max_file_bytes)
        sharded = shard_staged(staged, publishable, max_file_bytes=max_file_bytes,
                               gguf_split=gguf_split or (_toolchain_splitter() if needed else None))
        shown = report
        if needed:
            (staged / "plot.png").unlink(missing_ok=True)  # a hard link to the run's: rendered anew, not through it
            shown = build_report(sharded, config=config, chat_template=chat_template,
                                 recommend_max_kld=th.recommend_max_kld, regression=gate, base_origin=origin)
            write_report(shown, staged, recipe_yaml=recipe_yaml, chat_template=chat_template, eos_token=eos_token,
                         calibration_readme=calibration_readme)
        if settings.target == "hub":
            hub.update(publish_hub_repos(staged=staged, manifest=sharded, report=shown, settings=settings,
                                         run_id=run_id, recipe=recipe, recipe_yaml=recipe_yaml,
                                         calibration_readme=calibration_readme, api=hub_api,
                                         max_file_bytes=max_file_bytes))

    path = publish_local(run_dir=run_dir, report_dir=report_dir, store=store, recipe=recipe, run_id=run_id,
                         before_rename=stage,
                         skip=frozenset(v.file for v in manifest.variants if v.file and v.id in bad))
    patch = None
    if tracking and tracking.get("patch"):
        from quantkit.tracking import PATCH

        patch = inside(run_dir, PATCH)
        write_atomic(patch, tracking["patch"].encode("utf-8"))
        log.info("published with new pins; the recipe's pin bump: %s", patch)
    pr = _pin_pull_request(tracking, recipe_yaml, recipe=recipe, run_id=run_id, report=report) if patch else None
    return Published(run_id, path, next(iter(hub.values()), None), hub_commits=dict(hub), refused=bad,
                     pin_patch=patch, pin_pr=pr)


def _pin_pull_request(tracking: dict, recipe_yaml: str, *, recipe: str, run_id: str, report: dict) -> str | None:
    """The pin bump as a pull request when the worker names a repository (quantkit.publish.pullrequest).
    The release is out already: a forge that refuses is a warning, and the patch stays in the run folder."""
    from quantkit.publish.pullrequest import Forge, open_pin_pr
    from quantkit.publish.since import since_md

    try:
        forge = Forge.from_env()
        if forge is None:
            return None
        body = "\n".join([f"quantkit's nightly published release `{run_id}` of `{recipe}` with new pins; this "
                          "makes the recipe say what it was made from (a plain run reproduces it).",
                          *since_md(report)])
        return open_pin_pr(forge, path=tracking["recipe"], started_from_sha256=tracking["recipe_sha256"],
                           new_text=recipe_yaml, recipe=recipe, run_id=run_id, body=body)
    except PublishError as e:
        log.warning("no pull request for the pin bump: %s", e)
        return None


def _track_against(report: dict, tracking: dict | None, *, store: Path, recipe: str, prev, manifest: Manifest,
                   gate: dict, run_dir: Path) -> str | None:
    """For a tracking run: add the "since last release" table to ``report`` and return why it is held
    (None: it may publish). A run with no earlier release publishes as a first release does."""
    from quantkit.publish.since import hold_reason, since_last_release
    from quantkit.tracking import PATCH

    (Path(run_dir) / PATCH).unlink(missing_ok=True)  # a patch names the release it was written with, only
    if not tracking or not prev:
        return None
    prev_manifest = Path(store) / recipe / prev[0] / "manifest.json"
    if not prev_manifest.is_file():
        return None
    since = since_last_release(Manifest.read(prev_manifest), manifest, gate, previous_run=prev[0])
    report["since_release"] = since
    held = hold_reason(since, gate)
    if held:
        report["held"] = held
    return held


def _without(manifest: Manifest, bad: dict[str, str]) -> Manifest:
    """The manifest as publishing sees it: the artifacts that failed their serve check have no file."""
    return replace(manifest, variants=tuple(replace(v, file=None) if v.id in bad else v for v in manifest.variants))

"""A whole recipe run without Prefect: the steps in order, then the manifest.

``flows/quantize.py`` wires the same step functions into Prefect tasks; this
module is the embedded default behind ``quantkit run``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from quantkit import __version__
from quantkit.calibration import CalibrationText, load_calibration
from quantkit.convert import convert
from quantkit.digest import DigestCache, sha256_file, write_json_atomic
from quantkit.imatrix import imatrix
from quantkit.paths import inside
from quantkit.quantize import quantize
from quantkit.recipe import Recipe
from quantkit.source import ModelSnapshot, fetch_model
from quantkit.store import Entry, Store, exclusive
from quantkit.toolchain import Toolchain

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class Variant:
    """One produced artifact of the run, as the report and publishing see it."""

    format: str  # "gguf", "gptq", "awq"
    label: str
    entry: Entry
    file_name: str  # name in the run folder
    scores: dict = field(default_factory=dict)  # Score.to_dict() plus "speed", "tasks"

    def describe(self) -> dict:
        return {"format": self.format, "label": self.label, "file": self.file_name, "step": self.entry.step,
                "key": self.entry.key, "reused": self.entry.reused, "files": {
                    n: {"sha256": r.sha256, "size": r.size} for n, r in self.entry.files.items()},
                "info": self.entry.info, "scores": self.scores}


@dataclass
class RunContext:
    """What every step of one run shares."""

    recipe: Recipe
    recipe_file: Path
    root: Path
    store: Store
    toolchain: Toolchain
    threads: int
    steps: list[dict] = field(default_factory=list)

    def record(self, name: str, entry: Entry) -> None:
        self.steps.append({"step": name, "key": entry.key, "reused": entry.reused,
                           "seconds": entry.info.get("seconds")})


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    manifest: Path
    variants: tuple[Variant, ...]
    reused: tuple[str, ...]
    built: tuple[str, ...]
    published: Path | None = None


def run_dir(recipe: Recipe, root: Path) -> Path:
    return inside(root / recipe.output.dir, recipe.name)


def run_folder_lock(ctx: RunContext) -> contextlib.AbstractContextManager[None]:
    """Held while a run writes runs/<name>/ and publishes from it: two runs of one recipe share that
    folder (their steps are shared through the store's own locks), so the second waits here."""
    folder = run_dir(ctx.recipe, ctx.root)
    return exclusive(folder.with_name(f".{folder.name}.lock"), f"writing and publishing {folder}")


def prepare_source(ctx: RunContext) -> tuple[ModelSnapshot, CalibrationText]:
    digests = DigestCache(ctx.store.root / "digests.json")
    model = fetch_model(source=ctx.recipe.model, root=ctx.root, digests=digests)
    calib = load_calibration(ctx.recipe.calibration, root=ctx.root)
    return model, calib


def convert_args(ctx: RunContext, model: ModelSnapshot) -> dict:
    spec = ctx.recipe.gguf
    return dict(model=model, base_type=spec.base_type, model_name=ctx.recipe.model.display_name,
                toolchain=ctx.toolchain, store=ctx.store)


def imatrix_args(ctx: RunContext, base: Entry, calib: CalibrationText) -> dict | None:
    """The imatrix step's arguments; None when no type of the recipe uses one."""
    spec = ctx.recipe.gguf
    if not (spec.imatrix.enabled and any(spec.uses_imatrix(v) for v in spec.types)):
        return None
    return dict(base=base, calibration=calib, spec=spec.imatrix, toolchain=ctx.toolchain, store=ctx.store,
                threads=ctx.threads)


def quantize_args(ctx: RunContext, base: Entry, imat: Entry | None) -> list[dict]:
    """One llama-quantize call's arguments per type of the recipe, in its order."""
    spec = ctx.recipe.gguf
    return [dict(base=base, qtype=v.type, label=spec.label(v), imatrix=imat if spec.uses_imatrix(v) else None,
                 extra_args=spec.override_args(v), toolchain=ctx.toolchain, store=ctx.store, threads=ctx.threads)
            for v in spec.types]


def gguf_variant(ctx: RunContext, label: str, entry: Entry) -> Variant:
    return Variant("gguf", label, entry, f"{ctx.recipe.model.display_name}-{label}.gguf")


def gguf_variants(ctx: RunContext, model: ModelSnapshot, calib: CalibrationText) -> tuple[Entry, list[Variant]]:
    base = convert(**convert_args(ctx, model))
    ctx.record("convert", base)
    imat = None
    if (kw := imatrix_args(ctx, base, calib)) is not None:
        imat = imatrix(**kw)
        ctx.record("imatrix", imat)
    variants = [gguf_variant(ctx, ctx.recipe.gguf.base_type.upper(), base)]
    jobs = quantize_args(ctx, base, imat)
    for i, kw in enumerate(jobs, 1):
        log.info("[%d/%d] quantize %s", i, len(jobs), kw["label"])
        entry = quantize(**kw)
        ctx.record(f"quantize:{kw['label']}", entry)
        variants.append(gguf_variant(ctx, kw["label"], entry))
    return base, variants


def score_ggufs(ctx: RunContext, variants: list[Variant]) -> list[Variant]:
    """PPL and KLD of every GGUF against the first (the unquantized base), then speed.

    The base logits are made at most once, only if some score is missing, and
    deleted before this returns.
    """
    from quantkit.evaluate_gguf import base_logits_once, score_gguf_step, text_sha256

    spec = ctx.recipe.evaluation
    assert spec is not None
    text_file = ctx.root / spec.file
    text_digest = text_sha256(text_file)
    base = variants[0]
    base_sha = base.entry.files["model.gguf"].sha256
    scored = []
    with base_logits_once(base_gguf=base.entry.file("model.gguf"), text_file=text_file, spec=spec,
                          toolchain=ctx.toolchain, threads=ctx.threads) as logits:
        for v in variants:
            is_base = v is base
            entry = score_gguf_step(gguf=v.entry.file("model.gguf"), gguf_sha256=v.entry.files["model.gguf"].sha256,
                                    base_gguf_sha256=None if is_base else base_sha, text_file=text_file,
                                    text_sha256=text_digest, spec=spec, base=None if is_base else logits,
                                    toolchain=ctx.toolchain, store=ctx.store, label=v.label, threads=ctx.threads)
            ctx.record(f"score:{v.label}", entry)
            scores = dict(entry.info["score"])
            if is_base and spec.kld:
                scores.update(kld_mean=0.0, kld_p99=0.0, same_top_pct=100.0)
            if spec.tasks:
                scores["tasks"] = gguf_task_scores(ctx, v, must_beat_chance=is_base or v.label.upper() == "Q8_0")
            if spec.bench:
                bench = bench_step(ctx, v)
                ctx.record(f"bench:{v.label}", bench)
                scores["speed"] = bench.info["speed"]
            scored.append(replace(v, scores=scores))
    return scored


def gguf_task_scores(ctx: RunContext, v: Variant, *, must_beat_chance: bool) -> dict:
    """lm-eval tasks on one GGUF (llama-perplexity --multiple-choice); the base and Q8_0 must beat guessing."""
    from quantkit.tasks import check_tasks, score_tasks_gguf

    spec = ctx.recipe.evaluation
    tasks = score_tasks_gguf(gguf=v.entry.file("model.gguf"), gguf_sha256=v.entry.files["model.gguf"].sha256,
                             specs=spec.tasks, root=ctx.root, store=ctx.store, toolchain=ctx.toolchain,
                             label=v.label, threads=ctx.threads)
    if must_beat_chance:
        check_tasks(tasks, label=v.label, alpha=spec.chance_alpha)
    return tasks


def bench_step(ctx: RunContext, v: Variant) -> Entry:
    """llama-bench speed of one GGUF, stored like any other step (threads are part of the key here)."""
    from quantkit.evaluate_gguf import bench_gguf

    spec = ctx.recipe.evaluation
    inputs = {"gguf_sha256": v.entry.files["model.gguf"].sha256, "prompt": spec.bench_prompt_tokens,
              "gen": spec.bench_gen_tokens, "reps": spec.bench_reps, "threads": ctx.threads,
              "llama_cpp": ctx.toolchain.commit}

    def produce(staging) -> None:
        speed = bench_gguf(gguf=v.entry.file("model.gguf"), toolchain=ctx.toolchain, threads=ctx.threads,
                           prompt_tokens=spec.bench_prompt_tokens, gen_tokens=spec.bench_gen_tokens,
                           reps=spec.bench_reps)
        write_json_atomic(staging.path / "speed.json", speed.to_dict())
        staging.info.update(tool=ctx.toolchain.version, speed=speed.to_dict())

    entry = ctx.store.ensure("bench", inputs, produce)
    sp = entry.info["speed"]
    log.info("bench %s: %s (pp %.1f t/s, tg %.1f t/s, %d threads)", v.label, "reused" if entry.reused else "measured",
             sp["pp_tokens_per_s"], sp["tg_tokens_per_s"], sp["threads"])
    return entry


def checkpoint_variants(ctx: RunContext, model: ModelSnapshot, calib: CalibrationText) -> list[Variant]:
    """GPTQ and AWQ checkpoints (GPTQModel), one per recipe entry."""
    from quantkit.awq import awq
    from quantkit.gptq import gptq

    stem = ctx.recipe.model.display_name
    out = []
    for spec in ctx.recipe.gptq:
        label = spec.name
        entry = gptq(model=model, spec=spec, calibration=calib, store=ctx.store)
        ctx.record(f"gptq:{label}", entry)
        out.append(Variant("gptq", label, entry, f"{stem}-{label}"))
    for spec in ctx.recipe.awq:
        label = spec.name
        entry = awq(model=model, spec=spec, calibration=calib, store=ctx.store)
        ctx.record(f"awq:{label}", entry)
        out.append(Variant("awq", label, entry, f"{stem}-{label}"))
    return out


def score_checkpoints(ctx: RunContext, model: ModelSnapshot, variants: list[Variant]) -> list[Variant]:
    """PPL and KLD in torch, on llama-perplexity's windows, for the HF base and each checkpoint."""
    from quantkit.evaluate_gguf import text_sha256
    from quantkit.evaluate_torch import score_hf

    spec = ctx.recipe.evaluation
    text_file = ctx.root / spec.file
    text_digest = text_sha256(text_file)

    def score(label: str, model_dir: Path, identity: str, base: Path | None) -> dict:
        inputs = {"model": identity, "base": model.digest if base else None, "text_sha256": text_digest,
                  "ctx": spec.ctx, "max_tokens": spec.max_tokens}

        def produce(staging) -> None:
            result = score_hf(model_dir=model_dir, text_file=text_file, spec=spec, base_model_dir=base)
            write_json_atomic(staging.path / "score.json", result.to_dict())
            staging.info.update(score=result.to_dict())

        entry = ctx.store.ensure("score-hf", inputs, produce)
        ctx.record(f"score:{label}", entry)
        scores = dict(entry.info["score"])
        if spec.tasks:
            from quantkit.tasks import check_tasks, score_tasks_hf

            scores["tasks"] = score_tasks_hf(model_dir=model_dir, identity=identity, specs=spec.tasks, root=ctx.root,
                                             store=ctx.store, label=label)
            if base is None:  # the HF base model must beat guessing on every task
                check_tasks(scores["tasks"], label=label, alpha=spec.chance_alpha)
        return scores

    base_scores = score("HF", model.path, model.digest, None)
    base_scores.update(kld_mean=0.0, kld_p99=0.0, same_top_pct=100.0)
    hf_base = Variant("hf", "HF", model.as_entry(),
                      os.path.relpath(model.path, ctx.root) if model.path.is_relative_to(ctx.root) else str(model.path),
                      base_scores)
    scored = [replace(v, scores=score(v.label, v.entry.path, v.entry.key, model.path)) for v in variants]
    if spec.bench:
        for v in [hf_base, *scored]:
            v.scores["speed"] = _bench_hf(ctx, v)
    return [hf_base, *scored]


def _bench_hf(ctx: RunContext, v: Variant) -> dict:
    """Generation speed of a checkpoint in transformers, stored like a step (threads in the key)."""
    import torch

    from quantkit.evaluate_torch import bench_hf

    spec = ctx.recipe.evaluation
    inputs = {"model": v.entry.key, "gen": spec.bench_gen_tokens, "reps": spec.bench_reps,
              "threads": torch.get_num_threads()}

    def produce(staging) -> None:
        speed = bench_hf(model_dir=v.entry.path, gen_tokens=spec.bench_gen_tokens, reps=spec.bench_reps)
        write_json_atomic(staging.path / "speed.json", speed)
        staging.info.update(speed=speed)

    entry = ctx.store.ensure("bench-hf", inputs, produce)
    ctx.record(f"bench:{v.label}", entry)
    log.info("bench %s: %s (tg %.1f t/s in transformers)", v.label, "reused" if entry.reused else "measured",
             entry.info["speed"]["tg_tokens_per_s"])
    return entry.info["speed"]


def _link(src: Path, dest: Path) -> None:
    """Put a store file into the run folder: a hard link (no copy) when the filesystem allows."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def write_run_folder(ctx: RunContext, model: ModelSnapshot, calib: CalibrationText,
                     variants: list[Variant]) -> Path:
    out = run_dir(ctx.recipe, ctx.root)
    out.mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v.format == "gguf":
            _link(v.entry.file("model.gguf"), inside(out, v.file_name))
        elif v.format in ("gptq", "awq"):
            folder = inside(out, v.file_name)
            folder.mkdir(exist_ok=True)
            for name in v.entry.files:
                dest = inside(folder, *Path(name).parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link(v.entry.path / name, dest)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "quantkit": __version__,
        "recipe": {"name": ctx.recipe.name, "file": os.path.relpath(ctx.recipe_file, ctx.root),
                   "sha256": sha256_file(ctx.recipe_file),
                   "resolved": ctx.recipe.model_dump(mode="json")},
        "model": model.describe() | {"path": os.path.relpath(model.path, ctx.root)
                                     if model.path.is_relative_to(ctx.root) else str(model.path)},
        "calibration": calib.describe(),
        "toolchain": {"llama_cpp": ctx.toolchain.commit, "version": ctx.toolchain.version,
                      "origin": ctx.toolchain.origin, "cuda": ctx.toolchain.cuda},
        "steps": ctx.steps,
        "variants": [v.describe() for v in variants],
    }
    path = out / "manifest.json"
    write_json_atomic(path, manifest)
    # The resolved recipe travels with what it produced.
    (out / "recipe.yaml").write_bytes(ctx.recipe_file.read_bytes())
    return path


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _free_disk(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def preflight(ctx: RunContext) -> None:
    """Refuse before any work when the plan's disk or RAM estimate exceeds what the machine has."""
    from quantkit.errors import ResourceError
    from quantkit.plan import GiB, plan

    steps = [s for s in plan(ctx.recipe, root=ctx.root, store=ctx.store, toolchain=ctx.toolchain)
             if s.status != "done" and s.step != "source"]
    disk = sum(s.disk_bytes or 0 for s in steps)
    free = _free_disk(ctx.store.root)
    if disk > free:
        raise ResourceError(f"the run needs about {disk / GiB:.2f} GiB more disk in {ctx.store.root}, "
                            f"only {free / GiB:.2f} GiB is free")
    ram = max((s.ram_bytes or 0 for s in steps), default=0)
    available = _available_memory()
    if ram > available:
        worst = max(steps, key=lambda s: s.ram_bytes or 0)
        raise ResourceError(f"step {worst.step} {worst.label} needs about {ram / GiB:.2f} GiB of RAM, "
                            f"{available / GiB:.2f} GiB is available")


def model_facts(model_dir: Path) -> dict:
    """What the report needs from the model's own files: config, chat template, EOS token."""
    import json

    def read(name: str) -> dict:
        p = model_dir / name
        return json.loads(p.read_text()) if p.is_file() else {}

    tok = read("tokenizer_config.json")
    template_file = model_dir / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else tok.get("chat_template")
    eos = tok.get("eos_token")
    if isinstance(eos, dict):  # older tokenizer configs wrap special tokens
        eos = eos.get("content")
    return {"config": read("config.json"), "chat_template": template if isinstance(template, str) else None,
            "eos_token": eos}


def publish_run(ctx: RunContext, model: ModelSnapshot, manifest_path: Path):
    """Render the report, apply the regression gate, publish (local store by default)."""
    import json

    from quantkit.publish import release
    from quantkit.recipe import Publish

    facts = model_facts(model.path)
    calib_readme = ctx.root / "calibration" / "README.md"
    return release(run_dir=manifest_path.parent, manifest=json.loads(manifest_path.read_text()), root=ctx.root,
                   settings=ctx.recipe.publish or Publish(), recipe_yaml=ctx.recipe_file.read_text(),
                   config=facts["config"], chat_template=facts["chat_template"], eos_token=facts["eos_token"],
                   calibration_readme=calib_readme.read_text() if calib_readme.is_file() else None)


def run(ctx: RunContext, *, publish: bool = True) -> RunResult:
    start = time.perf_counter()
    preflight(ctx)
    model, calib = prepare_source(ctx)
    log.info("model %s: %d files, digest %s", model.repo or model.path, len(model.files), model.digest[:12])
    variants: list[Variant] = []
    if ctx.recipe.gguf:
        _, gg = gguf_variants(ctx, model, calib)
        if ctx.recipe.evaluation:
            gg = score_ggufs(ctx, gg)
        variants += gg
    if ctx.recipe.gptq or ctx.recipe.awq:
        ckpts = checkpoint_variants(ctx, model, calib)
        if ctx.recipe.evaluation:
            ckpts = score_checkpoints(ctx, model, ckpts)
        variants += ckpts
    with run_folder_lock(ctx):
        manifest = write_run_folder(ctx, model, calib, variants)
        published = publish_run(ctx, model, manifest).path if publish else None
    reused = tuple(s["step"] for s in ctx.steps if s["reused"])
    built = tuple(s["step"] for s in ctx.steps if not s["reused"])
    log.info("run %s done in %.1fs: %d steps built, %d reused%s", ctx.recipe.name, time.perf_counter() - start,
             len(built), len(reused), f" ({', '.join(reused)})" if reused else "")
    return RunResult(manifest.parent, manifest, tuple(variants), reused, built, published)

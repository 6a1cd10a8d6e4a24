"""Step 6: turn a scored run's manifest into what a person decides from.

``build_report`` is pure: manifest (+ the model's config.json and chat template) in,
a versioned report dict out. Everything else renders that dict: ``report.json`` (the
machine-readable truth), ``report.md``, ``plot.png``, the model card ``README.md`` (``quantkit.publish.card``)
and one Ollama Modelfile per GGUF. Publishing (``quantkit.publish.release``) only moves files.

All reading of manifest.json happens in ``_variant_row`` (with ``_quant_settings``) and ``_run_facts``, through
the typed records of ``quantkit.manifest`` (``build_report`` turns a dict into a ``Manifest`` once): when the
manifest changes shape, those records and functions change and nothing else.

Round-to-nearest variants (format ``rtn``) are references: shown in the table and compared with the GPTQ
and AWQ variants of the same bits and group size (``rtn_comparisons``), never recommended, on no frontier
or hardware table, and left out of the model card.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from quantkit.formats import format_of
from quantkit import __version__
from quantkit.digest import write_json_atomic
from quantkit.errors import QuantkitError
from quantkit.manifest import Manifest, ManifestVariant, SetScore, Speed, TaskScore
from quantkit.paths import inside
from quantkit.publish.card import render_card
from quantkit.publish.markdown import external_md, refused, render_markdown, serving_md, variants_table
from quantkit.publish.plot import render_plot
from quantkit.publish.stats import (BARE_SCORE, bases_agree, discrimination, external_comparisons, pareto_frontier,
                                    recommend, rtn_caveats, rtn_comparisons, task_base, task_diff_se, task_se, tie, within_error, worst_sets)
from quantkit.hardware import GIB, ModelShape, hardware_fit
from quantkit.publish.modelfile import (llama_server_command, merge_command, modelfile_name, render_modelfile,
                                       vllm_serve_command)

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1
# Manifests this report reads: 2 lists steps as graph nodes and drops the base logits, neither of which the
# report reads; variants, model, recipe, calibration and toolchain keep their shape.
MANIFEST_SCHEMAS = (1, 2)
DEFAULT_RECOMMEND_KLD = 0.05  # mean KLD under which a variant counts as "close to the base"
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin")


class ReportSchemaError(QuantkitError, ValueError):
    """A report.json that this version of quantkit cannot read."""


# --- the only code that reads manifest.json -------------------------------------------------------

def _num(d: dict | None, *keys: str) -> float | None:
    """First present numeric value among ``keys`` (the scorer's names and the contract's)."""
    for k in keys:
        v = (d or {}).get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


# A task's column shows one metric for every row: the first of these that every row has (llama-perplexity
# computes only acc_token_norm, so a run with GGUF variants reports that one).
METRIC_PREFERENCE = ("acc_token_norm", "acc_norm", "acc")


def _task_raw(score: TaskScore | float) -> dict | None:
    """A task score as ``{"values": {metric: value}, "items": {metric: per-item 0/1}, "n", "items_sha256"}``,
    from quantkit.scoring.tasks' summary or a bare number; None when it holds no number."""
    if not isinstance(score, TaskScore):
        value = _num({"v": score}, "v")
        return None if value is None else {"values": {BARE_SCORE: value}, "items": {}, "n": None,
                                           "items_sha256": None}
    values = {m: v for m in (*METRIC_PREFERENCE, score.metric or "acc") if (v := score.number(m)) is not None}
    items = dict(score.per_item or {})
    if isinstance(score.correct, list) and score.metric:
        items.setdefault(score.metric, score.correct)
    n = score.n
    return {"values": values, "items": {m: tuple(v) for m, v in items.items() if isinstance(v, (list, tuple))},
            "n": n if n is not None and n > 0 else None, "items_sha256": score.items_sha256} if values else None


def _task_columns(rows: list[dict]) -> dict[str, dict]:
    """One column per (task, metric), named by the task alone when every row has its metric: each row's
    ``tasks``, ``tasks_n`` and ``tasks_items`` keyed by column; returns ``{column: {"task", "metric"}}``."""
    columns: dict[str, dict] = {}
    for task in sorted({t for r in rows for t in r["task_raw"]}):
        have = [set(r["task_raw"][task]["values"]) for r in rows if task in r["task_raw"]]
        common = set.intersection(*have)
        pick = next((m for m in METRIC_PREFERENCE if m in common), min(common) if common else None)
        for r in rows:
            raw = r["task_raw"].get(task)
            if raw is None:
                continue
            metric = pick or next(m for m in (*METRIC_PREFERENCE, *sorted(raw["values"])) if m in raw["values"])
            col = task if pick else f"{task} [{metric}]"
            columns[col] = {"task": task, "metric": metric}
            r["tasks"][col] = raw["values"][metric]
            if raw["n"]:
                r["tasks_n"][col] = raw["n"]
            if metric in raw["items"]:
                r["tasks_items"][col] = (raw["items_sha256"], metric, raw["items"][metric])
    for r in rows:
        del r["task_raw"]
    return dict(sorted(columns.items()))


def _variant_row(v: ManifestVariant, resolved: dict) -> dict:
    """One report row from a manifest variant; ``resolved`` is the run's resolved recipe."""
    weights = ([r.size for n, r in v.files.items() if n.endswith(WEIGHT_SUFFIXES)]
               or [r.size for r in v.files.values()])
    scores = v.scores
    speed = scores.speed or Speed()
    gguf_info = v.info.get("gguf") or {}
    return {
        "id": v.id, "format": v.format, "label": v.label, "file": v.file,
        "size_bytes": int(sum(weights)), "parameters": gguf_info.get("parameters"),
        "ppl": scores.number("ppl"), "ppl_err": scores.number("ppl_err"),
        "kld_mean": scores.number("kld_mean"), "kld_mean_err": scores.number("kld_mean_err"),
        "kld_p99": scores.number("kld_p99"), "kld_p999": scores.number("kld_p999"),
        "same_top_pct": scores.number("same_top_pct"),
        "sets": _set_rows(scores.sets),
        "task_raw": {k: raw for k, raw in ((k, _task_raw(s)) for k, s in (scores.tasks or {}).items())
                     if raw is not None},
        "tasks": {}, "tasks_n": {}, "tasks_items": {},  # by column: filled by _task_columns
        "pp_tps": speed.number("pp_tokens_per_s"), "tg_tps": speed.number("tg_tokens_per_s"),
        "threads": speed.threads,
        "mix": _mix_row(v.info.get("mix")),
        "reference": format_of(v).reference,
        "serving": scores.serve.to_dict() if scores.serve else None,  # None: not checked
        "quant": _quant_settings(v.format, v.label, resolved),
        # [{file, size, sha256}] when published as llama-gguf-split shards
        "shards": [s.to_dict() for s in v.shards] or None,
    }


SET_FIELDS = ("ppl", "ppl_err", "kld_mean", "kld_mean_err", "kld_p99", "kld_p999", "same_top_pct")


def _set_rows(sets: dict[str, SetScore] | None) -> dict[str, dict]:
    """A variant's scores per evaluation set (``evaluation.sets``, quantkit.evalsets), by set name."""
    return {name: {**{k: sc.number(k) for k in SET_FIELDS}, "kind": sc.kind, "ctx": sc.ctx,
                   "n_tokens": sc.n_tokens, "backend": sc.backend, "reference": sc.reference,
                   "set_info": sc.set_info} for name, sc in (sets or {}).items()}


def _quant_settings(fmt: str, label: str, resolved: dict) -> dict | None:
    """Bits, group size and symmetry (False: a zero point per group) of a GPTQ, AWQ or RTN variant, from the
    resolved recipe; None when the recipe there does not name it."""
    import pydantic

    from quantkit.recipe import Recipe

    kind = Recipe.entry_class(fmt)
    for raw in (resolved.get(fmt) or []) if kind else []:
        try:
            spec = kind.model_validate(raw)
        except pydantic.ValidationError:  # a recipe of another quantkit version
            continue
        if spec.name == label:
            return {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}
    return None


def _mix_row(mix: dict | None) -> dict | None:
    """A size-budget variant (gguf.targets): its budget and which tensors got which type (quantkit.budget)."""
    if not mix:
        return None
    from quantkit.budget import mix_summary

    return {"target": mix.get("target"), "budget_bytes": mix.get("budget_bytes"), "file": mix.get("file"),
            "type_counts": mix.get("type_counts"), "summary": mix_summary(mix.get("tensors") or {}),
            "check": mix.get("check"), "fallback": mix.get("fallback"), "uncovered_experts": mix.get("uncovered_experts")}


def _first_set_name(evaluation: dict) -> str | None:
    if not evaluation.get("file"):
        return None
    from quantkit.recipe import default_set_name

    return evaluation.get("name") or default_set_name(str(evaluation["file"]))


def _run_facts(manifest: Manifest) -> dict:
    resolved = manifest.recipe.resolved or {}
    model = manifest.model
    src = resolved.get("model") or {}
    name = src.get("name") or (model.repo or model.path or "model").rstrip("/").split("/")[-1]
    evaluation = resolved.get("evaluation") or {}
    return {
        "recipe": {"name": manifest.recipe.name, "file": manifest.recipe.file, "sha256": manifest.recipe.sha256},
        "model": {"name": name, "repo": model.repo, "revision": model.revision, "commit": model.commit,
                  "digest": model.digest},
        "calibration": {"sha256": manifest.calibration.sha256, "sources": list(manifest.calibration.sources or [])},
        "evaluation": {"file": evaluation.get("file"), "ctx": evaluation.get("ctx"), "name": _first_set_name(evaluation),
                       "sets": [{"name": s.get("name"), "file": s.get("file"), "ctx": s.get("ctx"),
                                 "kind": s.get("format") or ("chat" if str(s.get("file", "")).endswith(".jsonl")
                                                             else "text")}
                                for s in evaluation.get("sets") or [] if isinstance(s, dict)]},
        "toolchain": {"llama_cpp": manifest.toolchain.llama_cpp if manifest.toolchain else None,
                      "version": manifest.toolchain.version if manifest.toolchain else None},
        "publish": resolved.get("publish") or {},
    }


# --- building the report ----------------------------------------------------------------------------

def build_report(manifest: Manifest | dict, *, config: dict | None = None, chat_template: str | None = None,
                 recommend_max_kld: float = DEFAULT_RECOMMEND_KLD, num_ctx: int = 4096,
                 regression: dict | None = None, base_origin: dict | None = None) -> dict:
    """The report dict (schema ``REPORT_SCHEMA``) that every rendering is made from.

    ``base_origin``: where the base checkpoint came from when it is not original weights
    (``quantkit.demo.DEQUANTIZED_MARKER``, e.g. ``{"format": "gguf", "quant_type": "Q4_1", "block_size": 32}``)."""
    schema = manifest.schema if isinstance(manifest, Manifest) else manifest.get("schema")
    if schema not in MANIFEST_SCHEMAS:
        raise ReportSchemaError(f"manifest schema {schema!r} is not supported "
                                f"(expected one of {', '.join(map(str, MANIFEST_SCHEMAS))})")
    manifest = Manifest.coerce(manifest)
    rows = [_variant_row(v, manifest.recipe.resolved or {}) for v in manifest.variants]
    if not rows:
        raise ReportSchemaError("the manifest lists no variants")
    task_metrics = _task_columns(rows)
    base = rows[0]
    base["is_base"] = True
    hf_base = next((r for r in rows if format_of(r).base), None)
    for r in rows:
        r.setdefault("is_base", format_of(r).base)
        r["parameters"] = r["parameters"] or base["parameters"]
        r["size_gib"] = r["size_bytes"] / GIB
        r["bpw"] = r["size_bytes"] * 8 / r["parameters"] if r["parameters"] else None
        r["dppl"] = r["ppl"] - base["ppl"] if None not in (r["ppl"], base["ppl"]) else None
        r["dppl_pct"] = 100 * r["dppl"] / base["ppl"] if r["dppl"] is not None else None
        ref = hf_base if format_of(r).torch and not format_of(r).base and hf_base and hf_base["tasks"] else base
        r["recovery"] = {t: s / ref["tasks"][t] for t, s in r["tasks"].items() if ref["tasks"].get(t)}
        r["recovery_mean"] = sum(r["recovery"].values()) / len(r["recovery"]) if r["recovery"] else None
        r["tasks_se"] = {t: task_se(s, r["tasks_n"].get(t)) for t, s in r["tasks"].items()}
        r["dppl_tie"] = within_error(r["dppl"], r["ppl_err"], base["ppl_err"]) if not r["is_base"] else None
        r["recommended"] = []
    ranked = [r for r in rows if not r["reference"]]  # what a user may pick: references stay out
    task_checks = {t: discrimination(ranked, t) for t in sorted({t for r in ranked for t in r["tasks"]})}
    counted = [t for t, c in task_checks.items() if c["discriminates"]]
    for r in rows:
        r["task_ties"] = {t: tie(s - ref["tasks"][t], task_diff_se(r, ref, t))
                          for t, s in r["tasks"].items() if not r["is_base"] and (ref := task_base(rows, t))}
        mine = [t for t in counted if t in r["tasks"]]
        r["task_mean"] = sum(r["tasks"][t] for t in mine) / len(mine) if mine and len(mine) == len(counted) else None
        ses = [r["tasks_se"].get(t) for t in mine]
        r["task_mean_se"] = (math.sqrt(sum(e * e for e in ses)) / len(ses)
                             if r["task_mean"] is not None and None not in ses else None)
    for t, check in task_checks.items():
        check["bases"] = bases_agree(base, hf_base, t)
    ev = _run_facts(manifest)["evaluation"]
    set_names = worst_sets(rows, [ev["name"], *(s["name"] for s in ev["sets"])])
    metric = "worst_kld_mean" if set_names else "kld_mean"  # with several sets, ranking uses each one's worst set
    quantized = [r for r in ranked if not r["is_base"]]
    frontier = pareto_frontier(quantized, metric)
    for r in rows:
        r["pareto"] = r["id"] in frontier
    recommend(quantized, frontier, recommend_max_kld, counted, metric=metric)
    facts = _run_facts(manifest)
    facts["model"]["base_origin"] = base_origin
    against_rtn = [c | {"set": ev["name"]} for c in rtn_comparisons(rows)]
    for name in set_names[1:]:  # the same test on every other set, on that set's numbers
        on_set = [{**r, **{k: r["sets"][name][k] for k in ("kld_mean", "kld_mean_err")}} if name in r["sets"]
                  else {**r, "kld_mean": None} for r in rows]
        against_rtn += [c | {"set": name} for c in rtn_comparisons(on_set)]
    # other publishers' files (compare:), each against the run's nearest GGUF on every set, paired per chunk
    chunks = {v.id: {ev["name"]: v.scores.chunk_kld, **{n: sc.chunk_kld for n, sc in (v.scores.sets or {}).items()}}
              for v in manifest.variants}
    external = external_comparisons(rows, chunks, set_names or [ev["name"]])
    caveats = _caveats(rows, base_origin, manifest) + rtn_caveats(against_rtn)
    ctx = min(num_ctx, ModelShape.from_config(config).max_context or num_ctx) if config else num_ctx
    for r in rows:
        r["serve"] = _serve(r, chat_template, ctx)
    hardware = hardware_fit(ranked, ModelShape.from_config(config)) if config else None
    tasks = sorted({t for r in rows for t in r["tasks"]})
    return {"schema": REPORT_SCHEMA, "quantkit": __version__, **facts, "tasks": tasks, "task_metrics": task_metrics,
            "task_checks": task_checks,
            "caveats": caveats, "variants": rows, "pareto": frontier, "pareto_metric": metric, "sets": set_names,
            "rtn_comparisons": against_rtn, "external_comparisons": external,
            "recommend_max_kld": recommend_max_kld,
            "recommended": [{"id": r["id"], "why": w} for r in rows for w in r["recommended"]],
            "hardware": hardware, "regression": regression, "experts": expert_coverage(manifest),
            **({"projectors": projectors} if (projectors := _projectors(manifest)) else {})}


def _projectors(manifest: Manifest) -> list[dict]:
    """A VLM's mmproj files (the manifest's ``projectors``): name, type, bytes, sha256, projector type."""
    return [{"file": p.file, "type": p.type, "size": p.size, "sha256": p.sha256, "architecture": p.architecture,
             "projector_type": p.projector_type} for p in manifest.projectors]


def expert_coverage(manifest: Manifest | dict) -> dict | None:
    """Mixture-of-experts coverage from the variants' info (quantkit.experts, quantkit.gptq): the imatrix's
    least-covered experts, the GGUF tensors that fell back for uncovered ones, the calibration tokens each
    expert saw in GPTQ/AWQ. None for a dense model."""
    manifest = Manifest.coerce(manifest)
    imatrix, fallback, without, calibrated = None, {}, [], {}
    for v in manifest.variants:
        e = v.info.get("experts")
        if not e:
            continue
        vid = v.id
        if format_of(v).llama_cpp:
            imatrix = imatrix or {k: e[k] for k in ("min_tokens", "least", "below")}
            if e.get("fallback"):
                fallback[vid] = {"type": e["fallback_type"], "tensors": e["fallback"]}
            if e.get("below_kept"):
                without.append(vid)
        else:
            calibrated[vid] = {"routing": e.get("routing"), "tokens_per_expert": e.get("tokens_per_expert")}
    if imatrix is None and not calibrated:
        return None
    resolved = manifest.recipe.resolved or {}
    min_tokens = imatrix["min_tokens"] if imatrix else (
        ((resolved.get("gguf") or {}).get("imatrix") or {}).get("min_expert_tokens", 32))
    short = {vid: c for vid, c in calibrated.items() if (c["tokens_per_expert"] or 0) < min_tokens}
    return {"imatrix": imatrix, "fallback": fallback, "below_kept": without, "calibrated": calibrated,
            "calibration_short": sorted(short), "min_tokens": min_tokens}


def _caveats(rows: list[dict], base_origin: dict | None, manifest: Manifest) -> list[str]:
    """What a reader must know before comparing the numbers."""
    if not base_origin:
        return []
    qtype = base_origin.get("quant_type") or "a quantized type"
    block = base_origin.get("block_size")
    src = base_origin.get("source")
    resolved = manifest.recipe.resolved or {}
    groups = sorted({g for g in [*(x.get("group_size") for x in resolved.get("gptq") or []),
                                 *(x.get("q_group_size") for x in resolved.get("awq") or [])] if g})
    ggufs = [r["label"] for r in rows if format_of(r).llama_cpp and not r["is_base"]]
    others = [r["id"] for r in rows if format_of(r).checkpoint]
    grid = f"one scale and minimum per {block} weights" if block else "its own block grid"
    text = (f"The base checkpoint is not original weights: it was dequantized from a {qtype} "
            f"{base_origin.get('format', '').upper()} file" + (f" ({src})" if src else "") +
            f", so every weight already lies on {qtype}'s grid ({grid}). ")
    if ggufs and others:
        text += (f"llama.cpp's types share that block structure and can land back on the same grid, so the GGUF "
                 f"variants ({', '.join(ggufs)}) look better than {', '.join(others)}"
                 + (f" (groups of {', '.join(map(str, groups))} weights)" if groups else "") +
                 " for that reason, not because the method is better. Compare formats on a model that was never "
                 "quantized.")
    else:
        text += "Losses measured against it understate what the same types lose on original weights."
    return [text]


def _serve(r: dict, chat_template: str | None, ctx: int) -> dict:
    if format_of(r).llama_cpp and r["file"] and r.get("shards"):  # llama.cpp loads shards by the first one
        first = r["shards"][0]["file"]
        return {"modelfile": modelfile_name(r["file"]), "command": llama_server_command(first, ctx=ctx),
                "merge": merge_command(first, r["file"]), "num_ctx": ctx}
    if format_of(r).llama_cpp and r["file"]:
        return {"modelfile": modelfile_name(r["file"]), "command": llama_server_command(r["file"], ctx=ctx),
                "num_ctx": ctx}
    if format_of(r).checkpoint and r["file"]:
        return {"command": vllm_serve_command(r["file"], fmt=r["format"], ctx=ctx), "num_ctx": ctx}
    return {}


def validate_report(report: dict) -> dict:
    """Check a loaded report.json is one this code understands; return it."""
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        found = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise ReportSchemaError(f"report schema {found!r} is not {REPORT_SCHEMA}")
    for key, kind in {"recipe": dict, "model": dict, "variants": list, "pareto": list, "recommended": list}.items():
        if not isinstance(report.get(key), kind):
            raise ReportSchemaError(f"report.json: '{key}' is missing or not a {kind.__name__}")
    for v in report["variants"]:
        missing = {"id", "format", "label", "size_bytes", "kld_mean", "tasks"} - v.keys()
        if missing:
            raise ReportSchemaError(f"report.json: variant {v.get('id')!r} lacks {sorted(missing)}")
    return report


def load_report(path: Path) -> dict:
    return validate_report(json.loads(Path(path).read_text(encoding="utf-8")))


# --- rendering ----------------------------------------------------------------------------------------


def render_modelfiles(report: dict, *, chat_template: str | None, eos_token: str | None = None) -> dict[str, str]:
    """``{file name: Modelfile text}``, one per GGUF variant."""
    projector = next((p["file"] for p in report.get("projectors") or [] if p["type"] == "F16"), None)
    return {r["serve"]["modelfile"]: render_modelfile(r["file"], chat_template, num_ctx=r["serve"]["num_ctx"],
                                                      eos_token=eos_token,
                                                      shards=[s["file"] for s in r.get("shards") or []],
                                                      projector=projector)
            for r in report["variants"] if r["serve"].get("modelfile")}


def write_report(report: dict, out_dir: Path, *, recipe_yaml: str, chat_template: str | None = None,
                 eos_token: str | None = None, calibration_readme: str | None = None) -> list[Path]:
    """Write report.json, report.md, plot.png, README.md (card) and the Modelfiles into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    write_json_atomic(out_dir / "report.json", validate_report(report))
    written.append(out_dir / "report.json")
    # the card shows what is published, and other publishers' files beside it (marked ext, never published)
    published = {**report, "variants": [r for r in report["variants"]
                                         if not r.get("reference") or format_of(r).external]}
    bad = refused(report)  # failed their serve check: no Modelfile for them
    texts = {"report.md": render_markdown(report),
             "README.md": str(render_card(published, table=variants_table(published) + serving_md(published)
                                          + external_md(report),
                                       recipe_yaml=recipe_yaml, calibration_readme=calibration_readme)),
             **render_modelfiles({**report, "variants": [r for r in report["variants"] if r["id"] not in bad]},
                                 chat_template=chat_template, eos_token=eos_token)}
    for name, text in texts.items():
        dest = inside(out_dir, name)  # Modelfile names carry variant labels
        tmp = dest.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(dest)
        written.append(dest)
    render_plot(report, out_dir / "plot.png")
    written.append(out_dir / "plot.png")
    log.info("report for %s: %d variants, recommended %s", report["recipe"]["name"], len(report["variants"]),
             ", ".join(sorted({r["id"] for r in report["recommended"]})) or "none")
    return written

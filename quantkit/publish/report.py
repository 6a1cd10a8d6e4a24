"""Step 6: turn a scored run's manifest into what a person decides from.

``build_report`` is pure: manifest (+ the model's config.json and chat template) in,
a versioned report dict out. Everything else renders that dict: ``report.json`` (the
machine-readable truth), ``report.md``, ``plot.png``, the model card ``README.md`` (``quantkit.publish.card``)
and one Ollama Modelfile per GGUF. Publishing (``quantkit.publish.release``) only moves files.

All reading of manifest.json happens in ``_variant_row`` (with ``_quant_settings``) and ``_run_facts``:
when the manifest changes shape, those functions change and nothing else.

Round-to-nearest variants (format ``rtn``) are references: shown in the table and compared with the GPTQ
and AWQ variants of the same bits and group size (``rtn_comparisons``), never recommended, on no frontier
or hardware table, and left out of the model card.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from quantkit.graph import FORMATS, format_of
from quantkit import __version__
from quantkit.digest import write_json_atomic
from quantkit.errors import QuantkitError
from quantkit.paths import inside
from quantkit.publish.card import render_card
from quantkit.publish.hardware import GIB, ModelShape, hardware_fit
from quantkit.publish.modelfile import (llama_server_command, merge_command, modelfile_name, render_modelfile,
                                       vllm_serve_command)

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1
# Manifests this report reads: 2 lists steps as graph nodes and drops the base logits, neither of which the
# report reads; variants, model, recipe, calibration and toolchain keep their shape.
MANIFEST_SCHEMAS = (1, 2)
DEFAULT_RECOMMEND_KLD = 0.05  # mean KLD under which a variant counts as "close to the base"
RTN_SEPARATION = 3.0  # combined standard errors by which a mean KLD must differ from RTN's to count
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
BARE_SCORE = "score"  # a task score given as a bare number: its metric is not known


def _task_raw(score) -> dict | None:
    """A task score as ``{"values": {metric: value}, "items": {metric: per-item 0/1}, "n", "items_sha256"}``,
    from quantkit.scoring.tasks' summary dict or a bare number; None when it holds no number."""
    if not isinstance(score, dict):
        value = _num({"v": score}, "v")
        return None if value is None else {"values": {BARE_SCORE: value}, "items": {}, "n": None,
                                           "items_sha256": None}
    values = {m: v for m in (*METRIC_PREFERENCE, score.get("metric") or "acc") if (v := _num(score, m)) is not None}
    items = dict(score.get("per_item") or {})
    if isinstance(score.get("correct"), list) and score.get("metric"):
        items.setdefault(score["metric"], score["correct"])
    n = score.get("n")
    return {"values": values, "items": {m: tuple(v) for m, v in items.items() if isinstance(v, (list, tuple))},
            "n": int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None,
            "items_sha256": score.get("items_sha256")} if values else None


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


def task_header(report: dict, column: str) -> str:
    """A task column's heading: the task and the metric its numbers are."""
    meta = (report.get("task_metrics") or {}).get(column)
    return f"{meta['task']} ({meta['metric']})" if meta and meta["metric"] != BARE_SCORE else column


def _variant_row(v: dict, resolved: dict) -> dict:
    """One report row from a manifest variant; ``resolved`` is the run's resolved recipe."""
    files = v.get("files") or {}
    weights = ([r["size"] for n, r in files.items() if n.endswith(WEIGHT_SUFFIXES)]
               or [r["size"] for r in files.values()])
    scores = v.get("scores") or {}
    speed = scores.get("speed") or {}
    gguf_info = (v.get("info") or {}).get("gguf") or {}
    return {
        "id": f"{v['format']}:{v['label']}", "format": v["format"], "label": v["label"], "file": v.get("file"),
        "size_bytes": int(sum(weights)), "parameters": gguf_info.get("parameters"),
        "ppl": _num(scores, "ppl"), "ppl_err": _num(scores, "ppl_err"),
        "kld_mean": _num(scores, "kld_mean"), "kld_mean_err": _num(scores, "kld_mean_err"),
        "kld_p99": _num(scores, "kld_p99"), "kld_p999": _num(scores, "kld_p999"),
        "same_top_pct": _num(scores, "same_top_pct"),
        "sets": _set_rows(scores.get("sets")),
        "task_raw": {k: raw for k, raw in ((k, _task_raw(s)) for k, s in (scores.get("tasks") or {}).items())
                     if raw is not None},
        "tasks": {}, "tasks_n": {}, "tasks_items": {},  # by column: filled by _task_columns
        "pp_tps": _num(speed, "pp_tps", "pp_tokens_per_s"), "tg_tps": _num(speed, "tg_tps", "tg_tokens_per_s"),
        "threads": speed.get("threads"),
        "mix": _mix_row((v.get("info") or {}).get("mix")),
        "reference": format_of(v).reference,
        "serving": scores.get("serve"),  # quantkit.serving.ServeCheck.to_dict(), or None when not checked
        "quant": _quant_settings(v["format"], v["label"], resolved),
        "shards": v.get("shards"),  # [{file, size, sha256}] when published as llama-gguf-split shards
    }


SET_FIELDS = ("ppl", "ppl_err", "kld_mean", "kld_mean_err", "kld_p99", "kld_p999", "same_top_pct")


def _set_rows(sets: dict | None) -> dict[str, dict]:
    """A variant's scores per evaluation set (``evaluation.sets``, quantkit.evalsets), by set name."""
    out = {}
    for name, sc in (sets or {}).items():
        if isinstance(sc, dict):
            out[name] = {**{k: _num(sc, k) for k in SET_FIELDS}, "kind": sc.get("kind"), "ctx": sc.get("ctx"),
                         "n_tokens": sc.get("n_tokens"), "backend": sc.get("backend"),
                         "reference": sc.get("reference"), "set_info": sc.get("set_info")}
    return out


def _quant_settings(fmt: str, label: str, resolved: dict) -> dict | None:
    """Bits, group size and symmetry (False: a zero point per group) of a GPTQ, AWQ or RTN variant, from the
    resolved recipe; None when the recipe there does not name it."""
    import pydantic

    from quantkit.recipe import AWQVariant, GPTQVariant, RTNVariant

    kind = {"gptq": GPTQVariant, "awq": AWQVariant, "rtn": RTNVariant}.get(fmt)
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
            "check": mix.get("check"), "fallback": mix.get("fallback")}


def _first_set_name(evaluation: dict) -> str | None:
    if not evaluation.get("file"):
        return None
    from quantkit.recipe import default_set_name

    return evaluation.get("name") or default_set_name(str(evaluation["file"]))


def _run_facts(manifest: dict) -> dict:
    resolved = manifest["recipe"].get("resolved") or {}
    model = manifest.get("model") or {}
    src = resolved.get("model") or {}
    name = src.get("name") or (model.get("repo") or model.get("path") or "model").rstrip("/").split("/")[-1]
    evaluation = resolved.get("evaluation") or {}
    return {
        "recipe": {"name": manifest["recipe"]["name"], "file": manifest["recipe"].get("file"),
                   "sha256": manifest["recipe"].get("sha256")},
        "model": {"name": name, "repo": model.get("repo"), "revision": model.get("revision"),
                  "commit": model.get("commit"), "digest": model.get("digest")},
        "calibration": {"sha256": (manifest.get("calibration") or {}).get("sha256"),
                        "sources": list((manifest.get("calibration") or {}).get("sources") or [])},
        "evaluation": {"file": evaluation.get("file"), "ctx": evaluation.get("ctx"), "name": _first_set_name(evaluation),
                       "sets": [{"name": s.get("name"), "file": s.get("file"), "ctx": s.get("ctx"),
                                 "kind": s.get("format") or ("chat" if str(s.get("file", "")).endswith(".jsonl")
                                                             else "text")}
                                for s in evaluation.get("sets") or [] if isinstance(s, dict)]},
        "toolchain": {"llama_cpp": (manifest.get("toolchain") or {}).get("llama_cpp"),
                      "version": (manifest.get("toolchain") or {}).get("version")},
        "publish": resolved.get("publish") or {},
    }


# --- building the report ----------------------------------------------------------------------------

def build_report(manifest: dict, *, config: dict | None = None, chat_template: str | None = None,
                 recommend_max_kld: float = DEFAULT_RECOMMEND_KLD, num_ctx: int = 4096,
                 regression: dict | None = None, base_origin: dict | None = None) -> dict:
    """The report dict (schema ``REPORT_SCHEMA``) that every rendering is made from.

    ``base_origin``: where the base checkpoint came from when it is not original weights
    (``quantkit.demo.DEQUANTIZED_MARKER``, e.g. ``{"format": "gguf", "quant_type": "Q4_1", "block_size": 32}``)."""
    if manifest.get("schema") not in MANIFEST_SCHEMAS:
        raise ReportSchemaError(f"manifest schema {manifest.get('schema')!r} is not supported "
                                f"(expected one of {', '.join(map(str, MANIFEST_SCHEMAS))})")
    rows = [_variant_row(v, manifest["recipe"].get("resolved") or {}) for v in manifest["variants"]]
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
        r["dppl_tie"] = _within_error(r["dppl"], r["ppl_err"], base["ppl_err"]) if not r["is_base"] else None
        r["recommended"] = []
    ranked = [r for r in rows if not r["reference"]]  # what a user may pick: references stay out
    task_checks = {t: discrimination(ranked, t) for t in sorted({t for r in ranked for t in r["tasks"]})}
    counted = [t for t, c in task_checks.items() if c["discriminates"]]
    for r in rows:
        r["task_ties"] = {t: _tie(s - ref["tasks"][t], task_diff_se(r, ref, t))
                          for t, s in r["tasks"].items() if not r["is_base"] and (ref := _task_base(rows, t))}
        mine = [t for t in counted if t in r["tasks"]]
        r["task_mean"] = sum(r["tasks"][t] for t in mine) / len(mine) if mine and len(mine) == len(counted) else None
        ses = [r["tasks_se"].get(t) for t in mine]
        r["task_mean_se"] = (math.sqrt(sum(e * e for e in ses)) / len(ses)
                             if r["task_mean"] is not None and None not in ses else None)
    for t, check in task_checks.items():
        check["bases"] = _bases_agree(base, hf_base, t)
    ev = _run_facts(manifest)["evaluation"]
    set_names = _worst_sets(rows, [ev["name"], *(s["name"] for s in ev["sets"])])
    metric = "worst_kld_mean" if set_names else "kld_mean"  # with several sets, ranking uses each one's worst set
    quantized = [r for r in ranked if not r["is_base"]]
    frontier = pareto_frontier(quantized, metric)
    for r in rows:
        r["pareto"] = r["id"] in frontier
    _recommend(quantized, frontier, recommend_max_kld, counted, metric=metric)
    facts = _run_facts(manifest)
    facts["model"]["base_origin"] = base_origin
    against_rtn = [c | {"set": ev["name"]} for c in rtn_comparisons(rows)]
    for name in set_names[1:]:  # the same test on every other set, on that set's numbers
        on_set = [{**r, **{k: r["sets"][name][k] for k in ("kld_mean", "kld_mean_err")}} if name in r["sets"]
                  else {**r, "kld_mean": None} for r in rows]
        against_rtn += [c | {"set": name} for c in rtn_comparisons(on_set)]
    caveats = _caveats(rows, base_origin, manifest) + _rtn_caveats(against_rtn)
    ctx = min(num_ctx, ModelShape.from_config(config).max_context or num_ctx) if config else num_ctx
    for r in rows:
        r["serve"] = _serve(r, chat_template, ctx)
    hardware = hardware_fit(ranked, ModelShape.from_config(config)) if config else None
    tasks = sorted({t for r in rows for t in r["tasks"]})
    return {"schema": REPORT_SCHEMA, "quantkit": __version__, **facts, "tasks": tasks, "task_metrics": task_metrics,
            "task_checks": task_checks,
            "caveats": caveats, "variants": rows, "pareto": frontier, "pareto_metric": metric, "sets": set_names,
            "rtn_comparisons": against_rtn,
            "recommend_max_kld": recommend_max_kld,
            "recommended": [{"id": r["id"], "why": w} for r in rows for w in r["recommended"]],
            "hardware": hardware, "regression": regression, "experts": expert_coverage(manifest),
            **({"projectors": projectors} if (projectors := _projectors(manifest)) else {})}


def _projectors(manifest: dict) -> list[dict]:
    """A VLM's mmproj files (the manifest's ``projectors``): name, type, bytes, sha256, projector type."""
    return [{k: p.get(k) for k in ("file", "type", "size", "sha256", "architecture", "projector_type")}
            for p in manifest.get("projectors") or []]


def projector_md(report: dict) -> list[str]:
    """The "Vision projector" section of report.md and the cards: the files and how to load them."""
    projectors = report.get("projectors") or []
    if not projectors:
        return []
    first = projectors[0]["file"]
    out = ["", "## Vision projector", "",
           f"The model reads images through its projector ({projectors[0].get('architecture') or 'vision tower'}, "
           f"`{projectors[0].get('projector_type') or '?'}`), a separate GGUF loaded with any text GGUF below. "
           "`llama-server -hf` downloads the one beside the GGUF whose bit count is closest to the chosen quant; "
           "with files on disk:", "",
           f"- llama-server: `{llama_server_command('MODEL.gguf', ctx=4096)} --mmproj {first}`",
           f"- llama-mtmd-cli: `llama-mtmd-cli -m MODEL.gguf --mmproj {first} --image photo.jpg -p 'Describe it.'`",
           f"- Ollama: the `.Modelfile` beside each GGUF has a second `FROM ./{first}` line", "",
           "| file | type | bytes | sha256 |", "|---|---|---|---|"]
    out += [f"| `{p['file']}` | {p['type']} | {p['size']} | `{p['sha256']}` |" for p in projectors]
    return out



def expert_coverage(manifest: dict) -> dict | None:
    """Mixture-of-experts coverage from the variants' info (quantkit.experts, quantkit.gptq): the imatrix's
    least-covered experts, the GGUF tensors that fell back for uncovered ones, the calibration tokens each
    expert saw in GPTQ/AWQ. None for a dense model."""
    imatrix, fallback, without, calibrated = None, {}, [], {}
    for v in manifest["variants"]:
        e = (v.get("info") or {}).get("experts")
        if not e:
            continue
        vid = f"{v['format']}:{v['label']}"
        if v["format"] == "gguf":
            imatrix = imatrix or {k: e[k] for k in ("min_tokens", "least", "below")}
            if e.get("fallback"):
                fallback[vid] = {"type": e["fallback_type"], "tensors": e["fallback"]}
            if e.get("below_kept"):
                without.append(vid)
        else:
            calibrated[vid] = {"routing": e.get("routing"), "tokens_per_expert": e.get("tokens_per_expert")}
    if imatrix is None and not calibrated:
        return None
    resolved = manifest["recipe"].get("resolved") or {}
    min_tokens = imatrix["min_tokens"] if imatrix else (
        ((resolved.get("gguf") or {}).get("imatrix") or {}).get("min_expert_tokens", 32))
    short = {vid: c for vid, c in calibrated.items() if (c["tokens_per_expert"] or 0) < min_tokens}
    return {"imatrix": imatrix, "fallback": fallback, "below_kept": without, "calibrated": calibrated,
            "calibration_short": sorted(short), "min_tokens": min_tokens}


def experts_md(report: dict) -> list[str]:
    e = report.get("experts")
    if not e:
        return []
    out = ["", "## Expert coverage", ""]
    if im := e["imatrix"]:
        out.append(f"Importance matrix: tokens routed to each expert on the calibration text (threshold "
                   f"{im['min_tokens']}, `gguf.imatrix.min_expert_tokens`). Least covered:")
        out += ["", "| layer | expert | tokens |", "|---:|---:|---:|"]
        out += [f"| {layer} | {ex} | {n}{' (below)' if n < im['min_tokens'] else ''} |" for layer, ex, n in im["least"]]
        out.append("")
        if im["below"]:
            out.append(f"- {len(im['below'])} expert(s) below the threshold: "
                       + ", ".join(f"layer {layer} expert {ex} ({n})" for layer, ex, n in im["below"][:16]))
        else:
            out.append("- every expert reached the threshold")
    for vid, fb in e["fallback"].items():
        out.append(f"- {vid}: a type that needs importance data for every expert; the expert tensors of layers with "
                   f"uncovered experts were made {fb['type']} instead: {', '.join(fb['tensors'])}")
    for vid in e["below_kept"]:
        out.append(f"- {vid}: a type that needs no importance data; experts below the threshold were quantized "
                   "with the little data they had (uniform weights for those with none, as without an imatrix)")
    for vid, c in e["calibrated"].items():
        out.append(f"- {vid}: every expert calibrated on {c['tokens_per_expert']} tokens ({c['routing']})"
                   + (f", fewer than {e['min_tokens']}" if vid in e["calibration_short"] else ""))
    return out


def _worst_sets(rows: list[dict], order: list) -> list[str]:
    """The evaluation sets' names (in the recipe's ``order``); each row gets its worst set: the one with the highest
    mean KLD, with that set's mean and error, and its highest 99.9th percentile over the sets (``worst_*``). Empty
    when the run scored one set."""
    seen = {n for r in rows for n in r["sets"]}
    names = [n for n in order if n in seen] + sorted(seen - set(order))
    if len(names) < 2:
        return []
    for r in rows:
        scored = [(n, sc) for n, sc in r["sets"].items() if sc["kld_mean"] is not None]
        if len(scored) < len(names):  # a set it was not scored on could be its worst: not ranked on a guess
            r.update(worst_set=None, worst_kld_mean=None, worst_kld_mean_err=None, worst_kld_p999=None)
            continue
        name, sc = max(scored, key=lambda x: x[1]["kld_mean"])
        r.update(worst_set=name, worst_kld_mean=sc["kld_mean"], worst_kld_mean_err=sc["kld_mean_err"],
                 worst_kld_p999=max((s["kld_p999"] for _, s in scored if s["kld_p999"] is not None), default=None))
    return names


def _bases_agree(base: dict, hf_base: dict | None, task: str) -> dict | None:
    """The GGUF base against the HF checkpoint it was converted from, on one task column: the same weights, so
    a difference beyond the error means the two backends do not measure the same thing."""
    if hf_base is None or hf_base is base or task not in base["tasks"] or task not in hf_base["tasks"]:
        return None
    diff = base["tasks"][task] - hf_base["tasks"][task]
    se = task_diff_se(base, hf_base, task)
    return {"gguf": base["id"], "hf": hf_base["id"], "difference": diff, "se": se,
            "paired": paired_items(base, hf_base, task) is not None,
            "agree": None if se is None else abs(diff) <= 3 * se}


def task_se(score: float, n: int | None) -> float | None:
    """Standard error of an accuracy over ``n`` items, with the Laplace estimate (k+1)/(n+2) in place of
    k/n so that 0/n and n/n do not claim an error of zero (16 right out of 16 is not certainty)."""
    if n is None:
        return None
    p = (score * n + 1) / (n + 2)
    return math.sqrt(p * (1 - p) / n)


def task_diff_se(a: dict, b: dict, task: str) -> float | None:
    """Standard error of the difference of two rows' scores on ``task``: paired, item by item, when both were
    scored on the same items with the same metric (sd of the per-item differences / sqrt(n)); else the two
    scores' errors combined as if independent."""
    pair = paired_items(a, b, task)
    if pair:
        return paired_difference(*pair)[1]
    return _combined(a["tasks_se"].get(task), b["tasks_se"].get(task))


def paired_items(a: dict, b: dict, task: str) -> tuple[tuple, tuple] | None:
    """Both rows' per-item results on ``task`` when they are the same items (same digest, or both unknown) with
    the same metric; None otherwise. Backends do not matter: every backend computes a metric by one definition."""
    ia, ib = (a.get("tasks_items") or {}).get(task), (b.get("tasks_items") or {}).get(task)
    if ia and ib and list(ia[:2]) == list(ib[:2]) and len(ia[2]) == len(ib[2]) > 1:
        return tuple(ia[2]), tuple(ib[2])
    return None


def paired_difference(a, b) -> tuple[float, float]:
    """Mean of the per-item differences ``a - b`` and its standard error (sd / sqrt(n))."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def _combined(err_a: float | None, err_b: float | None) -> float | None:
    """Two independent errors combined; None when either is unknown."""
    return None if err_a is None or err_b is None else math.hypot(err_a, err_b)


def _tie(diff: float | None, err: float | None) -> bool | None:
    """True when ``diff`` is no larger than its standard error ``err``; None when it cannot be told."""
    if diff is None:
        return None
    if err is None:
        return True if diff == 0 else None
    return abs(diff) <= err


def _within_error(diff: float | None, err_a: float | None, err_b: float | None) -> bool | None:
    """``_tie`` against the combined standard error of the two numbers."""
    return _tie(diff, _combined(err_a, err_b))


def rtn_comparisons(rows: list[dict]) -> list[dict]:
    """Each GPTQ/AWQ variant against the RTN reference of its bits and group size (the one of the same symmetry
    when there is one): does the calibrated method beat plain rounding in mean KLD? ``verdict``: ``beats``,
    ``worse``, ``not separated`` (within ``RTN_SEPARATION`` combined standard errors) or ``unknown`` (an error
    is missing). The errors are each mean's own, combined as if independent: both variants are scored on the
    same tokens, so a paired error would be smaller and this is the cautious side."""
    refs = [r for r in rows if r["reference"] and r.get("quant") and r["kld_mean"] is not None]
    out = []
    for r in rows:
        q = r.get("quant")
        if not format_of(r).checkpoint or not q or r["kld_mean"] is None:
            continue
        same = [x for x in refs if (x["quant"]["bits"], x["quant"]["group_size"]) == (q["bits"], q["group_size"])]
        if not same:
            continue
        rtn = next((x for x in same if x["quant"]["sym"] == q["sym"]), same[0])
        diff = rtn["kld_mean"] - r["kld_mean"]  # above 0: the method is closer to the base than rounding
        errs = (r["kld_mean_err"], rtn["kld_mean_err"])
        se = _combined(*errs)
        if se is None:
            verdict = "unknown"
        elif diff > RTN_SEPARATION * se:
            verdict = "beats"
        elif diff < -RTN_SEPARATION * se:
            verdict = "worse"
        else:
            verdict = "not separated"
        out.append({"id": r["id"], "rtn": rtn["id"], "bits": q["bits"], "group_size": q["group_size"],
                    "sym": q["sym"], "rtn_sym": rtn["quant"]["sym"], "kld_mean": r["kld_mean"],
                    "kld_mean_err": errs[0], "rtn_kld_mean": rtn["kld_mean"], "rtn_kld_mean_err": errs[1],
                    "difference": diff, "se": se, "sigmas": diff / se if se else None, "verdict": verdict})
    return out


def _rtn_caveats(comparisons: list[dict]) -> list[str]:
    """A calibrated method that does not beat plain rounding is the first thing to explain."""
    return [f"{c['id']} does not beat plain round-to-nearest ({c['rtn']}) in mean KLD"
            + (f" on set `{c['set']}`" if c.get("set") else "") + ": "
            f"{_pm(c['kld_mean'], c['kld_mean_err'])} against {_pm(c['rtn_kld_mean'], c['rtn_kld_mean_err'])}. "
            "A method that calibrates should be closer to the base than rounding; find out why (calibration "
            "samples, desc_act, damping, group size, the settings passed to GPTQModel) before comparing it further."
            for c in comparisons if c["verdict"] in ("worse", "not separated")]


def _pm(value: float, err: float | None) -> str:
    return f"{value:.5f}" + (f" ± {err:.5f}" if err is not None else "")


def _task_base(rows: list[dict], task: str) -> dict | None:
    """The base row a task score is compared with: the first row (the GGUF base) or else the HF base."""
    return next((r for r in rows if r["is_base"] and task in r["tasks"]), None)


def discrimination(rows: list[dict], task: str) -> dict:
    """Whether ``task`` separates the variants at all: not when every variant scores the same, when the
    base already scores the maximum (nothing above it to measure), or when no two variants differ by more
    than their combined standard error. Only tasks that discriminate drive a recommendation."""
    scored = [r for r in rows if task in r["tasks"]]
    values = [r["tasks"][task] for r in scored]
    base = _task_base(rows, task)
    out = {"discriminates": False, "base": base["tasks"][task] if base else None, "min": min(values),
           "max": max(values), "n": max((r["tasks_n"].get(task) or 0 for r in scored), default=0) or None}
    if max(values) == min(values):
        return out | {"why": f"every variant scores {values[0]:.4f}"}
    if base and base["tasks"][task] >= 1.0 - 1e-9:
        return out | {"why": "the base scores 1.0: at the ceiling, the task cannot rank variants"}
    # A pair whose error is unknown (a bare score, no item count) counts as separated: nothing says otherwise.
    if all(_tie(a["tasks"][task] - b["tasks"][task], task_diff_se(a, b, task))
           for i, a in enumerate(scored) for b in scored[i + 1:]):
        return out | {"why": f"no two variants differ by more than their standard error (scores "
                             f"{min(values):.4f}–{max(values):.4f})"}
    return out | {"discriminates": True, "why": f"scores {min(values):.4f}–{max(values):.4f} separate the variants"}


def _caveats(rows: list[dict], base_origin: dict | None, manifest: dict) -> list[str]:
    """What a reader must know before comparing the numbers."""
    if not base_origin:
        return []
    qtype = base_origin.get("quant_type") or "a quantized type"
    block = base_origin.get("block_size")
    src = base_origin.get("source")
    resolved = manifest["recipe"].get("resolved") or {}
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


def pareto_frontier(rows: list[dict], metric: str) -> list[str]:
    """Ids of the rows no other row beats on both size and ``metric`` (lower is better), smallest first."""
    pts = sorted((r for r in rows if r.get(metric) is not None), key=lambda r: (r["size_bytes"], r[metric]))
    out, best = [], math.inf
    for r in pts:
        if r[metric] < best:
            out.append(r["id"])
            best = r[metric]
    return out


def _recommend(rows: list[dict], frontier: list[str], max_kld: float, tasks: list[str],
               metric: str = "kld_mean") -> None:
    """``tasks``: the tasks that discriminate; the others drive nothing. ``metric``: ``worst_kld_mean`` when
    several sets were scored (each variant judged on its worst set, named in the reason)."""
    by_id = {r["id"]: r for r in rows}
    good = [r for r in rows if r.get(metric) is not None and r[metric] < max_kld]
    if good:
        r = min(good, key=lambda r: r["size_bytes"])
        where = (f"on its worst evaluation set (set `{r['worst_set']}`: {r[metric]:.4f} ± "
                 f"{r['worst_kld_mean_err'] or 0:.4f})" if metric == "worst_kld_mean" else f"({r[metric]:.4f})")
        r["recommended"].append(f"smallest variant with mean KLD under {max_kld:g} {where}")
    knee = _knee([by_id[i] for i in frontier], metric)
    if knee is not None:
        what = "worst-set mean KLD" if metric == "worst_kld_mean" else "KLD"
        knee["recommended"].append(f"best quality per byte: the knee of the size/{what} Pareto frontier (furthest "
                                   "from the line joining its smallest and largest variants)")
    scored = [r for r in rows if r["task_mean"] is not None]
    if not scored:
        return
    best = max(scored, key=lambda r: (r["task_mean"], -r["size_bytes"]))
    tied = [r for r in scored if r is not best and
            _within_error(best["task_mean"] - r["task_mean"], best["task_mean_se"], r["task_mean_se"])]
    pick = min([best, *tied], key=lambda r: r["size_bytes"])
    why = f"highest mean score on the tasks that discriminate ({', '.join(tasks)}): {best['task_mean']:.4f}"
    if tied:
        why = (f"smallest of the variants tied within standard error for the highest mean score on the tasks that "
               f"discriminate ({', '.join(tasks)}; best {best['task_mean']:.4f} by {best['id']}, tied: "
               f"{', '.join(r['id'] for r in [best, *tied] if r is not pick)})")
    pick["recommended"].append(why)


def _knee(front: list[dict], metric: str = "kld_mean") -> dict | None:
    """Frontier point furthest below the chord from the smallest to the largest variant
    (size linear, log KLD, both scaled to 0..1)."""
    pts = [r for r in front if r[metric] > 0]
    if len(pts) < 3:
        return None
    xs = [r["size_bytes"] for r in pts]
    ys = [math.log10(r[metric]) for r in pts]
    sx, sy = (max(xs) - min(xs)) or 1, (max(ys) - min(ys)) or 1
    x = [(v - min(xs)) / sx for v in xs]
    y = [(v - min(ys)) / sy for v in ys]
    (x0, y0), (x1, y1) = (x[0], y[0]), (x[-1], y[-1])
    dist = [((y1 - y0) * xi - (x1 - x0) * yi + x1 * y0 - y1 * x0) / math.hypot(x1 - x0, y1 - y0)
            for xi, yi in zip(x, y)]
    i = max(range(1, len(pts) - 1), key=lambda i: abs(dist[i]))
    return pts[i]


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

def _f(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def variants_table(report: dict) -> list[str]:
    """The comparison table, one row per variant (markdown lines); the report and the card share it."""
    tasks = report["tasks"]
    checks = report.get("task_checks") or {}
    worst = bool(report.get("sets"))
    head = ["", "format", "variant", "size GiB", "bpw", "PPL", "ΔPPL", "mean KLD", "KLD p99", "same top %",
            *(["worst set: mean KLD", "worst p99.9 KLD"] if worst else []),
            *[task_header(report, t) + ("" if checks.get(t, {}).get("discriminates", True) else " †") for t in tasks],
            "pp t/s", "tg t/s"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in report["variants"]:
        dppl = _f(r["dppl"], "+.4f") + (" (tie)" if r.get("dppl_tie") else "")
        task_cells = [_f(r["tasks"].get(t), ".4f") + (" (tie)" if (r.get("task_ties") or {}).get(t) else "")
                      for t in tasks]
        fell_back = (r.get("mix") or {}).get("fallback")
        label = r["label"] + (f" (stock {fell_back['stock']}: the search fell back)" if fell_back else
                              " (searched mix)" if r.get("mix") else "")
        mark = "★" if r["recommended"] else "base" if r["is_base"] else "ref" if r.get("reference") else ""
        cells = [mark, r["format"], label,
                 _f(r["size_gib"], ".3f"), _f(r["bpw"], ".2f"), _f(r["ppl"], ".4f"), dppl,
                 _f(r["kld_mean"], ".5f"), _f(r["kld_p99"], ".5f"), _f(r["same_top_pct"], ".2f"),
                 *([f"{r['worst_set']}: {_f(r['worst_kld_mean'], '.5f')}" if r.get("worst_set") else "–",
                    _f(r.get("worst_kld_p999"), ".5f")] if worst else []),
                 *task_cells, _f(r["pp_tps"], ".1f"), _f(r["tg_tps"], ".1f")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def render_markdown(report: dict) -> str:
    m = report["model"]
    out = [f"# {m['name']}: quantized variants ({report['recipe']['name']})", "",
           f"Base model: {m['repo'] or 'local checkpoint'}"
           + (f" @ `{m['commit'] or m['revision']}`" if m["repo"] else "") + f" · {report['toolchain']['version'] or 'llama.cpp ?'} · quantkit {report['quantkit']}",
           (f"The table's PPL, KLD and (tie) columns are set `{report['sets'][0]}`, scored on "
            if report.get("sets") else "Scored on ")
           + f"`{report['evaluation']['file']}` (ctx {report['evaluation']['ctx']})"
           + ("; the worst-set columns and the Evaluation sets section cover every set" if report.get("sets") else "")
           + "; KLD against the base "
           "variant (first row); ★ = recommended; (tie) = differs from the base by less than its standard error "
           "(paired over the items when both were scored on the same ones with the same metric); † = the task does "
           "not discriminate (see Tasks)"
           + ("; ref = round-to-nearest reference, not published (see Against round-to-nearest)."
              if any(r.get("reference") for r in report["variants"]) else "."), ""]
    for caveat in report.get("caveats") or []:
        out += [f"> **Read this first.** {caveat}", ""]
    out += ["## Variants", ""]
    out += variants_table(report)
    out += sets_md(report)
    out += serving_md(report)
    out += _tasks_md(report)
    out += _rtn_md(report)
    out += ["", "## Recommended", ""]
    out += [f"- **{rec['id']}**: {rec['why']}" for rec in report["recommended"]] or ["- none: no variant has scores"]
    checks = report.get("task_checks") or {}
    if checks and not any(c["discriminates"] for c in checks.values()):
        out.append("- no recommendation from task scores: no task separates the variants (see Tasks)")
    if report["pareto"]:
        what = ("mean KLD on each variant's worst evaluation set" if report.get("pareto_metric") == "worst_kld_mean"
                else "mean KLD")
        out.append(f"- Pareto frontier (size vs {what}, smallest first): {', '.join(report['pareto'])}")
    if report.get("unchanged_since"):
        out.append(f"- unchanged since {report['unchanged_since']}: the same files and scores as that published run, "
                   "so no new release was made")
    out += _regression_md(report.get("regression"))
    out += _since_md(report)
    out += mix_md(report)
    out += experts_md(report)
    out += _hardware_md(report)
    out += projector_md(report)
    out += ["", "## How to run", ""]
    bad = refused(report)
    for r in report["variants"]:
        if r["serve"].get("command") and r["id"] not in bad:  # not published: nothing to run
            mf, merge = r["serve"].get("modelfile"), r["serve"].get("merge")
            extra = (f" (Ollama cannot import shards: `{merge}`, then `ollama create NAME -f {mf}`)" if merge
                     else f" (Ollama: `ollama create NAME -f {mf}`)" if mf else "")
            out.append(f"- {r['id']}: `{r['serve']['command']}`{extra}")
    return "\n".join(out) + "\n"


def _since_md(report: dict) -> list[str]:
    from quantkit.publish.since import since_md  # a tracking run's comparison with the last release

    return since_md(report)


def set_heading(report: dict, name: str) -> str:
    """What a set is: its kind, file, context, tokens and the reference its KLD is measured against."""
    meta = next((s for s in (report["evaluation"].get("sets") or []) if s["name"] == name), None)
    rows = [r["sets"][name] for r in report["variants"] if name in r.get("sets", {})]
    first = next((sc for sc in rows if sc.get("n_tokens")), rows[0] if rows else {})
    kind = first.get("kind") or (meta or {}).get("kind") or "text"
    file = (meta or {}).get("file") or report["evaluation"].get("file")
    info = next((sc["set_info"] for sc in rows if sc.get("set_info")), None)
    what = ("conversations rendered through the checkpoint's chat template" if kind == "chat" else "raw text")
    if info:
        what += (f": {info['conversations']} conversations, {info['tokens']} tokens"
                 + (f"; {info['skipped_tools']} that use tools left out (the template does not mention tools)"
                    if info.get("skipped_tools") else ""))
    ref = ("every row against the HF checkpoint's log-probs in torch (llama-perplexity does not parse special "
           "tokens in text, so it reads these tokens and log-probs from a --kl-divergence-base file quantkit writes)"
           if kind == "chat" else "GGUF rows against the base GGUF (llama-perplexity --kl-divergence), torch rows "
           "against the HF checkpoint on the same windows")
    return (f"### Set `{name}`: `{file}` ({what}; ctx {first.get('ctx') or (meta or {}).get('ctx')}, "
            f"{first.get('n_tokens') or '?'} scored tokens). KLD: {ref}")


def sets_md(report: dict) -> list[str]:
    """One table per evaluation set (issue #26), when the run scored more than one."""
    names = report.get("sets") or []
    if not names:
        return []
    out = ["", "## Evaluation sets", "",
           "Every variant on every held-out set. The worst set of a variant is the one where its mean KLD is "
           "highest; recommendations and the Pareto frontier use it. Mean KLD ± one standard error over the "
           "set's scored tokens."]
    for name in names:
        out += ["", set_heading(report, name), "",
                "| format | variant | size GiB | PPL | mean KLD | KLD p99 | KLD p99.9 | same top % |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["variants"]:
            sc = r["sets"].get(name)
            if sc is None:
                continue
            mark = " (worst)" if r.get("worst_set") == name and len(names) > 1 and not r["is_base"] else ""
            kld = "–" if sc["kld_mean"] is None else _pm(sc["kld_mean"], sc["kld_mean_err"])
            out.append(f"| {r['format']} | {r['label']}{mark} | {_f(r['size_gib'], '.3f')} | "
                       f"{_f(sc['ppl'], '.4f')} | {kld}{mark and ' ◀'} | {_f(sc['kld_p99'], '.5f')} | "
                       f"{_f(sc['kld_p999'], '.5f')} | {_f(sc['same_top_pct'], '.2f')} |")
    return out


def _yes(value: bool | None) -> str:
    return "–" if value is None else "yes" if value else "**no**"


def refused(report: dict) -> dict[str, str]:
    """``{variant id: why}`` for every artifact whose serve check failed: publish leaves them out."""
    return {r["id"]: "; ".join(r["serving"]["failures"]) for r in report["variants"]
            if r.get("serving") and not r["serving"].get("passed", True)}


def serving_md(report: dict) -> list[str]:
    """The serve checks (quantkit.serving), one row per artifact checked; empty when none was."""
    rows = [r for r in report["variants"] if r.get("serving")]
    if not rows:
        return []
    out = ["", "## Serving", "",
           "Each artifact in the program people serve it with: GGUFs through `llama-server --jinja` (the template "
           "embedded in the file), GPTQ/AWQ checkpoints in transformers on the CPU. *Chat stops*: a short multi-turn "
           "chat ends with the end-of-turn token within the token limit; *template matches*: the prompt rendered "
           "equals what transformers renders from the source checkpoint's chat template; *tool call*: n/a when the "
           "template does not mention tools. An artifact that fails a check is not published.", "",
           "| variant | program | loads | chat stops | template matches | tool call | vLLM | t/s | verdict |",
           "|---|---|---|---|---|---|---|---:|---|"]
    for r in rows:
        s = r["serving"]
        verdict = "passed" if s.get("passed") else "**not published**: " + "; ".join(s.get("failures") or [])
        cells = [r["id"], s.get("backend", "?"), _yes(s.get("loads")), _yes(s.get("chat_stops")),
                 _yes(s.get("template_matches")), s.get("tool_call", "n/a"), s.get("vllm", "not checked"),
                 _f(s.get("tokens_per_s"), ".1f"), verdict.replace("|", "/")]
        out.append("| " + " | ".join(cells) + " |")
    if images := [(r["id"], r["serving"]["image"]) for r in rows if r["serving"].get("image", "n/a") != "n/a"]:
        out += ["", "*Image* (llama-server with the vision projector: a chat with a small test image is answered and "
                "the image adds tokens to its prompt): " + ", ".join(f"{vid} {img}" for vid, img in images)]
    return out


def _tasks_md(report: dict) -> list[str]:
    checks = report.get("task_checks") or {}
    if not checks:
        return []
    out = ["", "## Tasks", "", "A task counts towards a recommendation only when its scores separate the variants. "
           "Standard errors are binomial over the task's items. A column holds one metric, by one definition, for "
           "every format: `acc_token_norm` picks the choice with the highest mean log-likelihood per token after "
           "the tokens all choices share (llama.cpp's `--multiple-choice` rule, computed the same way from the "
           "torch checkpoints); lm-eval's `acc` and `acc_norm` of the torch checkpoints are in the manifest.", ""]
    for task, c in checks.items():
        n = f", {c['n']} items" if c.get("n") else ""
        verdict = "discriminates" if c["discriminates"] else "**does not discriminate**"
        out.append(f"- `{task_header(report, task)}`{n}: {verdict}: {c['why']}")
        b = c.get("bases")
        if b and b["se"] is not None:
            said = ("identical on every item" if b["paired"] and b["se"] == 0 and b["difference"] == 0 else
                    "they agree within 3 standard errors" if b["agree"] else
                    "**they differ by more than 3 standard errors**: the backends do not measure alike")
            out.append(f"  - {b['gguf']} − {b['hf']} (the same weights in two backends): {b['difference']:+.4f} ± "
                       f"{b['se']:.4f}{' (paired)' if b['paired'] else ''}: {said}")
    return out


def _rtn_md(report: dict) -> list[str]:
    refs = [r for r in report["variants"] if r.get("reference")]
    if not refs:
        return []
    comparisons = report.get("rtn_comparisons") or []
    out = ["", "## Against round-to-nearest", "",
           "Each GPTQ/AWQ variant against plain round-to-nearest (RTN: no calibration, the same bits and group "
           f"size). It beats RTN when its mean KLD is lower by more than {RTN_SEPARATION:g} combined standard "
           "errors (the two means' errors, combined as if independent: cautious, since both are scored on the same "
           "tokens). RTN rows are references: not recommended and not published. Each line names the evaluation "
           "set it was judged on.", ""]
    said = {"beats": "**beats**", "worse": "**is worse than**", "not separated": "**does not beat**",
            "unknown": "is not judged against"}
    for c in comparisons:
        sigmas = (f", {c['sigmas']:+.1f} standard errors" if c["sigmas"] is not None else
                  "; a standard error is missing" if c["se"] is None else "")
        grid = {True: "symmetric", False: "with a zero point"}
        unlike = (f"; RTN {grid[c['rtn_sym']]}, {c['id'].split(':')[0].upper()} {grid[c['sym']]}: not like with like"
                  if c["sym"] != c["rtn_sym"] else "")
        on = f" on set `{c['set']}`" if c.get("set") else ""
        out.append(f"- `{c['id']}` {said[c['verdict']]} `{c['rtn']}`{on}: mean KLD {_pm(c['kld_mean'], c['kld_mean_err'])}"
                   f" vs {_pm(c['rtn_kld_mean'], c['rtn_kld_mean_err'])} (RTN − it = {c['difference']:+.5f}{sigmas}"
                   f"{unlike})")
    compared = {c["id"] for c in comparisons}
    for r in report["variants"]:
        if format_of(r).checkpoint and r["id"] not in compared:
            q = r.get("quant")
            why = ("it has no mean KLD" if r["kld_mean"] is None else
                   f"no RTN variant with a mean KLD at {q['bits']} bits, group size {q['group_size']}" if q else
                   "its settings are not in the run's recipe")
            out.append(f"- `{r['id']}`: not compared ({why})")
    if not any(format_of(r).checkpoint for r in report["variants"]):
        out.append("- the run has no GPTQ or AWQ variant to compare")
    return out


def _regression_md(reg: dict | None) -> list[str]:
    if not reg:
        return []
    z = reg.get("sigmas")
    state = ("FAILED, not published" if reg["failed"] else
             "passed, with inconclusive checks" if reg.get("inconclusive") else "passed")
    out = ["", "## Regression check", "",
           f"Compared with {reg.get('previous_run') or 'no earlier published run'}: **{state}**", ""]
    checks = [c for c in reg.get("changes") or reg.get("findings") or [] if c.get("verdict") != "skipped"]
    if checks:
        out += [f"Each check's bounds lie {z:g} standard errors (paired over the items where both sides scored the "
                "same ones) either side of its estimate: it fails when both are on the wrong side of the limit, "
                "and is inconclusive when they straddle it"
                + (" (inconclusive blocks publishing: strict gating)." if reg.get("strict") else
                   " (inconclusive does not block publishing unless the recipe sets strict)."), ""]
        out += ["| variant | check | previous | now | limit | bounds | verdict |", "|---|---|---:|---:|---:|---|---|"]
        for f in checks:
            bound = f.get("bound")
            out.append(f"| {f['id']} | {f['check']} | {_f(f.get('previous'), '.5f')} | {_f(f['now'], '.5f')} | "
                       f"{f['limit']} | {f'{bound[0]:.5f}–{bound[1]:.5f}' if bound else 'error unknown'} | "
                       f"{f.get('verdict', 'failed')} |")
    return out


def _hardware_md(report: dict) -> list[str]:
    hw = report.get("hardware")
    if not hw:
        return ["", "## Hardware fit", "", "No config.json was given, so the KV cache could not be sized."]
    shape, ctxs = hw["model"], hw["contexts"]
    out = ["", "## Hardware fit", "",
           f"Memory = weights + {hw['cache_type']} KV cache + {hw['headroom_bytes'] / 2**20:.0f} MiB headroom. "
           f"KV cache per token = 2 × {shape['layers']} layers × {shape['kv_heads']} KV heads × {shape['head_dim']} "
           f"head dim × 2 bytes = {2 * shape['layers'] * shape['kv_heads'] * shape['head_dim'] * 2} bytes "
           f"(model context limit: {shape['max_context'] or 'unknown'}).", "",
           "| variant | " + " | ".join(f"GiB @ {c // 1024}k" for c in ctxs) + " |", "|---|" + "---:|" * len(ctxs)]
    for r in report["variants"]:
        if r["id"] not in hw["needed_bytes"]:  # a reference (RTN) is not offered
            continue
        need = hw["needed_bytes"][r["id"]]
        out.append(f"| {r['id']} | " + " | ".join(_f(need[str(c)] / GIB if need[str(c)] else None, ".2f")
                                                 for c in ctxs) + " |")
    out += ["", "Best-quality variant that fits (lowest mean KLD; how many fit in brackets):", "",
            "| memory | " + " | ".join(f"{c // 1024}k ctx" for c in ctxs) + " |", "|---|" + "---|" * len(ctxs)]
    for gb in hw["memory_gb"]:
        cells = [f"{fit[0]} ({len(fit)})" if (fit := hw["fits"][str(gb)][str(c)]) else
                 (f"beyond the model's {shape['max_context']} context" if shape["max_context"] and c > shape["max_context"]
                  else "nothing fits") for c in ctxs]
        out.append(f"| {gb} GB | " + " | ".join(cells) + " |")
    if moe := hw.get("gpu_bytes_experts_in_ram"):
        share = shape["expert_parameters"]
        out += ["", f"Mixture of experts: {shape['experts']} routed experts, {shape['experts_per_token']} per token. "
                f"Everything above must be resident (RAM or VRAM): llama.cpp reads every expert it may route to. "
                f"The routed experts ({share:,} parameters) can stay in system RAM "
                "(`llama-server --cpu-moe`); the GPU then holds the rest plus the KV cache (estimated by the "
                "experts' share of the parameters):", "",
                "| variant | " + " | ".join(f"GPU GiB @ {c // 1024}k" for c in ctxs) + " |",
                "|---|" + "---:|" * len(ctxs)]
        out += [f"| {vid} | " + " | ".join(_f(need[str(c)] / GIB if need[str(c)] else None, ".2f") for c in ctxs) + " |"
                for vid, need in moe.items()]
    return out


MARKERS = {"gguf": "o", "gptq": "s", "awq": "^", "hf": "D", "rtn": "x"}


def mix_md(report: dict) -> list[str]:
    """Per searched-mix variant: its budget and a short table of which tensors got which type."""
    out = []
    for r in report["variants"]:
        mix = r.get("mix")
        if not mix:
            continue
        budget = mix.get("budget_bytes")
        def size(n: float) -> str:
            return f"{n / GIB:.3f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"

        target = mix.get("target") or {}
        what = ("bpw {bpw:g}".format(**target) if "bpw" in target else
                "size_gib {size_gib:.6g}".format(**target) if "size_gib" in target else
                "fits {memory_gib:g} GiB at ctx {ctx}".format(**target["fits"]) if "fits" in target else "?")
        fallback, checks = mix.get("fallback"), [c for c in mix.get("check") or [] if c]
        out += ["", f"### {r['label']}: " + (f"stock {fallback['stock']} (the search fell back)" if fallback
                                               else "searched mix"), "",
                f"Budget {what}" + (f" = {size(budget)}" if budget else "") + f"; file {size(r['size_bytes'])}"
                f" ({_f(r['bpw'], '.2f')} bpw)."]
        # The closed loop (quantkit.budget): the mix against the largest stock type within the budget, KLD
        # on calibration chunks (not the evaluation set), paired per chunk; a win is beyond 3 standard errors.
        for c in checks:
            out.append(f"Check {c['round']}: mix − stock {c['stock']} mean KLD on {c['chunks']} calibration chunks of "
                       f"{c['ctx']} tokens (paired per chunk): {c['diff']:+.5f} ± {c['se']:.5f} "
                       f"({'win' if c['win'] else 'no win'}).")
        if fallback:
            out.append(f"No searched mix won, so this file is the stock type {fallback['stock']} (what "
                       f"`llama-quantize --imatrix` makes), published under the target's label: {fallback['reason']}.")
        out += ["", "Types per tensor (llama-quantize `--tensor-type-file` "
                f"`{mix.get('file')}`, kept beside the GGUF):", "", "| tensor | type | layers |", "|---|---|---|"]
        out += [f"| {row['tensor']} | {row['type']} | {row['layers']} |" for row in mix["summary"]]
    return out


def render_plot(report: dict, path: Path) -> None:
    """Size vs mean KLD (and vs mean task score when present), frontier highlighted, one marker per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantized = [r for r in report["variants"] if not r["is_base"]]
    worst = report.get("pareto_metric") == "worst_kld_mean"
    panels = [("worst_kld_mean", "mean KL divergence on each variant's worst set (log, lower is better)", True)
              if worst else ("kld_mean", "mean KL divergence vs base (log, lower is better)", True)]
    p999 = "worst_kld_p999" if worst else "kld_p999"
    if any(r.get(p999) for r in quantized):
        panels.append((p999, "99.9th percentile KL divergence" + (", worst set" if worst else "")
                       + " (log, lower is better)", True))
    if any(r.get("task_mean") is not None for r in quantized):  # only tasks that discriminate
        counted = [t for t, c in (report.get("task_checks") or {}).items() if c["discriminates"]]
        metrics = sorted({(report.get("task_metrics") or {}).get(t, {}).get("metric", BARE_SCORE) for t in counted})
        panels.append(("task_mean", f"mean {' / '.join(metrics)} over tasks that discriminate (higher is better)",
                       False))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.5), dpi=120, squeeze=False)
    base_gib = report["variants"][0]["size_gib"]
    for ax, (metric, ylabel, log_y) in zip(axes[0], panels):
        for fmt, marker in MARKERS.items():
            pts = [r for r in quantized if r["format"] == fmt and r.get(metric) is not None and (not log_y or r[metric] > 0)
                   and not r.get("mix")]
            if pts:
                ax.scatter([r["size_gib"] for r in pts], [r[metric] for r in pts], marker=marker, s=60,
                           label=f"{fmt} (reference)" if FORMATS[fmt].reference else fmt, zorder=3)
        mixes = [r for r in quantized if r.get("mix") and r.get(metric) is not None and (not log_y or r[metric] > 0)]
        if mixes:  # size-budget variants beside the stock types
            ax.scatter([r["size_gib"] for r in mixes], [r[metric] for r in mixes], marker="*", s=140,
                       color="tab:purple", label="gguf, searched mix (gguf.targets)", zorder=3)
        pts = [r for r in quantized if r.get(metric) is not None and (not log_y or r[metric] > 0)]
        front = ([r for i in report["pareto"] for r in pts if r["id"] == i]
                 if metric == report.get("pareto_metric", "kld_mean") else
                 pareto_rows([r for r in pts if not r.get("reference")], metric) if log_y else
                 _max_frontier([r for r in pts if not r.get("reference")], metric))
        if front:
            ax.plot([r["size_gib"] for r in front], [r[metric] for r in front], "-", color="tab:red", lw=1.5,
                    alpha=0.7, label="Pareto frontier", zorder=2)
        for r in pts:
            ax.annotate(r["label"], (r["size_gib"], r[metric]), textcoords="offset points", xytext=(5, 5), fontsize=8,
                        fontweight="bold" if r["recommended"] else "normal")
        rec = [r for r in pts if r["recommended"]]
        if rec:
            ax.scatter([r["size_gib"] for r in rec], [r[metric] for r in rec], s=220, facecolors="none",
                       edgecolors="gold", linewidths=2, label="recommended", zorder=4)
        ax.axvline(base_gib, color="grey", ls="--", lw=1, label=f"base {report['variants'][0]['label']}")
        base_score = report["variants"][0].get(metric)
        if not log_y and base_score is not None:
            ax.axhline(base_score, color="grey", ls=":", lw=1, label=f"base score {base_score:.4f}")
        if log_y and pts:
            ax.set_yscale("log")
        ax.set_xlabel("size (GiB)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']['name']}: size vs quality ({report['recipe']['name']})")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def pareto_rows(rows: list[dict], metric: str) -> list[dict]:
    ids = pareto_frontier(rows, metric)
    return [r for i in ids for r in rows if r["id"] == i]


def _max_frontier(rows: list[dict], metric: str) -> list[dict]:
    out, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r["size_bytes"], -r[metric])):
        if r[metric] > best:
            out.append(r)
            best = r[metric]
    return out


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
    published = {**report, "variants": [r for r in report["variants"] if not r.get("reference")]}
    bad = refused(report)  # failed their serve check: no Modelfile for them
    texts = {"report.md": render_markdown(report),
             "README.md": str(render_card(published, table=variants_table(published) + serving_md(published),
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

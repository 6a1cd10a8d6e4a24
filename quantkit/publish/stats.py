"""The report's statistics: paired differences with their errors, ties, the Pareto frontier, recommendations.

A difference counts only when it exceeds about three of its standard errors (``quantkit.publish.report``
builds the rows these read; ``quantkit.publish.markdown`` prints them).
"""

from __future__ import annotations

import math

from quantkit.formats import FORMATS, format_of
from quantkit.ggufinfo import SAME_SIZE


def worst_sets(rows: list[dict], order: list) -> list[str]:
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


def bases_agree(base: dict, hf_base: dict | None, task: str) -> dict | None:
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
    return combined(a["tasks_se"].get(task), b["tasks_se"].get(task))


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


def combined(err_a: float | None, err_b: float | None) -> float | None:
    """Two independent errors combined; None when either is unknown."""
    return None if err_a is None or err_b is None else math.hypot(err_a, err_b)


def tie(diff: float | None, err: float | None) -> bool | None:
    """True when ``diff`` is no larger than its standard error ``err``; None when it cannot be told."""
    if diff is None:
        return None
    if err is None:
        return True if diff == 0 else None
    return abs(diff) <= err


def within_error(diff: float | None, err_a: float | None, err_b: float | None) -> bool | None:
    """``_tie`` against the combined standard error of the two numbers."""
    return tie(diff, combined(err_a, err_b))


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
        se = combined(*errs)
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


def rtn_caveats(comparisons: list[dict]) -> list[str]:
    """A calibrated method that does not beat plain rounding is the first thing to explain."""
    return [f"{c['id']} does not beat plain round-to-nearest ({c['rtn']}) in mean KLD"
            + (f" on set `{c['set']}`" if c.get("set") else "") + ": "
            f"{pm(c['kld_mean'], c['kld_mean_err'])} against {pm(c['rtn_kld_mean'], c['rtn_kld_mean_err'])}. "
            "A method that calibrates should be closer to the base than rounding; find out why (calibration "
            "samples, desc_act, damping, group size, the settings passed to GPTQModel) before comparing it further."
            for c in comparisons if c["verdict"] in ("worse", "not separated")]


def task_base(rows: list[dict], task: str) -> dict | None:
    """The base row a task score is compared with: the first row (the GGUF base) or else the HF base."""
    return next((r for r in rows if r["is_base"] and task in r["tasks"]), None)


def discrimination(rows: list[dict], task: str) -> dict:
    """Whether ``task`` separates the variants at all: not when every variant scores the same, when the
    base already scores the maximum (nothing above it to measure), or when no two variants differ by more
    than their combined standard error. Only tasks that discriminate drive a recommendation."""
    scored = [r for r in rows if task in r["tasks"]]
    values = [r["tasks"][task] for r in scored]
    base = task_base(rows, task)
    out = {"discriminates": False, "base": base["tasks"][task] if base else None, "min": min(values),
           "max": max(values), "n": max((r["tasks_n"].get(task) or 0 for r in scored), default=0) or None}
    if max(values) == min(values):
        return out | {"why": f"every variant scores {values[0]:.4f}"}
    if base and base["tasks"][task] >= 1.0 - 1e-9:
        return out | {"why": "the base scores 1.0: at the ceiling, the task cannot rank variants"}
    # A pair whose error is unknown (a bare score, no item count) counts as separated: nothing says otherwise.
    if all(tie(a["tasks"][task] - b["tasks"][task], task_diff_se(a, b, task))
           for i, a in enumerate(scored) for b in scored[i + 1:]):
        return out | {"why": f"no two variants differ by more than their standard error (scores "
                             f"{min(values):.4f}–{max(values):.4f})"}
    return out | {"discriminates": True, "why": f"scores {min(values):.4f}–{max(values):.4f} separate the variants"}


def pareto_frontier(rows: list[dict], metric: str) -> list[str]:
    """Ids of the rows no other row beats on both size and ``metric`` (lower is better), smallest first."""
    pts = sorted((r for r in rows if r.get(metric) is not None), key=lambda r: (r["size_bytes"], r[metric]))
    out, best = [], math.inf
    for r in pts:
        if r[metric] < best:
            out.append(r["id"])
            best = r[metric]
    return out


def recommend(rows: list[dict], frontier: list[str], max_kld: float, tasks: list[str],
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
            within_error(best["task_mean"] - r["task_mean"], best["task_mean_se"], r["task_mean_se"])]
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


def pareto_rows(rows: list[dict], metric: str) -> list[dict]:
    ids = pareto_frontier(rows, metric)
    return [r for i in ids for r in rows if r["id"] == i]


def max_frontier(rows: list[dict], metric: str) -> list[dict]:
    out, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r["size_bytes"], -r[metric])):
        if r[metric] > best:
            out.append(r)
            best = r[metric]
    return out


RTN_SEPARATION = 3.0  # combined standard errors by which a mean KLD must differ from RTN's to count


BARE_SCORE = "score"  # a task score given as a bare number: its metric is not known


def pm(value: float, err: float | None) -> str:
    return f"{value:.5f}" + (f" ± {err:.5f}" if err is not None else "")




def external_comparisons(rows: list[dict], chunks: dict[str, dict[str, list]], sets: list[str]) -> list[dict]:
    """Each external file (``compare:``) against the run's nearest GGUF of equal or smaller size (the largest
    such, or the smallest of all when every one is larger: ``larger`` says so), on every evaluation set, paired
    per chunk: both were scored against the same base logits on the same windows. ``chunks``: variant id ->
    set name -> each chunk's mean KLD. A difference (external - ours) counts beyond 3 standard errors."""
    ours = sorted((r for r in rows if FORMATS[r["format"]].llama_cpp and not r["reference"] and not r["is_base"]),
                  key=lambda r: r["size_bytes"])
    out = []
    for ext in (r for r in rows if FORMATS[r["format"]].external):
        fits = [r for r in ours if r["size_bytes"] <= ext["size_bytes"] * SAME_SIZE]
        near = fits[-1] if fits else ours[0] if ours else None
        if near is None:
            continue
        for name in sets:
            a, b = chunks.get(ext["id"], {}).get(name), chunks.get(near["id"], {}).get(name)
            row = {"external": ext["id"], "ours": near["id"], "set": name, "larger": not fits,
                   "external_bytes": ext["size_bytes"], "ours_bytes": near["size_bytes"]}
            if not a or not b or len(a) != len(b) or len(a) < 2:
                out.append(row | {"diff": None, "se": None, "chunks": 0, "verdict": "not compared (no per-chunk KLD)"})
                continue
            diff, se = paired_difference(a, b)
            verdict = ("external wins" if diff < 0 and -diff > 3 * se else
                       "external loses" if diff > 0 and diff > 3 * se else "no significant difference")
            out.append(row | {"diff": diff, "se": se, "chunks": len(a), "verdict": verdict})
    return out

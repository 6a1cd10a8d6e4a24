"""A tracking run against the last published release: what changed upstream, what it did to each variant,
and whether that is enough to publish (quantkit.tracking, docs/nightly.md).

The differences and their errors are the regression gate's own checks (``release.regression_gate``: mean
KLD, paired task scores); this module lays them out per variant beside what moved (model commit, llama.cpp
commit, calibration digest) and says why a run is held. Pure: manifests (``quantkit.manifest.Manifest`` or
their JSON) and dicts in, dicts and markdown lines out.
"""

from __future__ import annotations

from quantkit.manifest import Manifest
from quantkit.formats import format_of

INPUTS = (("model commit", lambda m: m.model.commit or m.model.revision),
          ("llama.cpp commit", lambda m: m.toolchain.llama_cpp if m.toolchain else None),
          ("calibration digest", lambda m: m.calibration.sha256))


def _evaluation(manifest: Manifest) -> dict:
    """The evaluation sets a run scored on, as its resolved recipe names them."""
    return (manifest.recipe.resolved or {}).get("evaluation") or {}


def since_last_release(previous: Manifest | dict, current: Manifest | dict, gate: dict, *, previous_run: str) -> dict:
    """``previous``/``current``: the published and this run's manifests; ``gate``: the regression gate's
    result for this run against that release."""
    previous, current = Manifest.coerce(previous), Manifest.coerce(current)
    inputs = [{"what": what, "before": get(previous), "now": get(current), "changed": get(previous) != get(current)}
              for what, get in INPUTS]
    same_sets = _evaluation(previous) == _evaluation(current)
    before = {v.id: v for v in previous.variants}
    rows = []
    for v in current.variants:
        vid = v.id
        if format_of(v).reference:  # scored for comparison, never published
            continue
        old = before.get(vid)
        files = None if old is None else {n: r.sha256 for n, r in v.files.items()} != \
            {n: r.sha256 for n, r in old.files.items()}
        checks = []
        for c in gate.get("changes") or []:
            if c["id"] != vid or not (c["check"] == "kld_mean" or c["check"].startswith("task:")):
                continue
            diff = None if c.get("previous") is None else c["now"] - c["previous"]
            checks.append({"check": c["check"], "previous": c.get("previous"), "now": c["now"], "difference": diff,
                           "se": c.get("se"), "verdict": c["verdict"], "why": c.get("skipped")})
        rows.append({"id": vid, "new": old is None, "files_changed": files, "checks": checks})
    return {"previous_run": previous_run, "inputs": inputs, "same_sets": same_sets, "variants": rows}


def hold_reason(since: dict, gate: dict) -> str | None:
    """Why a tracking run with changed inputs is not published, or None: it publishes only when every check
    passes with its error (an inconclusive check holds it too, as does a moved value whose error is unknown), on
    the sets the last release was scored on."""
    if not since["same_sets"]:
        return (f"scored on other evaluation settings than {since['previous_run']}: the differences are not "
                "paired; publish with a plain run after reviewing the recipe change")
    failed = [c for c in gate.get("changes") or [] if c["verdict"] == "failed"]
    # A check that passed on its point estimate alone, with a value that moved, did not pass with its error.
    unsure = [c for c in gate.get("changes") or [] if c["verdict"] == "inconclusive" or (
        c["verdict"] == "passed" and c.get("se") is None and c.get("previous") not in (None, c["now"]))]
    if failed or unsure:
        first = (failed or unsure)[0]
        more = len(failed) + len(unsure) - 1
        return (f"{'failed' if failed else 'not shown with its error'}: {first['id']} {first['check']}: "
                f"{first['message']}"
                + (f" (and {more} more)" if more > 0 else ""))
    return None


def _pm(diff: float | None, se: float | None) -> str:
    if diff is None:
        return "–"
    return f"{diff:+.5f} ± {se:.5f}" if se is not None else f"{diff:+.5f} (error unknown)"


def since_md(report: dict) -> list[str]:
    since = report.get("since_release")
    if not since:
        return []
    out = ["", f"## Since the last release ({since['previous_run']})", ""]
    if report.get("held"):
        out += [f"**Held, not published**: {report['held']}", ""]
    moved = [f"{i['what']} `{i['before']}` → `{i['now']}`" for i in since["inputs"] if i["changed"]]
    kept = [f"{i['what']} `{i['now']}`" for i in since["inputs"] if not i["changed"]]
    out.append("What changed: " + ("; ".join(moved) or "no tracked input") + (f". Unchanged: {'; '.join(kept)}."
                                                                             if kept else "."))
    out.append("Scored on " + ("the same evaluation settings as that release; differences are now − then, ± one "
                               "standard error (paired over the items for tasks)." if since["same_sets"] else
                               "**other** evaluation settings than that release: the differences are not paired."))
    out += ["", "| variant | files | check | then | now | difference ± SE | verdict |",
            "|---|---|---|---:|---:|---:|---|"]
    for r in since["variants"]:
        files = "new" if r["new"] else ("rebuilt, other bytes" if r["files_changed"] else "same bytes")
        if not r["checks"]:
            out.append(f"| {r['id']} | {files} | – | | | | {'base: the reference' if not r['new'] else '–'} |")
        for c in r["checks"]:
            then = "–" if c["previous"] is None else f"{c['previous']:.5f}"
            why = f" ({c['why']})" if c.get("why") else ""
            out.append(f"| {r['id']} | {files} | {c['check']} | {then} | {c['now']:.5f} | "
                       f"{_pm(c['difference'], c['se'])} | {c['verdict']}{why} |")
    return out

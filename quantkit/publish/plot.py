"""``report.png``: quality against size, one marker per format, the Pareto frontier drawn."""

from __future__ import annotations

from pathlib import Path

from quantkit.formats import FORMATS
from quantkit.publish.stats import BARE_SCORE, max_frontier, pareto_rows


def scatter_groups(quantized: list[dict], metric: str, *, log_y: bool) -> list[tuple[list[dict], dict]]:
    """One panel's points: (rows, scatter style) per format, the searched mixes in a group of their own."""
    shown = [r for r in quantized if r.get(metric) is not None and (not log_y or r[metric] > 0)]
    groups = []
    for fmt, marker in ((name, f.marker) for name, f in FORMATS.items()):
        if pts := [r for r in shown if r["format"] == fmt and not r.get("mix")]:
            groups.append((pts, {"marker": marker, "s": 60, "label": (
                f"{fmt} (another publisher's file)" if FORMATS[fmt].external else
                f"{fmt} (reference)" if FORMATS[fmt].reference else fmt)}))
    if mixes := [r for r in shown if r.get("mix")]:  # size-budget variants beside the stock types
        groups.append((mixes, {"marker": "*", "s": 140, "color": "tab:purple",
                               "label": "gguf, searched mix (gguf.targets)"}))
    return groups


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
        for rows, style in scatter_groups(quantized, metric, log_y=log_y):
            ax.scatter([r["size_gib"] for r in rows], [r[metric] for r in rows], zorder=3, **style)
        pts = [r for r in quantized if r.get(metric) is not None and (not log_y or r[metric] > 0)]
        front = ([r for i in report["pareto"] for r in pts if r["id"] == i]
                 if metric == report.get("pareto_metric", "kld_mean") else
                 pareto_rows([r for r in pts if not r.get("reference")], metric) if log_y else
                 max_frontier([r for r in pts if not r.get("reference")], metric))
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

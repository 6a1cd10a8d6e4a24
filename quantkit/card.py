"""The model card of a published run: huggingface_hub's ModelCard over a rendered report.

Front matter (base_model, quantized_by, tags, eval results) from ModelCardData; the body names the
llama.cpp version, the recipe, and the calibration texts with their licences from calibration/README.md.
"""

from __future__ import annotations

FORMAT_TAGS = {"gguf": "gguf", "gptq": "gptq", "awq": "awq"}


def calibration_licences(readme: str) -> dict[str, dict[str, str]]:
    """``{path: {source, licence}}`` from the table in calibration/README.md."""
    out, head = {}, None
    for line in readme.splitlines():
        if not line.startswith("|"):
            head = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head = [c.lower() for c in cells]
        elif "file" in head and "licence" in head and not set(cells[0]) <= set("-: "):
            row = dict(zip(head, cells))
            name = row["file"].strip("`")
            out[f"calibration/{name}"] = {"source": row.get("source", ""), "licence": row["licence"]}
    return out


def render_card(report: dict, *, table: list[str], recipe_yaml: str, calibration_readme: str | None = None):
    """The model card (README.md of the published folder) as a huggingface_hub ``ModelCard``.

    ``table`` is report.md's comparison table (markdown lines), so the card shows the same rows."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    m, rows = report["model"], report["variants"]
    formats = sorted({r["format"] for r in rows if r["format"] in FORMAT_TAGS})
    evals = []
    for r in rows:
        for metric, value, dataset in ([("perplexity", r["ppl"], report["evaluation"]["file"]),
                                        ("kl_divergence_mean", r["kld_mean"], report["evaluation"]["file"])]
                                       + [("accuracy", s, t) for t, s in r["tasks"].items()]):
            if value is not None and not (metric == "kl_divergence_mean" and r["is_base"]):
                evals.append(EvalResult(task_type="text-generation", dataset_type=str(dataset),
                                        dataset_name=str(dataset), metric_type=metric, metric_value=value,
                                        metric_name=f"{r['label']} {metric}"))
    data = ModelCardData(base_model=m["repo"], base_model_relation="quantized" if m["repo"] else None,
                         quantized_by="quantkit", tags=[*formats, "quantized", "quantkit"],
                         library_name="gguf" if "gguf" in formats else None, model_name=f"{m['name']}-quantized",
                         eval_results=evals or None)
    licences = calibration_licences(calibration_readme) if calibration_readme else {}
    calib = [f"- `{s}`: {licences[s]['source']} (licence: {licences[s]['licence']})" if s in licences
             else f"- `{s}` (licence: see the source)" for s in report["calibration"]["sources"]]
    body = "\n".join([
        f"# {m['name']}: quantized by quantkit", "",
        f"Quantized variants of [{m['repo']}](https://huggingface.co/{m['repo']}) at revision `{m['commit'] or m['revision']}`."
        if m["repo"] else "Quantized variants of a local checkpoint (no Hub base model).", "",
        f"- llama.cpp: {report['toolchain']['version']} (commit `{report['toolchain']['llama_cpp']}`)",
        f"- quantkit {report['quantkit']}, recipe `{report['recipe']['name']}` (sha256 `{report['recipe']['sha256']}`)",
        f"- scores on held-out text `{report['evaluation']['file']}`, context {report['evaluation']['ctx']}; "
        "full report in `report.md` / `report.json`, plot in `plot.png`", "",
        "## Variants", "", *table, "",
        "## Calibration data", "", f"sha256 of the calibration text: `{report['calibration']['sha256']}`", "", *calib, "",
        "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")

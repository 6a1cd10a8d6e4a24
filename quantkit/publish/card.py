"""The model card of a published run: huggingface_hub's ModelCard over a rendered report.

Front matter (base_model, quantized_by, tags, eval results) from ModelCardData; the body names the
llama.cpp version, the recipe, and the calibration texts with their licences from calibration/README.md.
"""

from __future__ import annotations

import re

from quantkit.formats import FORMATS


def fenced(text: str, info: str = "") -> list[str]:
    """``text`` as a fenced code block whose fence no line of it can close: the recipe is a pull request's
    text (its comments too). CommonMark closes a backtick fence only with a run at least as long, so the
    fence is one backtick longer than the longest run inside (three at least)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, *text.rstrip().splitlines(), fence]


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
    from huggingface_hub import ModelCard, ModelCardData

    m, rows = report["model"], report["variants"]
    formats = sorted({r["format"] for r in rows if FORMATS[r["format"]].served})  # a format's name is its tag
    evals = _evals(report, rows)
    data = ModelCardData(base_model=m["repo"], base_model_relation="quantized" if m["repo"] else None,
                         quantized_by="quantkit", tags=[*formats, "quantized", "quantkit"],
                         library_name=next((f for f in formats if FORMATS[f].llama_cpp), None), model_name=f"{m['name']}-quantized",
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
        "## Variants", "", *table, "", *_mix_lines(report), *shard_lines(rows), *_projector_lines(report),
        "## Calibration data", "", f"sha256 of the calibration text: `{report['calibration']['sha256']}`", "", *calib, "",
        "## Recipe", "", *fenced(recipe_yaml, "yaml"), ""])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


PIPELINE_TAG = "text-generation"  # quantkit quantizes causal language models


def shard_lines(rows: list[dict]) -> list[str]:
    """The "Split files" section: each GGUF published as llama-gguf-split shards, shard by shard with its
    size and sha256, and the line that merges them (llama.cpp loads the first shard; Ollama needs one file)."""
    split = [r for r in rows if r.get("shards")]
    if not split:
        return []
    out = ["## Split files", "",
           "GGUFs over the per-file limit are published as llama-gguf-split shards. llama.cpp loads them by the "
           "first shard (`llama-server -m <first shard>`, or `-hf` from the Hub); Ollama cannot import shards, "
           "so merge them into one file first. The merged file has every tensor and metadata value of the "
           "original plus the `split.*` keys llama-gguf-split leaves (`split.count` 0), so its sha256 is not the "
           "manifest's; each shard's is below.", ""]
    for r in split:
        out += [f"**{r['label']}** (`{r['file']}`, {len(r['shards'])} shards): "
                f"`{r['serve'].get('merge') or ''}`", "", "| shard | bytes | sha256 |", "|---|---|---|"]
        out += [f"| `{s['file']}` | {s['size']} | `{s['sha256']}` |" for s in r["shards"]]
        out.append("")
    return out


def _projector_lines(report: dict) -> list[str]:
    from quantkit.publish.markdown import projector_md

    lines = projector_md(report)
    return [*lines[1:], ""] if lines else []  # the section without report.md's leading blank line


def _mix_lines(report: dict) -> list[str]:
    """Which tensors got which type, for each size-budget variant (gguf.targets)."""
    from quantkit.publish.markdown import mix_md

    lines = mix_md(report)
    return [*lines[1:], ""] if lines else []


def _evals(report: dict, rows: list[dict]) -> list:
    from huggingface_hub import EvalResult

    out = []
    for r in rows:
        for metric, value, dataset in ([("perplexity", r["ppl"], report["evaluation"]["file"]),
                                        ("kl_divergence_mean", r["kld_mean"], report["evaluation"]["file"])]
                                       + [(_task_metric(report, t), s, (report.get("task_metrics") or {})
                                           .get(t, {}).get("task", t)) for t, s in r["tasks"].items()]):
            if value is not None and not (metric == "kl_divergence_mean" and r["is_base"]):
                out.append(EvalResult(task_type=PIPELINE_TAG, dataset_type=str(dataset), dataset_name=str(dataset),
                                      metric_type=metric, metric_value=value, metric_name=f"{r['label']} {metric}"))
    return out


def _task_metric(report: dict, column: str) -> str:
    """The metric a task column holds (an older report without ``task_metrics``: plain accuracy)."""
    metric = (report.get("task_metrics") or {}).get(column, {}).get("metric")
    return metric if metric and metric != "score" else "accuracy"


def _calibration_lines(report: dict, calibration_readme: str | None) -> list[str]:
    licences = calibration_licences(calibration_readme) if calibration_readme else {}
    return [f"- `{s}`: {licences[s]['source']} (licence: {licences[s]['licence']})" if s in licences
            else f"- `{s}` (licence: see the source)" for s in report["calibration"]["sources"]]


def render_repo_card(report: dict, *, repo, siblings: list, table: list[str], recipe_yaml: str,
                     commands: dict[str, dict[str, str]] | None = None, files: list[str] | None = None,
                     calibration_readme: str | None = None):
    """The card (README.md) of one format's Hub repo (``quantkit.publish.hublayout.HubRepo``), as a ModelCard.

    Front matter: ``base_model`` with ``base_model_relation: quantized`` (the Hub's model tree links a
    quantization through this card), ``library_name`` (gguf; transformers for GPTQ/AWQ, which load with
    ``from_pretrained``), ``pipeline_tag``, tags, the quantization settings and this repo's eval results.
    ``table``: the report's rows of this repo's variants (and the base, for reference); ``siblings``: the
    other repos of the release; ``commands``: per GGUF label, the ollama/llama-server lines that fetch it."""
    from huggingface_hub import ModelCard, ModelCardData

    m, fmt = report["model"], repo.format
    own = [r for r in report["variants"] if r["id"] in repo.variant_ids]
    title = FORMATS[fmt].title
    bits = sorted({s.get("bits") or s.get("w_bit") for s in repo.settings.values() if FORMATS[fmt].checkpoint})
    tags = [fmt, "quantized", "quantkit", *[f"{b}-bit" for b in bits if b]]
    data = ModelCardData(base_model=m["repo"], base_model_relation="quantized" if m["repo"] else None,
                         library_name=FORMATS[fmt].library, pipeline_tag=PIPELINE_TAG, quantized_by="quantkit", tags=tags,
                         model_name=repo.repo_id.split("/")[-1], eval_results=_evals(report, own) or None,
                         quantization={"method": fmt, "variants": repo.settings})
    base = (f"[{m['repo']}](https://huggingface.co/{m['repo']}) at revision `{m['commit'] or m['revision']}`"
            if m["repo"] else "a local checkpoint (no Hub base model)")
    others = [f"- {FORMATS[s.format].title}: [{s.repo_id}]({s.url})" for s in siblings if s.repo_id != repo.repo_id]
    body = [f"# {m['name']} {title}", "", f"{title} quantization of {base}, made by quantkit.", ""]
    if FORMATS[fmt].llama_cpp:
        body += ["## Use", "", "| variant | file | Ollama | llama.cpp |", "|---|---|---|---|"]
        for label, name in repo.ggufs.items():
            c = (commands or {}).get(label, {})
            shown = [f for f in (files or [name]) if f == name or f.startswith(name.removesuffix(".gguf") + "-000")]
            ollama = (f"`{c['ollama']}`" if c.get("ollama") else
                      f"merge first: `{c['merge']}`, then the `.Modelfile`" if c.get("merge") else "–")
            body.append(f"| {label} | {', '.join(f'`{f}`' for f in shown) or f'`{name}`'} | {ollama} | "
                        f"{'`' + c['llama_server'] + '`' if c.get('llama_server') else '–'} |")
        body += ["", ("Each GGUF carries the model's chat template; the `.Modelfile` next to it is the same "
                      "model for `ollama create` from a local download."), ""]
        body += _projector_lines(report)
    else:
        body += ["## Use", "", "```bash", f"vllm serve {repo.repo_id}", "```", "", "```python",
                 "from transformers import AutoModelForCausalLM, AutoTokenizer",
                 f'model = AutoModelForCausalLM.from_pretrained("{repo.repo_id}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo.repo_id}")', "```", "",
                 (f"transformers loads {title} checkpoints through GPTQModel and optimum "
                  "(`pip install gptqmodel optimum`)."), ""]
    body += ["## Quantization settings", "", "```yaml", *_yaml(repo.settings).splitlines(), "```", "",
             f"- llama.cpp: {report['toolchain']['version']} (commit `{report['toolchain']['llama_cpp']}`)"
             if FORMATS[fmt].llama_cpp else f"- method: {title} through GPTQModel (see the recipe below)",
             f"- quantkit {report['quantkit']}, recipe `{report['recipe']['name']}` (sha256 `{report['recipe']['sha256']}`)",
             (f"- scores on held-out text `{report['evaluation']['file']}`, context {report['evaluation']['ctx']}; "
              "the whole run's report (every format) in `report.md` / `report.json`, plot in `plot.png`"), "",
             "## Scores", "", *table, "", *_mix_lines({**report, "variants": own}), *shard_lines(own)]
    if others:
        body += ["## Other formats of this release", "", *others, ""]
    body += ["## Calibration data", "", f"sha256 of the calibration text: `{report['calibration']['sha256']}`", "",
             *_calibration_lines(report, calibration_readme), "",
             "## Recipe", "", *fenced(recipe_yaml, "yaml"), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)

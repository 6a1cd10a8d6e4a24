"""``report.md`` and the cards' sections: the report's rows as Markdown tables, one function per section."""

from __future__ import annotations

import math

from quantkit.hardware import GIB
from quantkit.formats import format_of
from quantkit.publish.modelfile import llama_server_command
from quantkit.publish.stats import BARE_SCORE, RTN_SEPARATION, pm


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
        mark = ("★" if r["recommended"] else "base" if r["is_base"] else "ext" if format_of(r).external else
                "ref" if r.get("reference") else "")
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
           + ("; ref = round-to-nearest reference, not published (see Against round-to-nearest)"
              if any(_rtn(r) for r in report["variants"]) else "")
           + ("; ext = another publisher's file, never published (see Other publishers' files)"
              if any(format_of(r).external for r in report["variants"]) else "") + ".", ""]
    for caveat in report.get("caveats") or []:
        out += [f"> **Read this first.** {caveat}", ""]
    out += ["## Variants", ""]
    out += variants_table(report)
    out += sets_md(report)
    out += serving_md(report)
    out += _tasks_md(report)
    out += _rtn_md(report)
    out += external_md(report)
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
            kld = "–" if sc["kld_mean"] is None else pm(sc["kld_mean"], sc["kld_mean_err"])
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
                 _yes(s.get("template_matches")), _tool_cell(s), _vllm_cell(s),
                 _f(s.get("tokens_per_s"), ".1f"), verdict.replace("|", "/")]
        out.append("| " + " | ".join(cells) + " |")
    if images := [(r["id"], r["serving"]["image"]) for r in rows if r["serving"].get("image", "n/a") != "n/a"]:
        out += ["", "*Image* (llama-server with the vision projector: a chat with a small test image is answered and "
                "the image adds tokens to its prompt): " + ", ".join(f"{vid} {img}" for vid, img in images)]
    return out


def _vllm_cell(serving: dict) -> str:
    """yes/no/not checked, with the vLLM that said it."""
    said, version = serving.get("vllm", "not checked"), serving.get("vllm_version")
    return (f"{said} ({version})" if version and said == "yes" else said).replace("|", "/")


def _tool_cell(serving: dict) -> str:
    """yes/no/n/a, with how it was decided (quantkit.serving: a forced call, plain text, a refused call...)."""
    said, detail = serving.get("tool_call", "n/a"), serving.get("tool_detail")
    if not detail or detail == "n/a" or said == "n/a":
        return said
    return f"{said} ({detail})".replace("|", "/")


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


def _rtn(row: dict) -> bool:
    return bool(row.get("reference")) and not format_of(row).external


def external_md(report: dict) -> list[str]:
    """Other publishers' files (``compare:``) against the run's nearest GGUF of equal or smaller size."""
    comparisons = report.get("external_comparisons") or []
    if not comparisons:
        return []
    out = ["", "## Other publishers' files", "",
           "Each file listed under `compare:` was checked to be a GGUF of the same base model (architecture, "
           "layers, width and vocabulary), scored on every evaluation set against the same base logits, and is "
           "compared here with the run's GGUF of equal or smaller size closest to it: the difference of mean KLD "
           "(external − ours) over the set's chunks, paired chunk by chunk, ± its standard error; it counts only "
           "beyond 3 standard errors. External files are never published or recommended.", "",
           "| external | size MiB | compared with | size MiB | set | external − ours, mean KLD | chunks | verdict |",
           "|---|---:|---|---:|---|---:|---:|---|"]
    for c in comparisons:
        diff = (f"{c['diff']:+.5f} ± {c['se']:.5f}" + (f" ({c['diff'] / c['se']:+.1f} SE)" if c["se"] else "")
                if c["diff"] is not None else "–")
        ours = c["ours"] + (" (every variant of the run is larger)" if c["larger"] else "")
        verdict = f"**{c['verdict']}**" if c["verdict"].startswith("external ") else c["verdict"]
        out.append(f"| {c['external']} | {c['external_bytes'] / 2**20:.2f} | {ours} | {c['ours_bytes'] / 2**20:.2f} | "
                   f"{c['set']} | {diff} | {c['chunks']} | {verdict} |")
    return out


def _rtn_md(report: dict) -> list[str]:
    refs = [r for r in report["variants"] if _rtn(r)]
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
        out.append(f"- `{c['id']}` {said[c['verdict']]} `{c['rtn']}`{on}: mean KLD {pm(c['kld_mean'], c['kld_mean_err'])}"
                   f" vs {pm(c['rtn_kld_mean'], c['rtn_kld_mean_err'])} (RTN − it = {c['difference']:+.5f}{sigmas}"
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
        # One-sided normal confidence that a failed check is a real shortfall (3 SE: 99.87 %).
        conf = 100 * 0.5 * (1 + math.erf(z / math.sqrt(2)))
        out += [f"Each check's bounds lie {z:g} standard errors (paired over the items where both sides scored the "
                f"same ones) either side of its estimate: it fails when both are on the wrong side of the limit "
                f"(a shortfall at {conf:.2f} % one-sided confidence), "
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
        if uncovered := mix.get("uncovered_experts"):  # unmeasured experts priced as their layer's routed ones
            out.append(f"Experts the importance matrix left under-covered: {uncovered['note']}")
        out += ["", "Types per tensor (llama-quantize `--tensor-type-file` "
                f"`{mix.get('file')}`, kept beside the GGUF):", "", "| tensor | type | layers |", "|---|---|---|"]
        out += [f"| {row['tensor']} | {row['type']} | {row['layers']} |" for row in mix["summary"]]
    return out


def task_header(report: dict, column: str) -> str:
    """A task column's heading: the task and the metric its numbers are."""
    meta = (report.get("task_metrics") or {}).get(column)
    return f"{meta['task']} ({meta['metric']})" if meta and meta["metric"] != BARE_SCORE else column

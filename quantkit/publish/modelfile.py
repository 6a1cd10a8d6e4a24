"""How to run each variant: Ollama Modelfiles and llama-server / vLLM command lines.

Ollama templates are Go templates, HF chat templates are Jinja; there is no general
translation. The shapes most chat models use are recognised by their markers and written
as the template Ollama itself ships for that family (ollama/ollama ``template/*.gotmpl``):
ChatML, Llama-3, Gemma, Mistral (v3 tokenizer: ``[INST] …[/INST]``) and Phi-3. Anything else
gets no TEMPLATE at all: ``ollama create`` then takes the template from the GGUF's own
``tokenizer.chat_template`` (matching it to the templates it ships), which a TEMPLATE line
would override. Every GGUF must therefore carry the checkpoint's chat template
(``quantkit.publish.release.check_chat_templates``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from quantkit.errors import PublishError

# Ollama's template/chatml.gotmpl and llama3-instruct.gotmpl (the .Messages forms).
CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

LLAMA3_TEMPLATE = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

# ollama/ollama template/gemma-instruct.gotmpl @ 41f885f2: Gemma has no system role, so system
# messages are folded into the next user turn (Gemma's Jinja raises on them instead).
GEMMA_TEMPLATE = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}
{{- if not $system }}{{ $system = .Content }}
{{- else }}{{ $system = printf "%s\\n\\n%s" $system .Content }}
{{- end }}
{{- continue }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{- if $system }}
{{ $system }}
{{- $system = "" }}
{{- end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{- end }}
{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
"""

# ollama/ollama template/mistral-instruct.gotmpl @ 75d1b796.
MISTRAL_TEMPLATE = """[INST] {{ range $index, $_ := .Messages }}
{{- if eq .Role "system" }}{{ .Content }}

{{ else if eq .Role "user" }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>[INST] {{ end }}
{{- end }}"""

# ollama/ollama template/phi-3.gotmpl @ c3b52859.
PHI3_TEMPLATE = """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""


@dataclass(frozen=True)
class OllamaTemplate:
    shape: str  # "chatml", "llama3", "gemma", "mistral", "phi3"; "embedded" or "none": no TEMPLATE written
    template: str | None
    stop: tuple[str, ...]
    system: str | None = None  # a default system prompt the Jinja template hard-codes


# The Mistral shape of tokenizer v3 (Mistral-7B-Instruct-v0.3, Mixtral-8x22B, Codestral): "[/INST]" right after
# the user's text. v1 templates (v0.1/v0.2) write " [/INST]" with a space, which Ollama's template would not
# reproduce token for token; they are left to the GGUF's own template.
_MISTRAL_V3 = re.compile(r"""["']\[/INST\]["']""")


def ollama_template(chat_template: str | None, *, eos_token: str | None = None) -> OllamaTemplate:
    """The Ollama template for an HF chat template, recognised by its markers; shape "embedded" (an
    unrecognised template, left to the GGUF) or "none" (no chat template) when there is none to write."""
    t = chat_template or ""
    if "<|im_start|>" in t and "<|im_end|>" in t:
        return OllamaTemplate("chatml", CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"), _chatml_default_system(t))
    if "<|start_header_id|>" in t and "<|eot_id|>" in t:
        return OllamaTemplate("llama3", LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    if "<start_of_turn>" in t and "<end_of_turn>" in t:
        # ollama/ollama template/gemma-instruct.json
        return OllamaTemplate("gemma", GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"))
    if all(m in t for m in ("<|user|>", "<|assistant|>", "<|end|>")):
        # ollama/ollama template/phi-3.json
        return OllamaTemplate("phi3", PHI3_TEMPLATE, ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>"))
    if "[INST]" in t and "<<SYS>>" not in t and _MISTRAL_V3.search(t):
        return OllamaTemplate("mistral", MISTRAL_TEMPLATE, ("[INST]", "[/INST]"))
    return OllamaTemplate("embedded" if t.strip() else "none", None, ())


def _chatml_default_system(t: str) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (SmolLM2, Qwen2.5)."""
    m = re.search(r"<\|im_start\|>system\s*\n(.+?)<\|im_end\|>", t, re.S)
    if not m or "{{" in m.group(1) or "+" in m.group(1):
        return None
    return m.group(1).strip().replace("\\n", "\n") or None


SHAPE_NAMES = {"chatml": "ChatML", "llama3": "Llama-3", "gemma": "Gemma", "mistral": "Mistral (v3)", "phi3": "Phi-3"}


def render_modelfile(gguf_file: str, chat_template: str | None, *, num_ctx: int,
                     eos_token: str | None = None, shards: list[str] | None = None,
                     projector: str | None = None) -> str:
    """``shards``: the files ``gguf_file`` is published as (llama-gguf-split); Ollama cannot import
    shards, so the Modelfile says how to merge them into ``gguf_file`` first. ``projector``: a VLM's
    mmproj file, a second FROM (``ollama create`` stores a GGUF of architecture ``clip`` as the model's
    projector layer, ``application/vnd.ollama.image.projector``)."""
    tpl = ollama_template(chat_template, eos_token=eos_token)
    lines = [f"# Ollama Modelfile written by quantkit. Use: ollama create NAME -f {modelfile_name(gguf_file)}"]
    if shards:
        lines += [f"# {gguf_file} is published as {len(shards)} shards, which Ollama cannot import: merge them first",
                  f"#   {merge_command(shards[0], gguf_file)}"]
    lines += [f"FROM {modelfile_quote('./' + gguf_file)}"]
    if projector:
        lines += ["# The vision projector, downloaded beside the GGUF: Ollama loads it with the model for images.",
                  f"FROM {modelfile_quote('./' + projector)}"]
    lines.append("")
    if tpl.template is None:
        known = ", ".join(SHAPE_NAMES.values())
        if tpl.shape == "embedded":
            lines += ["# No TEMPLATE: the model's chat template is none of the shapes quantkit converts",
                      f"# ({known}), and a TEMPLATE line would override the one Ollama takes from the GGUF's own",
                      "# tokenizer.chat_template. Check `ollama show NAME --template` after `ollama create`."]
        else:
            lines += ["# No TEMPLATE: the checkpoint has no chat template (a base model), so Ollama sends the",
                      "# prompt as it is."]
    else:
        lines.append(f"# TEMPLATE: Ollama's {SHAPE_NAMES[tpl.shape]} template, matching the model's Jinja chat template.")
        lines.append(f"TEMPLATE {modelfile_quote(tpl.template, block=True)}")
        if tpl.system:
            lines.append(f"SYSTEM {modelfile_quote(tpl.system, block=True)}")
    lines += [f"PARAMETER stop {modelfile_quote(s)}" for s in tpl.stop]
    lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    return "\n".join(lines) + "\n"


def modelfile_quote(value: str, *, block: bool = False) -> str:
    """One Modelfile value, quoted so that nothing in it is read as Modelfile syntax.

    Ollama's parser (parser/parser.go) has no escapes: a value ends at the first line end where the text so
    far, stripped, is a whole quoted value (in double quotes, or in triple quotes with six characters at
    least), and its outer quotes are taken off: a quote at either end of a triple-quoted value is kept. A
    one-line value without a quote goes in double quotes; a ``block`` (a template, a system prompt) or any
    other value in triple quotes; and a value holding a triple quote (a chat template comes from the model
    folder, a pull request's text) is refused: a line of it ending in one would end the value there and make
    the rest commands of the file."""
    if not block and not any(c in value for c in '"\r\n'):
        return f'"{value}"'
    if '"""' in value:
        raise PublishError('the model\'s chat template puts """ in a Modelfile value, which a Modelfile cannot '
                           "quote; not published (remove it from the template's system prompt)")
    return f'"""{value}"""'


def modelfile_name(gguf_file: str) -> str:
    return gguf_file.removesuffix(".gguf") + ".Modelfile"


def llama_server_command(gguf_file: str, *, ctx: int, gpu: bool = True) -> str:
    cmd = ["llama-server", "-m", gguf_file, "-c", str(ctx), "--port", "8080"]
    if gpu:
        cmd += ["-ngl", "999"]
    return shlex.join(cmd)


def merge_command(first_shard: str, merged: str) -> str:
    """How a user rebuilds one GGUF from its llama-gguf-split shards (Ollama cannot import shards)."""
    return shlex.join(["llama-gguf-split", "--merge", first_shard, merged])


def vllm_serve_command(folder: str, *, fmt: str, ctx: int) -> str:
    # vLLM reads the method (GPTQ or AWQ) from the checkpoint's quantization_config and picks the
    # fastest kernel the GPU supports (Marlin where it can), so the command does not name it.
    from quantkit.formats import FORMATS

    if fmt not in FORMATS or not FORMATS[fmt].checkpoint:
        raise ValueError(f"vLLM serve commands are written for gptq and awq checkpoints, not {fmt!r}")
    return shlex.join(["vllm", "serve", f"./{folder}", "--max-model-len", str(ctx)])

"""How to run each variant: Ollama Modelfiles and llama-server / vLLM command lines.

Ollama templates are Go templates, HF chat templates are Jinja; there is no general
translation. The two shapes most chat models use (ChatML, Llama-3 headers) are
recognised by their markers and written as Ollama's own templates for them; anything
else gets a plain prompt template with a comment saying so.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

LLAMA3_TEMPLATE = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

PLAIN_TEMPLATE = """{{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }}"""


@dataclass(frozen=True)
class OllamaTemplate:
    shape: str  # "chatml", "llama3" or "plain"
    template: str
    stop: tuple[str, ...]
    system: str | None = None  # a default system prompt the Jinja template hard-codes


def ollama_template(chat_template: str | None, *, eos_token: str | None = None) -> OllamaTemplate:
    """The Ollama template for an HF chat template, recognised by its markers."""
    t = chat_template or ""
    if "<|im_start|>" in t and "<|im_end|>" in t:
        return OllamaTemplate("chatml", CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"), _chatml_default_system(t))
    if "<|start_header_id|>" in t and "<|eot_id|>" in t:
        return OllamaTemplate("llama3", LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    return OllamaTemplate("plain", PLAIN_TEMPLATE, (eos_token,) if eos_token else ())


def _chatml_default_system(t: str) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (SmolLM2, Qwen2.5)."""
    m = re.search(r"<\|im_start\|>system\s*\n(.+?)<\|im_end\|>", t, re.S)
    if not m or "{{" in m.group(1) or "+" in m.group(1):
        return None
    return m.group(1).strip().replace("\\n", "\n") or None


def render_modelfile(gguf_file: str, chat_template: str | None, *, num_ctx: int,
                     eos_token: str | None = None) -> str:
    tpl = ollama_template(chat_template, eos_token=eos_token)
    lines = [f"# Ollama Modelfile written by quantkit. Use: ollama create NAME -f {modelfile_name(gguf_file)}",
             f"FROM ./{gguf_file}", ""]
    if tpl.shape == "plain":
        lines += ["# The model's chat template is neither ChatML nor Llama-3, so it was not converted: this is",
                  "# a plain completion template. For chat, write TEMPLATE by hand from the model's chat_template."]
    else:
        lines.append(f"# TEMPLATE: Ollama's {tpl.shape} template, matching the model's Jinja chat template.")
    for part in (tpl.template, tpl.system or ""):
        if '"""' in part:
            raise ValueError('a template or system prompt contains """, which a Modelfile cannot quote')
    lines.append(f'TEMPLATE """{tpl.template}"""')
    if tpl.system:
        lines.append(f'SYSTEM """{tpl.system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in tpl.stop]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def modelfile_name(gguf_file: str) -> str:
    return gguf_file.removesuffix(".gguf") + ".Modelfile"


def llama_server_command(gguf_file: str, *, ctx: int, gpu: bool = True) -> str:
    cmd = ["llama-server", "-m", gguf_file, "-c", str(ctx), "--port", "8080"]
    if gpu:
        cmd += ["-ngl", "999"]
    return shlex.join(cmd)


def vllm_serve_command(folder: str, *, fmt: str, ctx: int) -> str:
    # vLLM reads the method (GPTQ or AWQ) from the checkpoint's quantization_config and picks the
    # fastest kernel the GPU supports (Marlin where it can), so the command does not name it.
    if fmt not in ("gptq", "awq"):
        raise ValueError(f"vLLM serve commands are written for gptq and awq checkpoints, not {fmt!r}")
    return shlex.join(["vllm", "serve", f"./{folder}", "--max-model-len", str(ctx)])

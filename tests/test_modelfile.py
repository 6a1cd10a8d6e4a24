"""Ollama Modelfiles from real chat templates, and the chat template every GGUF must carry."""

from __future__ import annotations

from pathlib import Path

import pytest
from ggufbytes import write_header_gguf
from jinja2.sandbox import ImmutableSandboxedEnvironment

from quantkit.errors import PublishError
from quantkit.ggufinfo import chat_template as gguf_chat_template
from quantkit.publish import release as pub
from quantkit.publish.modelfile import (
    GEMMA_TEMPLATE,
    MISTRAL_TEMPLATE,
    PHI3_TEMPLATE,
    modelfile_quote,
    ollama_template,
    render_modelfile,
)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"  # sources: README.md there

# The conversation of Ollama's template tests (template/template_test.go), and what Ollama's own
# gemma-instruct, mistral-instruct and phi-3 templates make of it
# (ollama/ollama template/testdata/<name>.gotmpl/user-assistant-user).
CONVERSATION = [{"role": "user", "content": "Hello, how are you?"},
                {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
                {"role": "user", "content": "I'd like to show off how chat templating works!"}]
OLLAMA_RENDERS = {
    "gemma": ("<start_of_turn>user\nHello, how are you?<end_of_turn>\n<start_of_turn>model\nI'm doing great. How can "
              "I help you today?<end_of_turn>\n<start_of_turn>user\nI'd like to show off how chat templating works!"
              "<end_of_turn>\n<start_of_turn>model\n"),
    "mistral": ("[INST] Hello, how are you?[/INST] I'm doing great. How can I help you today?</s>[INST] I'd like to "
                "show off how chat templating works![/INST]"),
    "phi3": ("<|user|>\nHello, how are you?<|end|>\n<|assistant|>\nI'm doing great. How can I help you today?<|end|>\n"
             "<|user|>\nI'd like to show off how chat templating works!<|end|>\n<|assistant|>\n"),
}
MODELS = {"gemma": ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>"),
          "mistral": ("mistralai-Mistral-7B-Instruct-v0.3.jinja", "<s>", "</s>"),
          "phi3": ("microsoft-Phi-3-mini-4k-instruct.jinja", "<s>", "<|endoftext|>")}


def hf_render(template: str, messages: list[dict], *, bos: str, eos: str) -> str:
    """What transformers' apply_chat_template(tokenize=False, add_generation_prompt=True) renders."""
    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                            add_generation_prompt=True)


@pytest.mark.parametrize("shape", sorted(MODELS))
def test_real_templates_are_recognised_as_the_ollama_shape_that_renders_the_same(shape):
    file, bos, eos = MODELS[shape]
    jinja = (TEMPLATES / file).read_text()
    assert ollama_template(jinja).shape == shape
    # The model's own template and Ollama's template for that family give the same prompt
    # (BOS aside: llama.cpp adds it from the GGUF's tokenizer.ggml.add_bos_token).
    assert hf_render(jinja, CONVERSATION, bos=bos, eos=eos).removeprefix(bos) == OLLAMA_RENDERS[shape]


def test_modelfiles_for_gemma_mistral_phi3():
    gemma = render_modelfile("g.gguf", (TEMPLATES / MODELS["gemma"][0]).read_text(), num_ctx=8192)
    assert f'TEMPLATE """{GEMMA_TEMPLATE}"""' in gemma
    assert 'PARAMETER stop "<start_of_turn>"\nPARAMETER stop "<end_of_turn>"\n' in gemma
    assert "# TEMPLATE: Ollama's Gemma template, matching the model's Jinja chat template." in gemma
    mistral = render_modelfile("m.gguf", (TEMPLATES / MODELS["mistral"][0]).read_text(), num_ctx=8192)
    assert f'TEMPLATE """{MISTRAL_TEMPLATE}"""' in mistral and 'PARAMETER stop "[INST]"' in mistral
    phi3 = render_modelfile("p.gguf", (TEMPLATES / MODELS["phi3"][0]).read_text(), num_ctx=4096)
    assert f'TEMPLATE """{PHI3_TEMPLATE}"""' in phi3 and 'PARAMETER stop "<|end|>"' in phi3


LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
          "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + "
          "'[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
          "content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# Mistral-7B-Instruct-v0.1/v0.2 (tokenizer v1): " [/INST]" with a space, which Ollama's template does not write.
MISTRAL_V1 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
              "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
              "eos_token}}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template", [LLAMA2, MISTRAL_V1, "{{ messages[0]['content'] }}"])
def test_an_unconverted_template_writes_no_template(template):
    """Ollama would otherwise use the TEMPLATE over the GGUF's own chat template."""
    assert ollama_template(template).shape == "embedded"
    text = render_modelfile("m.gguf", template, num_ctx=2048, eos_token="</s>")
    assert "TEMPLATE \"\"\"" not in text and "PARAMETER stop" not in text
    assert text.splitlines()[3:6] == [
        "# No TEMPLATE: the model's chat template is none of the shapes quantkit converts",
        "# (ChatML, Llama-3, Gemma, Mistral (v3), Phi-3), and a TEMPLATE line would override the one Ollama takes "
        "from the GGUF's own",
        "# tokenizer.chat_template. Check `ollama show NAME --template` after `ollama create`."]


def test_no_chat_template_writes_no_template():
    text = render_modelfile("m.gguf", None, num_ctx=2048)
    assert "TEMPLATE \"\"\"" not in text and "has no chat template (a base model)" in text


# --- every GGUF carries the checkpoint's chat template --------------------------------------------

def _manifest(files: list[str]) -> dict:
    return {"schema": 2, "variants": [{"format": "gguf", "label": f, "file": f} for f in files]
            + [{"format": "gptq", "label": "g", "file": "gptq-folder"}]}


def test_gguf_chat_template_is_read_back(tmp_path):
    jinja = (TEMPLATES / MODELS["gemma"][0]).read_text()
    assert gguf_chat_template(write_header_gguf(tmp_path / "a.gguf", chat_template=jinja)) == jinja
    assert gguf_chat_template(write_header_gguf(tmp_path / "b.gguf")) is None


def test_publish_refuses_a_gguf_without_the_checkpoints_chat_template(tmp_path):
    jinja = (TEMPLATES / MODELS["phi3"][0]).read_text()
    write_header_gguf(tmp_path / "m-Q8_0.gguf", chat_template=jinja)
    write_header_gguf(tmp_path / "m-Q4_K_M.gguf")
    with pytest.raises(PublishError) as e:
        pub.check_chat_templates(run_dir=tmp_path, manifest=_manifest(["m-Q8_0.gguf", "m-Q4_K_M.gguf"]),
                                 chat_template=jinja)
    assert str(e.value).startswith("m-Q4_K_M.gguf lack tokenizer.chat_template although the checkpoint has one")
    # A checkpoint without a chat template asks nothing of its GGUFs.
    pub.check_chat_templates(run_dir=tmp_path, manifest=_manifest(["m-Q4_K_M.gguf"]), chat_template=None)
    pub.check_chat_templates(run_dir=tmp_path, manifest=_manifest(["m-Q8_0.gguf"]), chat_template=jinja)


def test_the_phi3_template_llama_cpp_ships_in_a_real_gguf():
    """llama.cpp's own Phi-3 vocabulary GGUF (models/ggml-vocab-phi-3.gguf of the pinned tree) carries the older
    Phi-3 template (user turns that open the assistant's); it is the same shape and renders the same prompt."""
    from quantkit.errors import ToolchainError
    from quantkit.toolchain import find_toolchain

    try:
        gguf = find_toolchain().src / "models" / "ggml-vocab-phi-3.gguf"
    except ToolchainError:
        pytest.skip("the pinned llama.cpp is not built (quantkit toolchain --build)")
    if not gguf.is_file():
        pytest.skip(f"{gguf} is not in this llama.cpp tree")
    jinja = gguf_chat_template(gguf)
    assert ollama_template(jinja).shape == "phi3"
    assert hf_render(jinja, CONVERSATION, bos="<s>", eos="<|endoftext|>").removeprefix("<s>") == OLLAMA_RENDERS["phi3"]


# --- Modelfile values read back as Ollama reads them ----------------------------------------------------

def _complete(value: str) -> bool:
    """Ollama (parser/parser.go) ends a command's value at the first line end where the text so far, stripped,
    is complete: six or more characters in triple quotes, two or more in double quotes, or not quoted at all.
    Nothing is escaped: the quotes are taken off, and the rest is the value."""
    if value.startswith('"""'):
        return len(value) >= 6 and value.endswith('"""')
    if value.startswith('"'):
        return len(value) >= 2 and value.endswith('"')
    return True


def ollama_commands(modelfile: str) -> list[tuple[str, str]]:
    """``(command, value)`` for each command of ``modelfile`` (PARAMETER's by the parameter's name)."""
    lines, out = iter(modelfile.splitlines()), []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if name.upper() == "PARAMETER":
            name, _, value = value.partition(" ")
        while not _complete(value.strip()):
            value += "\n" + next(lines)  # StopIteration: a value never closed
        value = value.strip()
        quotes = 3 if value.startswith('"""') else 1 if value.startswith('"') else 0
        out.append((name.lower(), value[quotes:len(value) - quotes]))
    return out


@pytest.mark.parametrize("value", ['a"', '"', '""', 'say "hi"', '"quoted"', "<|im_end|>", "a b", "#x", ""])
def test_a_stop_string_reads_back_as_itself(value):
    """Quotes at either end too: Ollama closes a triple-quoted value only at a line end, on the whole line."""
    text = f"FROM ./m.gguf\nPARAMETER stop {modelfile_quote(value)}\nPARAMETER num_ctx 8\n"
    assert ollama_commands(text) == [("from", "./m.gguf"), ("stop", value), ("num_ctx", "8")]


def test_every_short_value_reads_back_or_is_refused():
    """Every value of up to five characters from a, a quote, a space and a line end: the Modelfile holds it as it
    is, or quantkit refuses it; only a triple quote, which could end the value and start a command, is refused."""
    import itertools

    for n in range(6):
        for chars in itertools.product('a" \n', repeat=n):
            value = "".join(chars)
            for block in (False, True):
                if '"""' in value:
                    with pytest.raises(PublishError, match='puts """ in a Modelfile value'):
                        modelfile_quote(value, block=block)
                    continue
                text = f"FROM ./m.gguf\nSYSTEM {modelfile_quote(value, block=block)}\nPARAMETER num_ctx 8\n"
                assert ollama_commands(text) == [("from", "./m.gguf"), ("system", value), ("num_ctx", "8")], value


def test_a_triple_quote_in_a_template_is_refused_not_written():
    """A line ending in three quotes would end the TEMPLATE there and make the rest commands of the file."""
    template = '{{ .Prompt }}"""\nFROM /etc/passwd\n'
    with pytest.raises(PublishError, match='puts """ in a Modelfile value'):
        modelfile_quote(template, block=True)
    assert ollama_commands(f'TEMPLATE """{template}"""')[:2] == [("template", "{{ .Prompt }}"), ("from", "/etc/passwd")]


def test_a_rendered_modelfile_reads_back_as_its_commands():
    gemma = render_modelfile("g.gguf", (TEMPLATES / MODELS["gemma"][0]).read_text(), num_ctx=8192)
    assert ollama_commands(gemma) == [("from", "./g.gguf"), ("template", GEMMA_TEMPLATE),
                                      ("stop", "<start_of_turn>"), ("stop", "<end_of_turn>"), ("num_ctx", "8192")]

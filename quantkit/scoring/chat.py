"""Chat evaluation sets: conversations rendered through the checkpoint's chat template (issue #26).

A chat set is a JSONL file, one conversation per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "tool_calls": [...]}, {"role": "tool", ...}],
     "tools": [{"type": "function", "function": {...}}]}

Each conversation is rendered with transformers' ``apply_chat_template`` (the template runs in Jinja's
``ImmutableSandboxedEnvironment``, as transformers always does; the conversations are its variables, never
template text) and tokenized with special tokens parsed, so ``<|im_start|>`` is one token, as a chat user's
prompt is. The conversations are joined into one stream and cut into llama-perplexity's windows.

llama-perplexity cannot score such a stream itself: it tokenizes ``-f`` text without parsing special tokens
(``common_tokenize(ctx, text, true)`` in tools/perplexity/perplexity.cpp, pinned commit: ``parse_special``
defaults to false). So the reference log-probs are the HF checkpoint's, in float32 torch, written in
llama-perplexity's own ``--kl-divergence-base`` format (``quantkit.scoring.hf.write_base_logits``); every GGUF is then scored by
``llama-perplexity --kl-divergence`` on exactly those tokens, and every torch checkpoint on the same windows.
On a chat set the F16 GGUF is therefore a variant too: its KLD is the conversion's own loss.

A conversation that uses tools (``tools``, ``tool_calls`` or a ``tool`` message) is rendered only when the
template mentions tools; otherwise it is left out and counted (``ChatTokens.skipped_tools``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from quantkit.errors import VerificationError
from quantkit.scoring.windows import max_chunks, scored_per_chunk

log = logging.getLogger(__name__)

RENDER_VERSION = 1  # part of the store keys: a change to how conversations are rendered re-scores
ROLES = ("system", "user", "assistant", "tool")
MAX_LINE_BYTES = 256 * 1024
MAX_MESSAGES = 64


class ChatSetError(ValueError):
    """A chat set file that is not conversations; ``line`` is the JSONL line (1-based)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line, self.message = line, message


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    tools: tuple[dict, ...] = ()

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in self.messages)

    def texts(self) -> list[str]:
        """Every message's text (for the overlap check against calibration text)."""
        return [m["content"] for m in self.messages if isinstance(m.get("content"), str)]


def _check_tool_call(call, line: int) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), dict):
        raise ChatSetError(line, "a tool call is {\"type\": \"function\", \"function\": {\"name\": str, "
                                 "\"arguments\": {...}}}")
    return {"type": "function", "function": {"name": fn["name"], "arguments": fn["arguments"]}}


def parse_conversations(raw: bytes) -> list[Conversation]:
    """The conversations of a chat set file; ChatSetError names the first line that is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatSetError(raw[:e.start].count(b"\n") + 1, "not UTF-8") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise ChatSetError(n, f"longer than {MAX_LINE_BYTES} characters")
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ChatSetError(n, f"not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or set(obj) - {"messages", "tools"} or not isinstance(obj.get("messages"), list):
            raise ChatSetError(n, "each line is {\"messages\": [...]} with an optional \"tools\": [...], nothing else")
        msgs = obj["messages"]
        if not 1 <= len(msgs) <= MAX_MESSAGES:
            raise ChatSetError(n, f"a conversation has 1 to {MAX_MESSAGES} messages")
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or set(m) - {"role", "content", "tool_calls"}:
                raise ChatSetError(n, f"a message is {{\"role\": one of {', '.join(ROLES)}, \"content\": str}} "
                                      "(assistant messages may add \"tool_calls\")")
            if not isinstance(m.get("content", ""), str):
                raise ChatSetError(n, "a message's content is a string")
            c = {"role": m["role"], "content": m.get("content", "")}
            if "tool_calls" in m:
                if m["role"] != "assistant" or not isinstance(m["tool_calls"], list):
                    raise ChatSetError(n, "only assistant messages carry tool_calls, as a list")
                c["tool_calls"] = [_check_tool_call(t, n) for t in m["tool_calls"]]
            clean.append(c)
        tools = obj.get("tools", [])
        if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function"
                                                  and isinstance(t.get("function"), dict) for t in tools):
            raise ChatSetError(n, "tools is a list of {\"type\": \"function\", \"function\": {...}}")
        out.append(Conversation(tuple(clean), tuple(tools)))
    if not out:
        raise ChatSetError(1, "the file holds no conversation")
    return out


@dataclass(frozen=True)
class ChatTokens:
    ids: tuple[int, ...]
    conversations: int  # rendered
    skipped_tools: int  # left out: they use tools and the template does not mention them


def _template_text(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) else json.dumps(t) if t else ""


def render_texts(tokenizer, conversations: list[Conversation]) -> tuple[list[str], int]:
    """Each conversation through the tokenizer's chat template (text), and how many were left out because they
    use tools and the template does not mention them."""
    template = _template_text(tokenizer)
    if not template:
        raise VerificationError("the checkpoint has no chat template: conversations cannot be rendered")
    tools_ok = "tool" in template
    texts, skipped = [], 0
    for conv in conversations:
        if conv.uses_tools and not tools_ok:
            skipped += 1
            continue
        texts.append(tokenizer.apply_chat_template(list(conv.messages), tools=list(conv.tools) or None,
                                                   tokenize=False))
    return texts, skipped


def render_tokens(tokenizer, conversations: list[Conversation]) -> ChatTokens:
    """The conversations through the tokenizer's chat template, tokenized with special tokens parsed, joined."""
    texts, skipped = render_texts(tokenizer, conversations)
    ids: list[int] = []
    for text in texts:
        # The template writes BOS itself where the model wants one: add nothing more.
        ids += tokenizer(text, add_special_tokens=False).input_ids
    return ChatTokens(tuple(ids), len(texts), skipped)


def chat_windows(ids: tuple[int, ...], spec, *, bos: int | None):
    """(n_chunks, ctx) windows of the joined stream, as llama-perplexity cuts them (BOS substituted when
    ``bos`` is given), and the raw ids of the windows (what the logits file stores)."""
    import torch

    n_chunks = min(max_chunks(spec), len(ids) // spec.ctx)
    if n_chunks < 1 or n_chunks * scored_per_chunk(spec.ctx) < 100:
        raise VerificationError(f"the chat set renders to {len(ids)} tokens: too few for windows of {spec.ctx} "
                                "with 100 scored tokens (llama-perplexity's minimum for KL statistics)")
    raw = torch.tensor(ids[: n_chunks * spec.ctx], dtype=torch.long).view(n_chunks, spec.ctx)
    windows = raw.clone()
    if bos is not None:
        windows[:, 0] = bos
    return windows, raw

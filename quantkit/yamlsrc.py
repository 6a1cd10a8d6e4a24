"""Load untrusted YAML into plain data plus a map from each value's path to its line.

Recipes arrive in pull requests, so the loader is stricter than yaml.safe_load:
no aliases (alias bombs), no duplicate keys, no non-string keys, UTF-8 only,
bounded size. Errors are Problems with a line number, never a YAML traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import Problem, RecipeError

MAX_BYTES = 256 * 1024
MAX_DEPTH = 12
MAX_NODES = 20_000

Path_ = tuple[str | int, ...]
# Explicit tags that only restate what a plain value is; any other (!function, !!python/..., !!binary) is refused.
PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Builder:
    def __init__(self, file: str, kind: str):
        self.file = file
        self.kind = kind
        self.lines: dict[Path_, int] = {}
        self.nodes = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node, path: Path_, message: str, fix: str) -> RecipeError:
        return RecipeError([Problem(self.file, node.start_mark.line + 1, dotted(path), message, fix)])

    def build(self, node: yaml.Node, path: Path_ = ()) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(node, path, f"{self.kind} has more than {MAX_NODES} values",
                            f"split or shorten the {self.kind}")
        if len(path) > MAX_DEPTH:
            raise self.fail(node, path, f"nesting deeper than {MAX_DEPTH} levels", f"flatten the {self.kind}")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise self.fail(key_node, path, f"YAML merge keys (<<) are not allowed in {self.kind}s", "write the values out")
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    raise self.fail(key_node, path, "keys must be plain strings", "quote the key or rename it")
                key = key_node.value
                if key in out:
                    first = self.lines.get(path + (key,), "?")
                    raise self.fail(key_node, path + (key,), f"duplicate key '{key}' (first set on line {first})",
                                    "keep one of the two")
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        try:
            return self.constructor.construct_object(node)
        except yaml.constructor.ConstructorError as e:
            raise self.fail(node, path, f"unsupported YAML value: {e.problem}", "use plain strings, numbers, lists and mappings") from None


def load_yaml(path: Path, display: str | None = None) -> tuple[Any, dict[Path_, int]]:
    """Parse ``path``; return (data, lines). ``display`` is the name used in errors."""
    name = display or str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError([Problem(name, 0, "", f"cannot read recipe: {e.strerror}", "check the path")]) from None
    return parse_yaml(raw, name)


def parse_yaml(raw: bytes, name: str, *, kind: str = "recipe") -> tuple[Any, dict[Path_, int]]:
    """``load_yaml`` of bytes already read (by a caller that opened the file its own way); ``kind``: what the
    file is, as its problems name it (a recipe, a task file)."""
    if len(raw) > MAX_BYTES:
        raise RecipeError([Problem(name, 1, "", f"{kind} is {len(raw)} bytes, over the {MAX_BYTES} limit",
                                   f"a {kind} is a short file; remove what does not belong")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError([Problem(name, line, "", f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                                   "save the file as UTF-8")]) from None
    try:
        # Events first, from PyYAML's parser, which keeps its own stack (no Python recursion): an
        # alias is refused before anything expands it, and depth and size are bounded before the
        # composer (which recurses once per level) sees the text.
        depth = nodes = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise RecipeError([Problem(name, line, "", f"YAML anchors and aliases are not allowed in {kind}s",
                                           "write the value out where it is used")])
            tag = getattr(event, "tag", None)
            if tag is not None and tag not in PLAIN_TAGS and not (tag == "!" and isinstance(event, yaml.ScalarEvent)):
                raise RecipeError([Problem(name, line, "", f"YAML tag '{tag}' is not allowed: the file is data, "
                                           "and a tag asks the reader to build (or run) something else",
                                           "remove the tag; write a plain string, number, list or mapping")])
            if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
                nodes += 1
                if nodes > MAX_NODES:
                    raise RecipeError([Problem(name, line, "", f"{kind} has more than {MAX_NODES} values",
                                               f"split or shorten the {kind}")])
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeError([Problem(name, line, "", f"nesting deeper than {MAX_DEPTH} levels",
                                               f"flatten the {kind}")])
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError([Problem(name, line, "", f"YAML syntax error: {e.problem}", "fix the YAML at that line")]) from None
    except yaml.YAMLError as e:
        raise RecipeError([Problem(name, 1, "", f"YAML error: {e}", "fix the YAML")]) from None
    if len(documents) != 1 or documents[0] is None:
        raise RecipeError([Problem(name, 1, "", f"expected one YAML document, found {len(documents)}",
                                   f"keep exactly one {kind} in the file")])
    builder = _Builder(name, kind)
    data = builder.build(documents[0])
    return data, builder.lines

"""Calibration text: the versioned files under calibration/, or a pinned Hub dataset."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import SourceError
from quantkit.nofollow import read_beneath
from quantkit.recipe import Calibration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationText:
    text: str
    sha256: str
    sources: tuple[str, ...]  # files, or "hub:name/config/split@revision"
    # the text holds conversations rendered through the chat template: its special-token text must become the
    # special tokens (llama-imatrix --parse-special; transformers' tokenizers parse them already)
    parse_special: bool = False

    def describe(self) -> dict:
        return {"sha256": self.sha256, "sources": list(self.sources), "chars": len(self.text),
                **({"parse_special": True} if self.parse_special else {})}


def load_calibration(spec: Calibration, *, root: Path, model_dir: Path | None = None,
                     trust_remote_code: bool = False) -> CalibrationText:
    """The calibration text; ``calibration.conversations`` are rendered through ``model_dir``'s chat template
    (quantkit.scoring.chat) and follow the plain text."""
    if spec.files:
        # never through a symlink (quantkit.nofollow): a link would make the worker read one of its own files
        parts = [read_beneath(root, f).decode("utf-8") for f in spec.files]
        sources = tuple(spec.files)
    else:
        parts, sources = _from_hub(spec), (f"hub:{spec.dataset.name}/{spec.dataset.config or ''}/"
                                           f"{spec.dataset.split}@{spec.dataset.revision}",)
    text = "\n\n".join(p.strip("\n") for p in parts) + "\n"
    if spec.conversations:
        if model_dir is None:
            raise SourceError("calibration.conversations are rendered with the model's chat template: no model given")
        text = interleave(text, _rendered(spec, root, model_dir, trust_remote_code))
        sources += tuple(f"chat:{f}" for f in spec.conversations)
    return CalibrationText(text, hashlib.sha256(text.encode()).hexdigest(), sources,
                           parse_special=bool(spec.conversations))


def interleave(text: str, conversations: list[str]) -> str:
    """The rendered conversations spread evenly between the text's paragraphs: llama-imatrix reads only the
    first ``chunks`` contexts, so conversations appended at the end would be cut with the text's tail."""
    paragraphs = text.rstrip("\n").split("\n\n")
    n, p = len(conversations), len(paragraphs)
    slots: dict[int, list[str]] = {}
    for i, conv in enumerate(conversations):
        slots.setdefault((i + 1) * p // (n + 1), []).append(conv.rstrip("\n"))
    out = []
    for j, para in enumerate(paragraphs):
        out += slots.get(j, [])
        out.append(para)
    out += slots.get(p, [])
    return "\n\n".join(out) + "\n"


def _rendered(spec: Calibration, root: Path, model_dir: Path, trust_remote_code: bool) -> list[str]:
    from transformers import AutoTokenizer

    from quantkit.scoring.chat import ChatSetError, parse_conversations, render_texts
    from quantkit.source import remote_code_allowed

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_allowed(trust_remote_code))
    out = []
    for f in spec.conversations:
        try:
            convs = parse_conversations(read_beneath(root, f))
        except ChatSetError as e:
            raise SourceError(f"{f}:{e.line}: {e.message}") from None
        texts, skipped = render_texts(tokenizer, convs)
        log.info("calibration: %d conversations of %s through the chat template (%d with tools left out)",
                 len(texts), f, skipped)
        out += texts
    return out


def _from_hub(spec: Calibration) -> list[str]:
    ds = spec.dataset
    try:
        import datasets
    except ImportError as e:
        raise SourceError("a Hub calibration dataset needs the 'datasets' package: pip install 'quantkit[hub]'") from e
    if Path(ds.name).exists():  # datasets would load this folder (or script) instead of the Hub repo
        raise SourceError(f"calibration dataset {ds.name} is also a path here; only a Hub repo id is loaded "
                          "(rename or remove the local folder)")
    try:
        rows = datasets.load_dataset(ds.name, ds.config, split=ds.split, revision=ds.revision)
    except Exception as e:  # datasets raises many types; the message names the cause
        raise SourceError(f"cannot load calibration dataset {ds.name}@{ds.revision}: {e}") from e
    if ds.column not in rows.column_names:
        raise SourceError(f"dataset {ds.name} has no column {ds.column!r} (columns: {rows.column_names})")
    return [r for r in rows[ds.column][: ds.max_rows] if isinstance(r, str) and r.strip()]

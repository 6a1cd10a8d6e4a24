"""Other publishers' GGUFs of the same base model (``compare:``, node ``external:<label>``).

A file inside the project is read without following a link (``quantkit.nofollow``); a Hub file is downloaded at
its pinned commit with huggingface_hub (the cache and token rules of the model download). Either is copied into
the store as ``model.gguf``, with its sha256 in the manifest, and checked against the run's base GGUF: the same
architecture, layer count and width, and the same vocabulary (the token list, byte for byte), without which
its KLD against the base's logits would mean nothing. A file of another model is refused, naming what differs.
It is then scored like the run's own GGUFs (every set, the same base logits) and never placed, published or
recommended: the report compares it with the nearest variant of equal or smaller size.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from quantkit.digest import DigestCache
from quantkit.errors import VerificationError
from quantkit.ggufinfo import GGUFInfo, array_sha256, read_gguf
from quantkit.nodes import gguf_file
from quantkit.nofollow import SymlinkError, open_beneath, sha256_of, symlink_on_path
from quantkit.recipe import CompareFile
from quantkit.source import hub_errors
from quantkit.store import Entry, Staging, Store

log = logging.getLogger(__name__)

STEP = "external"
OUTPUT = "model.gguf"
VOCABULARY = "tokenizer.ggml.tokens"


def where(spec: CompareFile) -> str:
    return f"{spec.repo}@{spec.revision[:12]}/{spec.file}" if spec.repo else spec.file


def external_inputs(spec: CompareFile, *, root: Path, base: Entry, digests: DigestCache) -> dict:
    """The key: the file (its content for a project file, its pinned Hub address otherwise) and the base it is
    checked against. A project file's digest is remembered by ``digests`` (a warm re-run reads no gigabytes);
    the copy into the store is checked against it."""
    if spec.repo:
        found = {"repo": spec.repo, "revision": spec.revision, "file": spec.file}
    else:
        if (link := symlink_on_path(root, spec.file)) is not None:
            raise SymlinkError(f"compare '{spec.label}': {link} is a symlink; quantkit follows no link in what a "
                               "recipe points at")
        found = {"sha256": digests.sha256(root / spec.file)}
    return {**found, "base_sha256": gguf_file(base)[1]}


def mismatch(theirs: GGUFInfo, path: Path, base: Path) -> str | None:
    """What makes ``path`` (its header ``theirs``) a GGUF of another model than ``base`` (None when nothing does)."""
    ours = read_gguf(base)
    if theirs.architecture != ours.architecture:
        return f"architecture {theirs.architecture}, the base's is {ours.architecture}"
    for key in (f"{ours.architecture}.block_count", f"{ours.architecture}.embedding_length"):
        if theirs.metadata.get(key) != ours.metadata.get(key):
            return f"{key} {theirs.metadata.get(key)}, the base's is {ours.metadata.get(key)}"
    if theirs.vocab_size != ours.vocab_size:
        return f"a vocabulary of {theirs.vocab_size} tokens, the base's has {ours.vocab_size}"
    if array_sha256(path, VOCABULARY) != array_sha256(base, VOCABULARY):
        return f"the same number of tokens ({ours.vocab_size}) but other tokens"
    return None


def fetch_external(spec: CompareFile, *, root: Path, base: Entry, store: Store, digests: DigestCache) -> Entry:
    inputs = external_inputs(spec, root=root, base=base, digests=digests)

    def produce(staging: Staging) -> None:
        out = staging.path / OUTPUT
        if spec.repo:
            shutil.copyfile(Path(_download(spec)).resolve(), out)  # the cache's snapshot entry links to its blob
        else:
            with open_beneath(root, spec.file) as f, open(out, "wb") as dst:
                copied = sha256_of(f, copy_to=dst)
            if copied != inputs["sha256"]:
                raise VerificationError(f"compare '{spec.label}': {spec.file} changed while it was read")
        info = read_gguf(out)
        if (why := mismatch(info, out, gguf_file(base)[0])) is not None:
            raise VerificationError(f"compare '{spec.label}' ({where(spec)}) has {why}: it is not a GGUF of this "
                                    "run's base model, so its KLD against the base's logits would mean nothing")
        staging.info.update(source=where(spec), gguf={"file_type": info.file_type, "parameters": info.parameters,
                                                      "tensor_types": info.tensor_types})

    entry = store.ensure(STEP, inputs, produce)
    log.info("compare %s: %s (%s, %.1f MiB)", spec.label, "reused" if entry.reused else "fetched and checked",
             where(spec), entry.files[OUTPUT].size / 2**20)
    return entry


def _download(spec: CompareFile) -> str:
    from huggingface_hub import hf_hub_download

    log.info("fetching %s", where(spec))
    with hub_errors(f"compare '{spec.label}': {where(spec)}", spec.repo):
        return hf_hub_download(repo_id=spec.repo, filename=spec.file, revision=spec.revision)


__all__ = ["STEP", "external_inputs", "fetch_external", "mismatch", "where"]

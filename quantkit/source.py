"""Step 1: the unquantized model, from a pinned Hub revision or a local folder.

Only safetensors weights, configs and tokenizer files are taken by default;
pickle weights (which can run code when loaded) only if the recipe allows them,
Python files only with trust_remote_code. huggingface_hub itself honours
HF_HOME, HF_HUB_OFFLINE and HF_TOKEN; quantkit never reads or logs the token.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from quantkit.digest import DigestCache, digest_of
from quantkit.errors import SourceError
from quantkit.nofollow import SymlinkError, symlink_on_path, symlinks_below
from quantkit.recipe import WORKER_ALLOWS_PICKLE, WORKER_ALLOWS_REMOTE_CODE, ModelSource
from quantkit.store import Entry, FileRecord

log = logging.getLogger(__name__)

SAFE_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "*.tiktoken",
)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
CODE_PATTERNS = ("*.py",)


@dataclass(frozen=True)
class ModelSnapshot:
    """A model folder pinned by content: what every later step's key starts from."""

    path: Path
    repo: str | None
    revision: str | None  # as the recipe wrote it
    commit: str | None  # what the revision resolved to on the Hub
    files: dict[str, str]  # relative path -> sha256 of the files quantkit uses
    digest: str
    trust_remote_code: bool = False  # the recipe asked; loaders pass remote_code_allowed(this) on

    def as_entry(self) -> Entry:
        """The source folder in the shape of a step output, so the HF base sits in the same tables as
        the checkpoints made from it. Not in the store: quantkit did not build it."""
        files = {rel: FileRecord(sha, (self.path / rel).stat().st_size) for rel, sha in self.files.items()}
        return Entry("source", self.digest[:32], self.path, {}, files, {}, reused=True)

    def check_links(self) -> None:
        """``check_no_links`` again, where a step is about to read the folder (a link swapped in since
        ``fetch_model`` looked is refused too)."""
        check_no_links(self.path, blobs=self.path.parents[1] / "blobs" if self.repo is not None else None)

    def describe(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "commit": self.commit,
                "path": str(self.path), "digest": self.digest, "files": self.files}


def remote_code_allowed(asked: bool) -> bool:
    """``trust_remote_code`` for transformers and GPTQModel: True when the recipe asks for it and this
    worker, the process about to load the model, sets QUANTKIT_ALLOW_REMOTE_CODE=1. A recipe that asks on
    a worker that does not allow it is refused (SourceError), never loaded without the code it needs."""
    if not asked:
        return False
    if os.environ.get(WORKER_ALLOWS_REMOTE_CODE) != "1":
        raise SourceError(f"the recipe sets model.trust_remote_code, which runs the model's Python code, and this "
                          f"worker does not allow it: set {WORKER_ALLOWS_REMOTE_CODE}=1 on the worker, or remove it")
    return True


def check_worker_allows(source: ModelSource) -> None:
    """The worker's own say over what the recipe allows: pickle weights need QUANTKIT_ALLOW_PICKLE=1 and
    remote code QUANTKIT_ALLOW_REMOTE_CODE=1 in the environment of the process that reads the model."""
    if source.allow_pickle and os.environ.get(WORKER_ALLOWS_PICKLE) != "1":
        raise SourceError(f"the recipe sets model.allow_pickle (pickle weights can run code when loaded) and this "
                          f"worker does not allow it: set {WORKER_ALLOWS_PICKLE}=1 on the worker, or convert the "
                          "weights to safetensors")
    remote_code_allowed(source.trust_remote_code)


def allowed_patterns(source: ModelSource) -> tuple[str, ...]:
    patterns = SAFE_PATTERNS
    if source.allow_pickle:
        patterns += PICKLE_PATTERNS
    if source.trust_remote_code:
        patterns += CODE_PATTERNS
    return patterns


def _hub_blob_link(path: Path, blobs: Path | None) -> bool:
    """A Hub cache snapshot's link to a blob of its own repo (``../../blobs/<hash>``) that is a regular file."""
    if blobs is None:
        return False
    target = Path(os.path.normpath(path.parent / os.readlink(path)))
    try:
        return os.path.realpath(target.parent) == os.path.realpath(blobs) and stat.S_ISREG(target.lstat().st_mode)
    except OSError:
        return False


def check_no_links(folder: Path, *, blobs: Path | None) -> None:
    """Refuse a model folder with a symlink in it (``SymlinkError``), except, in a Hub cache snapshot,
    the links huggingface_hub makes to its own blobs: a link elsewhere would make the converter embed
    (and publish) a file of the worker's, e.g. a chat_template.jinja linked to a secret."""
    if links := symlinks_below(folder, allow=lambda p: _hub_blob_link(p, blobs)):
        raise SymlinkError(f"model folder {folder} has {len(links)} symlink(s): {', '.join(links[:3])}; "
                           "quantkit follows no link in a model folder")


def _blobs(source: ModelSource, folder: Path) -> Path | None:
    """The Hub cache's blob folder of a downloaded snapshot (``<repo>/snapshots/<commit>``); None for a local one."""
    return folder.parents[1] / "blobs" if source.repo is not None else None


def _select(folder: Path, source: ModelSource) -> list[Path]:
    patterns = allowed_patterns(source)
    chosen, refused = [], []
    check_no_links(folder, blobs=_blobs(source, folder))
    # huggingface_hub keeps download metadata in <folder>/.cache/: not model files.
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts):
        rel = f.relative_to(folder).as_posix()
        if any(fnmatch.fnmatch(f.name, pat) for pat in patterns):
            chosen.append(f)
        elif any(fnmatch.fnmatch(f.name, pat) for pat in PICKLE_PATTERNS):
            refused.append(rel)
    has_weights = any(f.name.endswith(".safetensors") or (source.allow_pickle and f.suffix in {".bin", ".pt", ".pth"})
                      for f in chosen)
    if not has_weights:
        if refused:
            raise SourceError(f"{folder} has only pickle weights ({', '.join(refused[:3])}); they can run code "
                              "when loaded. Convert them to safetensors, or set model.allow_pickle: true")
        raise SourceError(f"{folder} has no safetensors weights")
    if not any(f.name == "config.json" for f in chosen):
        raise SourceError(f"{folder} has no config.json; it is not a Hugging Face checkpoint")
    return chosen


def fetch_model(*, source: ModelSource, root: Path, digests: DigestCache) -> ModelSnapshot:
    """Resolve the recipe's model to a local folder and digest the files used."""
    check_worker_allows(source)
    if source.path is not None:
        if (link := symlink_on_path(root, source.path)) is not None:
            raise SymlinkError(f"model folder {source.path}: {link} is a symlink; quantkit follows no link in a "
                               "model folder")
        folder = Path(root).resolve() / source.path
        if not folder.is_dir():
            raise SourceError(f"model folder {source.path} does not exist (for the demo: `quantkit demo-model`)")
        commit = None
    else:
        folder, commit = _download(source)
    files = {f.relative_to(folder).as_posix(): digests.sha256(f) for f in _select(folder, source)}
    return ModelSnapshot(path=folder, repo=source.repo, revision=source.revision, commit=commit,
                         files=files, digest=digest_of(files), trust_remote_code=source.trust_remote_code)


@contextlib.contextmanager
def hub_errors(what: str, repo: str):
    """huggingface_hub's download errors as a SourceError naming ``what`` (a repo at a revision, or a file of
    one): not cached while offline, no such repo (or gated), no such file, any other HTTP error."""
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        yield
    except LocalEntryNotFoundError as e:
        raise SourceError(f"{what} is not in the local Hugging Face cache and the Hub cannot be reached "
                          "(HF_HUB_OFFLINE or no network)") from e
    except RepositoryNotFoundError as e:
        raise SourceError(f"{repo} not found, or gated without access (set HF_TOKEN)") from e
    except EntryNotFoundError as e:
        raise SourceError(f"{what}: the repo has no such file at that revision") from e
    except HfHubHTTPError as e:
        raise SourceError(f"downloading {what} failed: {e}") from e


def _download(source: ModelSource) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    log.info("fetching %s at %s", source.repo, source.revision)
    with hub_errors(f"{source.repo}@{source.revision}", source.repo):
        path = snapshot_download(repo_id=source.repo, revision=source.revision,
                                 allow_patterns=list(allowed_patterns(source)))
    folder = Path(path)
    _sweep_partial_blobs(folder)
    # snapshot folders are named after the commit the revision resolved to.
    return folder, folder.name


def _sweep_partial_blobs(snapshot: Path) -> None:
    """Delete partial downloads that an interrupted run left in the Hub cache.

    huggingface_hub downloads each blob to ``<etag>.<random>.incomplete`` and never resumes another
    process's file, so a killed download leaves one behind for ever (a whole model's worth of disk).
    Once the blob is complete, its partial files are garbage; the blob's own lock (which a download
    holds while it writes) tells that no other process is still writing one.
    """
    from filelock import FileLock, Timeout

    repo = snapshot.parents[1]  # <cache>/models--org--name/snapshots/<commit>
    locks = repo.parent / ".locks" / repo.name
    removed, freed = 0, 0
    for partial in (repo / "blobs").glob("*.*.incomplete"):
        etag = partial.name.split(".", 1)[0]
        if not (repo / "blobs" / etag).is_file():
            continue
        try:
            with FileLock(locks / f"{etag}.lock", timeout=0):
                freed += partial.stat().st_size
                partial.unlink()
                removed += 1
        except (Timeout, FileNotFoundError):
            continue  # another process holds it (or removed the file first)
    if removed:
        log.info("removed %d partial download(s) (%.1f MiB) left in the Hub cache by an interrupted run",
                 removed, freed / 2**20)


def resolve_track(*, repo: str, track: str, api=None) -> tuple[str, str]:
    """``(ref, commit)`` that ``model.track`` names on the Hub now: the branch's current commit, or for a tag
    pattern (``v*``) the newest matching tag (by version order, else by name) and its commit."""
    import fnmatch as fnm

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    api = api or HfApi()
    try:
        if not any(c in track for c in "*?["):
            refs = api.list_repo_refs(repo)
            by_name = {r.name: r.target_commit for r in [*refs.branches, *refs.tags]}
            if track not in by_name:
                raise SourceError(f"{repo} has no branch or tag '{track}' (model.track)")
            return track, by_name[track]
        tags = {t.name: t.target_commit for t in api.list_repo_refs(repo).tags if fnm.fnmatchcase(t.name, track)}
    except OfflineModeIsEnabled as e:
        raise SourceError(f"model.track {track!r} needs the Hub, and HF_HUB_OFFLINE is set") from e
    except RepositoryNotFoundError as e:
        raise SourceError(f"{repo} not found, or gated without access (set HF_TOKEN)") from e
    except HfHubHTTPError as e:
        raise SourceError(f"resolving {repo}@{track} failed: {e}") from e
    if not tags:
        raise SourceError(f"{repo} has no tag matching '{track}' (model.track)")
    newest = max(tags, key=_tag_order)
    return newest, tags[newest]


def _tag_order(name: str) -> tuple:
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(name), name)
    except InvalidVersion:
        return (0, Version("0"), name)

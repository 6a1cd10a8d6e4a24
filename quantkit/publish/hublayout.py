"""One Hub repo per format: which files each repo holds, under which names, and how the quant tags
users type resolve to them. Pure: reads the staged run folder's listing, uploads nothing.

Why the names (each source read for this):

- ``ollama run hf.co/{owner}/{repo}:{quant}``: the Hub picks the GGUF whose name carries the tag,
  ``Q4_K_M`` when none is given (https://huggingface.co/docs/hub/ollama, "Custom Quantization").
  The match is on the quant suffix of the file name, not a prefix of it: ``:IQ3_S`` is refused for a
  repo whose file is ``…-IQ3_S-imat.gguf`` and ``:IQ3_S-imat`` works
  (https://qiita.com/7shi/items/6ea02124c5b25df237c2). So each GGUF is ``<Model>-<label>.gguf`` at the
  repo root and its tag is exactly its label.
- ``llama-server -hf {owner}/{repo}:{quant}``: the pinned llama.cpp (0c1e570, common/download.cpp
  ``find_best_model``) lists the repo (``/api/models/<repo>/tree/<commit>?recursive=true``) and takes the
  first ``.gguf`` whose path matches the regex ``<quant>[.-]`` case-insensitively, skipping ``mmproj``/
  ``imatrix`` files and every split shard but ``-00001-of-N``, whose siblings it then fetches too;
  with no tag it tries Q4_K_M, then Q8_0, then the first GGUF. ``Q4_K_M`` therefore also matches
  ``<Model>-Q4_K_M-noimat.gguf``, which sorts first: ``llama_cpp_pick`` mirrors the rule so the card
  gives ``--hf-file`` wherever the tag would pick another file.
- ``from_pretrained(repo)`` and ``vllm serve repo`` read ``config.json`` at the repo root, never from a
  subfolder, so each GPTQ/AWQ checkpoint is the root of its own repo.
- Split GGUFs keep llama-gguf-split's ``<Model>-<label>-00001-of-00003.gguf`` names, which llama.cpp's
  rule resolves (it downloads every shard of the matched first one). Ollama cannot import split GGUFs
  (quantkit issue #28), so the card gives the ``llama-gguf-split --merge`` line instead of ``ollama run``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import PublishError
from quantkit.manifest import Manifest
from quantkit.formats import FORMATS, HUB_FORMATS
from quantkit.publish.modelfile import merge_command, modelfile_name

SHARED_FILES = ("report.md", "report.json", "plot.png", "manifest.json", "recipe.yaml")  # in every repo
CARD = "README.md"
SPLIT_RE = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
NOT_A_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")  # llama.cpp's sidecar names


@dataclass(frozen=True)
class HubRepo:
    """One repo of a release: its format, id, the report rows it carries and its files."""

    format: str  # gguf | gptq | awq
    repo_id: str
    variant_ids: tuple[str, ...]  # report ids, e.g. ("gptq:GPTQ-4bit-g128",)
    files: dict[str, Path] = field(default_factory=dict)  # path in the repo -> file of the staged run
    settings: dict[str, dict] = field(default_factory=dict)  # variant label -> quantization settings
    ggufs: dict[str, str] = field(default_factory=dict)  # variant label -> GGUF file name (GGUF repos)
    projectors: tuple[str, ...] = ()  # mmproj-<name>-<type>.gguf beside the GGUFs (a VLM's GGUF repo)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


def model_name(manifest: Manifest | dict) -> str:
    """The model's name as in the file names (``recipe.ModelSource.display_name``)."""
    manifest = Manifest.coerce(manifest)
    src = (manifest.recipe.resolved or {}).get("model") or {}
    model = manifest.model
    return src.get("name") or (model.repo or model.path or "model").rstrip("/").split("/")[-1]


def variant_settings(manifest: Manifest | dict, fmt: str, label: str) -> dict[str, Any]:
    """The quantization settings a variant was made with, from the manifest's resolved recipe.

    A manifest without that section (an older run) gets the defaults when the label is the default one;
    any other unknown variant is refused (its repo name depends on its bits and group size)."""
    from quantkit.recipe import GGUFSection, Recipe

    manifest = Manifest.coerce(manifest)
    resolved = manifest.recipe.resolved or {}
    if FORMATS[fmt].llama_cpp:
        section = resolved.get("gguf")
        if not section:
            return {"type": label}
        gguf = GGUFSection.model_validate(section)
        if label == gguf.base_type.upper():
            return {"type": label, "base": True}
        for v in gguf.types:
            if gguf.label(v) == label:
                out = {"type": v.type, "imatrix": gguf.uses_imatrix(v)}
                if out["imatrix"]:
                    # the expert settings only where a variant saw experts (quantkit.experts)
                    moe = any(m.info.get("experts") for m in manifest.variants)
                    out["imatrix_settings"] = gguf.imatrix.model_dump(
                        exclude={"enabled"} | (set() if moe else {"min_expert_tokens", "uncovered_experts"}))
                if args := gguf.override_args(v):
                    out["llama_quantize_args"] = args
                return out
    else:
        kind = Recipe.entry_class(fmt)
        configs = [kind.model_validate(c) for c in resolved.get(fmt) or []] or [kind()]
        for c in configs:
            if c.name == label:
                return c.model_dump(exclude={"label"})
    raise PublishError(f"{fmt} variant {label!r} is not in the run's resolved recipe; its Hub repo cannot be named")


def _repo_id(settings: Any, fmt: str, model: str, s: dict) -> str:
    if FORMATS[fmt].checkpoint:  # GPTQ names them bits and group_size, AWQ w_bit and q_group_size
        return settings.repo_id(fmt, model=model, bits=s["bits"] if "bits" in s else s["w_bit"],
                                group=s["group_size"] if "group_size" in s else s["q_group_size"])
    return settings.repo_id(fmt, model=model)


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """A GPTQ/AWQ checkpoint folder's files by their path in the repo (the folder is the repo root)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() != CARD:
            out[rel.as_posix()] = p
    return out


def plan_repos(*, staged: Path, manifest: Manifest | dict, settings: Any) -> list[HubRepo]:
    """The repos of one release, GGUF first: the GGUFs (and their Modelfiles) at the root of one repo;
    each GPTQ/AWQ checkpoint as the root of its own; the report, manifest and recipe in every repo.
    ``settings``: ``recipe.Publish``. The base checkpoint is not republished."""
    manifest = Manifest.coerce(manifest)
    staged, model = Path(staged), model_name(manifest)
    shared = {name: staged / name for name in SHARED_FILES if (staged / name).is_file()}
    repos: dict[str, dict] = {}
    for v in manifest.variants:
        fmt, label = v.format, v.label
        if fmt not in HUB_FORMATS or not v.file:
            continue
        s = variant_settings(manifest, fmt, label)
        repo_id = _repo_id(settings, fmt, model, s)
        repo = repos.setdefault(repo_id, {"format": fmt, "ids": [], "files": {}, "settings": {}, "ggufs": {}})
        if repo["format"] != fmt:
            raise PublishError(f"{repo_id} would hold both {repo['format']} and {fmt} files: one repo per format")
        if FORMATS[fmt].checkpoint and repo["ids"]:
            raise PublishError(f"{repo['ids'][0]} and {v.id} would both be the root of {repo_id}")
        repo["ids"].append(v.id)
        repo["settings"][label] = s
        if FORMATS[fmt].llama_cpp:
            name = v.file
            parts = [shard.file for shard in v.shards] or [name]  # split: its shards, in order
            if any("/" in p or not (staged / p).is_file() for p in parts):
                raise PublishError(f"GGUF {name} is not a file (or its shards are not) at the top of the staged run")
            repo["files"].update({p: staged / p for p in parts})
            repo["ggufs"][label] = name
            if (staged / modelfile_name(name)).is_file():
                repo["files"][modelfile_name(name)] = staged / modelfile_name(name)
        else:
            folder = staged / v.file
            files = _checkpoint_files(folder) if folder.is_dir() else {}
            if "config.json" not in files:
                raise PublishError(f"{fmt} checkpoint {v.file} has no config.json; "
                                   "from_pretrained and vLLM could not load it from the repo root")
            repo["files"].update(files)
    projectors = tuple(p.file for p in manifest.projectors)
    for p in projectors:  # at the root with the GGUFs: where llama-server -hf looks for them
        if "/" in p or not (staged / p).is_file():
            raise PublishError(f"projector {p} is not a file at the top of the staged run")
    out = []
    for repo_id, r in sorted(repos.items(), key=lambda kv: (HUB_FORMATS.index(kv[1]["format"]), kv[0])):
        files = dict(r["files"])
        if FORMATS[r["format"]].llama_cpp:
            files.update({p: staged / p for p in projectors})
        for name, path in shared.items():
            files.setdefault(name, path)  # a checkpoint's own file of that name wins
        out.append(HubRepo(r["format"], repo_id, tuple(r["ids"]), dict(sorted(files.items())), r["settings"],
                           r["ggufs"], projectors if FORMATS[r["format"]].llama_cpp else ()))
    return out


# --- how users' quant tags resolve -----------------------------------------------------------------------

def _split(path: str) -> tuple[str, int, int]:
    prefix = path.removesuffix(".gguf")
    if m := SPLIT_RE.match(prefix):
        return m.group(1), int(m.group(2)), int(m.group(3))
    return prefix, 1, 1


def llama_cpp_pick(paths: list[str], tag: str) -> list[str]:
    """The files ``llama-server -hf repo:tag`` downloads from a repo listing ``paths`` (in the Hub's
    order): pinned llama.cpp's ``find_best_model`` and ``get_split_files``, for a non-empty tag."""
    pattern = re.compile(re.escape(tag) + r"[.-]", re.IGNORECASE)
    for p in paths:
        name = p.rsplit("/", 1)[-1]
        if not p.endswith(".gguf") or any(k in name for k in NOT_A_MODEL) or not pattern.search(p):
            continue
        prefix, index, count = _split(p)
        if count > 1 and index != 1:
            continue
        return [q for q in paths if q.endswith(".gguf") and _split(q)[0] == prefix and _split(q)[2] == count]
    return []


def quant_bits(path: str) -> int:
    """Pinned llama.cpp's ``extract_quant_bits``: the first number in the name's last ``-``/``.`` part (Q4_K_M
    -> 4, F16 -> 16; ``…-Q4_K_M-noimat`` -> 0)."""
    m = re.search(r"[-.]([A-Z0-9_]+)$", _split(path)[0], re.IGNORECASE)
    digits = re.search(r"[0-9]+", m.group(1)) if m else None
    return int(digits.group(0)) if digits else 0


def llama_cpp_projector(paths: list[str], model: str, tag: str = "") -> str | None:
    """The projector ``llama-server -hf repo[:tag]`` fetches with ``model`` (pinned llama.cpp's
    ``find_best_mmproj``): a ``.gguf`` whose path contains ``mmproj`` in the model's folder or above it, the
    deepest, then the one whose bit count is closest to the tag's (the model file's when no tag)."""
    want = int(d.group(0)) if tag and (d := re.search(r"[0-9]+", tag)) else 0 if tag else quant_bits(model)
    model_dirs = model.split("/")[:-1]
    best, best_key = None, None
    for p in paths:
        dirs = p.split("/")[:-1]
        if not p.endswith(".gguf") or "mmproj" not in p or dirs != model_dirs[:len(dirs)]:
            continue
        key = (len(dirs), -abs(quant_bits(p) - want))
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


def hub_tag_files(paths: list[str], tag: str) -> list[str]:
    """The files ``ollama run hf.co/repo:tag`` gets: the GGUF named ``…-<tag>.gguf`` (or its split
    shards ``…-<tag>-0000i-of-0000n.gguf``), the tag compared case-insensitively."""
    want = f"-{tag}".lower()
    return [p for p in paths if p.endswith(".gguf") and "/" not in p and not any(k in p for k in NOT_A_MODEL)
            and _split(p)[0].lower().endswith(want)]


def gguf_commands(repo: HubRepo, paths: list[str]) -> dict[str, dict[str, str]]:
    """Per GGUF variant label: the ``ollama`` and ``llama-server`` commands that fetch exactly its file(s)
    from the repo whose files are ``paths`` (after splitting). A tag that would resolve to another file
    gets the ``--hf-file`` form instead."""
    out = {}
    for label, file in repo.ggufs.items():
        prefix = file.removesuffix(".gguf")
        mine = sorted(p for p in paths if p == file or _split(p)[0] == prefix and _split(p)[2] > 1)
        first = next((p for p in mine if _split(p)[1] == 1), file)
        cmds = {}
        if first != file:  # shards: Ollama cannot import them, so a user merges them first
            cmds["merge"] = merge_command(first, file)
        elif hub_tag_files(paths, label) == mine:
            cmds["ollama"] = f"ollama run hf.co/{repo.repo_id}:{label}"
        if llama_cpp_pick(paths, label) == mine:
            cmds["llama_server"] = f"llama-server -hf {repo.repo_id}:{label}"
        else:
            cmds["llama_server"] = f"llama-server --hf-repo {repo.repo_id} --hf-file {first}"
        out[label] = cmds
    return out

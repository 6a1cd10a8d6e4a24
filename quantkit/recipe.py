"""The recipe: a strict schema for one reproducible quantization run.

Recipes arrive in pull requests, so everything here refuses rather than guesses:
unknown keys, unknown type names, moving revisions, paths that leave the
project, strings that could smuggle shell syntax. ``load_recipe`` reports
every problem at once, each with file, line and a fix.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from quantkit.errors import Problem, RecipeError
from quantkit.paths import name_problem
from quantkit.quanttypes import (
    ALIASES,
    QUANT_TYPES,
    TENSOR_TYPES,
    TENSOR_TYPES_NEEDING_IMATRIX,
)
from quantkit.yamlsrc import dotted, load_yaml

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
TAG_RE = re.compile(r"^(refs/tags/[A-Za-z0-9][A-Za-z0-9._+-]{0,99}|v?[0-9][A-Za-z0-9._+-]{0,99})$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SAFE_TEXT_RE = re.compile(r"^[A-Za-z0-9 ._/@:+=,()\-]*$")
TENSOR_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.*\-]{1,128}$")
MOVING_REFS = {"main", "master", "head", "dev", "develop", "latest"}
# model.track: a branch name or a tag pattern (fnmatch: * ? [..]); never a path ('..') or a ref prefix.
TRACK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/*?\[\]+-]{0,99}$")
SDIST_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
RELEASE_RE = re.compile(r"^[0-9]{1,4}(\.[0-9]{1,4}){1,3}$")  # a llama-cpp-python release: 0.3.36
WORKER_ALLOWS_REMOTE_CODE = "QUANTKIT_ALLOW_REMOTE_CODE"
WORKER_ALLOWS_PICKLE = "QUANTKIT_ALLOW_PICKLE"
# Prefect expands these in prefect.yaml at deploy time ({{ $HF_TOKEN }}, {{ prefect.blocks.* }}); Jinja's
# statement marker too, so no recipe text that reaches a templated file can ask for a secret.
TEMPLATE_MARKERS = ("{{", "}}", "{%")


class Invalid(ValueError):
    """A validation failure that knows its fix (shown after the message) and, for cross-field rules,
    the recipe path it points at (``loc``), so the error names that line rather than the section's."""

    def __init__(self, message: str, fix: str, loc: tuple = ()):
        super().__init__(message)
        self.fix = fix
        self.loc = loc


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, str_strip_whitespace=False)


def _safe_text(value: str) -> str:
    """Strings end up in argument lists and file names: refuse shell syntax and control characters."""
    if not SAFE_TEXT_RE.match(value):
        bad = sorted({c for c in value if not SAFE_TEXT_RE.match(c)})
        shown = ", ".join(repr(c) for c in bad)
        raise Invalid(f"contains characters not allowed in a recipe: {shown}",
                      "use letters, digits, spaces and . _ / @ : + = , ( ) - only")
    return value


SafeText = Annotated[str, pydantic.AfterValidator(_safe_text), Field(max_length=200)]


def _safe_name(value: str) -> str:
    """A value that becomes a file or folder name: one safe path component (quantkit.paths)."""
    if (why := name_problem(value)) is not None:
        raise Invalid(why, "use a name like Q4_K_M-attn8 or my-model (no '/', no leading '.', no spaces)")
    return value


SafeName = Annotated[str, pydantic.AfterValidator(_safe_name)]


def _project_path(value: str, info: ValidationInfo) -> str:
    """A path relative to the project root that stays inside it, symlinks included."""
    _safe_text(value)
    pure = PurePosixPath(value)
    if pure.is_absolute() or value.startswith("~"):
        raise Invalid("absolute paths are not allowed", "write the path relative to the project root")
    if ".." in pure.parts:
        raise Invalid("'..' is not allowed: the path must stay inside the project", "move the file into the project")
    root = (info.context or {}).get("root")
    if root is not None:
        resolved = (Path(root) / pure).resolve()
        if not resolved.is_relative_to(Path(root).resolve()):
            raise Invalid(f"resolves outside the project (a symlink leads to {resolved})",
                          "copy the file into the project instead of linking to it")
    return str(pure)


ProjectPath = Annotated[str, pydantic.AfterValidator(_project_path)]


def _project_dir(value: str, info: ValidationInfo) -> str:
    """A folder quantkit writes into (runs/, artifacts/): inside the project, symlinks included, and each
    component one safe name, because the writer joins it from the project root with ``paths.inside``."""
    try:
        value = _project_path(value, info)
    except Invalid as e:
        raise Invalid(str(e), f"make '{value}' a real folder in the project (not a link), or write another "
                      "folder here") from None
    for part in PurePosixPath(value).parts:
        if (why := name_problem(part)) is not None:
            raise Invalid(f"folder '{value}': {why}", "use a folder name like runs or out/artifacts")
    return value


# Checked even when the recipe leaves it out (``validate_default``): a symlinked runs/ is refused either way.
ProjectDir = Annotated[str, pydantic.AfterValidator(_project_dir)]


def no_templating(value: str) -> str:
    """Text written into a file another tool templates (prefect.yaml): no template markers at all."""
    if found := [m for m in TEMPLATE_MARKERS if m in value]:
        raise Invalid(f"contains {' and '.join(repr(m) for m in found)}: prefect deploy would expand it as a "
                      "template (e.g. {{ $HF_TOKEN }} writes the token into the deployment)",
                      "remove the braces; write the text without {{, }} or {%")
    return value


def _repo_id(v: str | None) -> str | None:
    if v is not None and not REPO_RE.match(v):
        raise Invalid(f"'{v}' is not a Hugging Face repo id", "write owner/name, e.g. meta-llama/Llama-3.1-8B-Instruct")
    return v


def _pinned_revision(v: str) -> str:
    """A revision that names one fixed snapshot: a full commit sha or a tag."""
    if v.lower() in MOVING_REFS or v.startswith("refs/heads/") or v.startswith("refs/pr/"):
        raise Invalid(f"revision '{v}' is a branch, which moves", "pin a commit sha (40 hex digits) or a tag")
    if re.fullmatch(r"[0-9a-fA-F]{7,39}", v):
        raise Invalid(f"revision '{v}' is a short or partial sha", "write the full 40-digit commit sha")
    if not (COMMIT_RE.match(v) or TAG_RE.match(v)):
        raise Invalid(f"revision '{v}' is not a commit sha or a tag",
                      "write 40 lowercase hex digits, or a tag such as v1.2 or refs/tags/NAME")
    return v


class ModelSource(Section):
    """Where the unquantized model comes from: a pinned Hub revision or a local folder."""

    repo: str | None = Field(None, description="Hugging Face repo id, e.g. meta-llama/Llama-3.1-8B-Instruct")
    revision: str | None = Field(None, description="commit sha (40 hex) or tag; branches move and are refused")
    path: ProjectPath | None = Field(None, description="local HF checkpoint folder, relative to the project")
    name: SafeName | None = Field(None, description="name used in file names and GGUF metadata")
    allow_pickle: bool = Field(False, description="allow pickle .bin/.pt weights (they can run code on load)")
    trust_remote_code: bool = Field(False, description=f"needs the worker to set {WORKER_ALLOWS_REMOTE_CODE}=1 too")
    mmproj: bool | None = Field(None, description="convert the vision projector (mmproj-<name>-F16.gguf) beside the "
                                "GGUFs: true or false; absent: decided from config.json (a vision_config)")
    track: str | None = Field(None, description="branch or tag pattern (v*) that `quantkit run --track` follows; "
                              "'revision' stays the pin a plain run uses (docs/nightly.md)")

    _repo = field_validator("repo")(_repo_id)

    @field_validator("track")
    @classmethod
    def _track(cls, v: str | None) -> str | None:
        if v is not None and (not TRACK_RE.match(v) or ".." in v or v.startswith("refs/pr/")):
            raise Invalid(f"track '{v}' is not a branch name or a tag pattern",
                          "write a branch (main) or a tag pattern (v*), letters, digits and . _ / * ? [ ] + - only")
        return v

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        return None if v is None else _pinned_revision(v)

    @field_validator("trust_remote_code")
    @classmethod
    def _remote_code(cls, v: bool) -> bool:
        if v and os.environ.get(WORKER_ALLOWS_REMOTE_CODE) != "1":
            raise Invalid("trust_remote_code runs the repo's Python code and this worker does not allow it",
                          f"remove it, or run on a worker that sets {WORKER_ALLOWS_REMOTE_CODE}=1")
        return v

    @field_validator("allow_pickle")
    @classmethod
    def _pickle(cls, v: bool) -> bool:
        if v and os.environ.get(WORKER_ALLOWS_PICKLE) != "1":
            raise Invalid("allow_pickle loads .bin/.pt weights, which can run code, and this worker does not allow it",
                          f"convert the weights to safetensors, or run on a worker that sets {WORKER_ALLOWS_PICKLE}=1")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.repo is None) == (self.path is None):
            raise Invalid("the model needs exactly one source", "give either 'repo' with 'revision', or 'path'")
        if self.repo is not None and self.revision is None:
            raise Invalid("'repo' has no pinned 'revision'", "add revision: <40-digit commit sha or a tag>")
        if self.path is not None and self.revision is not None:
            raise Invalid("'revision' applies to 'repo' only", "remove it; a local 'path' is pinned by its digest")
        if self.path is not None and self.track is not None:
            raise Invalid("'track' follows a Hub repo, and this model is a local 'path'",
                          "remove 'track', or give 'repo' with 'revision'", loc=("track",))
        if self.name is None and (why := name_problem(self.display_name)) is not None:
            raise Invalid(f"the file names come from the model folder's name: {why}",
                          "add model.name: a safe name for the files, e.g. my-model")
        return self

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        return (self.repo or self.path or "model").rstrip("/").split("/")[-1]


class HubDataset(Section):
    """A Hub dataset for calibration on real runs (not reachable offline)."""

    name: SafeText = Field(description="Hub dataset repo id, owner/name; never a local path")
    config: SafeText | None = None
    split: SafeText = "train"
    revision: str

    @field_validator("name")
    @classmethod
    def _hub_repo(cls, v: str, info: ValidationInfo) -> str:
        # datasets.load_dataset reads a local folder or script when one has this name: only a repo id that
        # names no file in the project reaches the Hub.
        _repo_id(v)
        root = (info.context or {}).get("root")
        if root is not None and (Path(root) / v).exists():
            raise Invalid(f"'{v}' is also a path in the project, which datasets would load instead of the Hub "
                          "repo", "name a Hub dataset (owner/name) that no project folder shadows")
        return v
    column: SafeText = "text"
    max_rows: int = Field(1000, ge=1, le=1_000_000)

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str) -> str:
        return _pinned_revision(v)


class Calibration(Section):
    """Calibration text: files under calibration/, or a pinned Hub dataset."""

    files: list[ProjectPath] | None = Field(None, min_length=1, max_length=32)
    dataset: HubDataset | None = None
    conversations: list[ProjectPath] = Field(
        default_factory=list, max_length=32,
        description="JSONL chat sets under calibration/, rendered through the chat template beside the text")

    @field_validator("files", "conversations")
    @classmethod
    def _under_calibration(cls, v: list[str] | None) -> list[str] | None:
        for f in v or []:
            if not f.startswith("calibration/"):
                raise Invalid(f"'{f}' is not under calibration/", "add the text to calibration/ with its source and licence")
        return v

    @field_validator("conversations")
    @classmethod
    def _jsonl(cls, v: list[str]) -> list[str]:
        for f in v:
            if not f.endswith(".jsonl"):
                raise Invalid(f"'{f}' is not a .jsonl file of conversations",
                              "write one {\"messages\": [...]} object per line in a .jsonl file")
        return v

    @model_validator(mode="after")
    def _one(self) -> Calibration:
        if (self.files is None) == (self.dataset is None):
            raise Invalid("calibration needs exactly one source", "give either 'files' or 'dataset'")
        return self


class TaskSpec(Section):
    """One lm-eval multiple-choice task scored on every variant (see quantkit.scoring.tasks).

    A name lm-eval ships (arc_easy, hellaswag, mmlu) or a local task: ``path`` to a folder with
    ``task.yaml`` and its jsonl, or, without ``path``, ``calibration/tasks/<name>/`` when it exists.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    num_fewshot: int = Field(0, ge=0, le=25)
    limit: int | None = Field(200, ge=1, le=100_000, description="first N documents; null for all")
    path: ProjectPath | None = None


SET_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def _set_name(v: str) -> str:
    if not SET_NAME_RE.match(v):
        raise Invalid(f"set name '{v}' is not a short lowercase name",
                      "use lowercase letters, digits, '_' and '-' (at most 32), e.g. code or chat")
    return v


SetName = Annotated[str, pydantic.AfterValidator(_set_name)]


def default_set_name(file: str) -> str:
    """The name of the set ``evaluation.file`` makes when ``evaluation.name`` is not given: its file stem,
    lowercased, with anything else made '-' (en-prose-heldout)."""
    stem = re.sub(r"[^a-z0-9_-]+", "-", PurePosixPath(file).stem.lower()).strip("-_")[:32]
    return stem if SET_NAME_RE.match(stem) else "text"


class EvalSet(Section):
    """One more held-out set every variant is scored on (``evaluation.sets``).

    ``format: text`` is scored as ``evaluation.file`` is (llama-perplexity on the raw text); ``format: chat`` is
    a JSONL file of conversations (``{"messages": [...], "tools": [...]}`` per line) rendered through the
    checkpoint's chat template, so special tokens and turn markers are scored as a chat user's prompt is
    (``quantkit.scoring.chat``). The default is chat for ``.jsonl`` files, text otherwise."""

    name: SetName
    file: ProjectPath
    format: Literal["text", "chat"] | None = None
    ctx: int = Field(512, ge=16, le=131_072, description="context of each scored window (a long-context set: 4096+)")
    max_tokens: int = Field(10_240, ge=64, le=10_000_000, description="bound on tokens (disk for the base logits)")

    @property
    def kind(self) -> str:
        return self.format or ("chat" if self.file.endswith(".jsonl") else "text")

    @model_validator(mode="after")
    def _one_chunk(self) -> EvalSet:
        if self.max_tokens < self.ctx:
            raise Invalid(f"set '{self.name}': max_tokens {self.max_tokens} is less than one context of {self.ctx}",
                          f"raise max_tokens to a multiple of ctx (e.g. {self.ctx * 8}) or lower ctx",
                          loc=("max_tokens",))
        if self.kind == "chat" and not self.file.endswith(".jsonl"):
            raise Invalid(f"set '{self.name}': a chat set is a .jsonl file of conversations, not '{self.file}'",
                          "write one {\"messages\": [...]} object per line in a .jsonl file", loc=("file",))
        return self


class Evaluation(Section):
    """Held-out text the variants are scored on; never overlaps calibration text.

    ``file``/``ctx``/``max_tokens`` are the first set (named ``name``, default the file's stem); ``sets`` adds
    more, each with its own context, text or chat."""

    file: ProjectPath
    name: SetName | None = Field(None, description="the name of the set 'file' makes (default: its file stem)")
    sets: list[EvalSet] = Field(default_factory=list, max_length=16,
                                description="more held-out sets: {name, file, format: text|chat, ctx, max_tokens}")
    ctx: int = Field(512, ge=16, le=131_072)
    max_tokens: int = Field(10_240, ge=64, le=10_000_000, description="bound on scored tokens (disk for base logits)")
    kld: bool = Field(True, description="KL divergence against the base model (needs its logits on disk once)")
    bench: bool = Field(True, description="llama-bench prompt/generation speed for each GGUF")
    bench_prompt_tokens: int = Field(128, ge=1, le=65_536)
    bench_gen_tokens: int = Field(32, ge=1, le=65_536)
    bench_reps: int = Field(2, ge=1, le=100)
    tasks: list[TaskSpec] = Field(default_factory=list, max_length=32,
                                  description="lm-eval tasks: names or {name, num_fewshot, limit, path}")
    chance_alpha: float = Field(0.01, gt=0, lt=0.5, description="base/Q8_0 task accuracy must beat guessing at this p")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names(cls, v: Any) -> Any:
        return [{"name": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _at_least_one_chunk(self) -> Evaluation:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise Invalid(f"evaluation.tasks lists a task twice: {names}", "list each task once")
        if self.max_tokens < self.ctx:
            raise Invalid(f"evaluation.max_tokens {self.max_tokens} is less than one context of {self.ctx} tokens",
                          f"raise max_tokens to a multiple of ctx (e.g. {self.ctx * 20}) or lower ctx")
        seen = {self.set_name: ("file",)}
        for i, s in enumerate(self.sets):
            if s.name in seen:
                raise Invalid(f"evaluation set name '{s.name}' is used twice", "give each set its own name",
                              loc=("sets", i, "name"))
            seen[s.name] = ("sets", i)
        return self

    @property
    def set_name(self) -> str:
        return self.name or default_set_name(self.file)

    def all_sets(self) -> list[EvalSet]:
        """Every set, the one ``file`` makes first (as an EvalSet: the same fields the scorers read)."""
        return [EvalSet(name=self.set_name, file=self.file, format="text", ctx=self.ctx, max_tokens=self.max_tokens),
                *self.sets]


class TensorOverrides(Section):
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("output_tensor_type", "token_embedding_type")
    @classmethod
    def _ggml_type(cls, v: str | None) -> str | None:
        return None if v is None else _tensor_type(v)

    @field_validator("tensor_types")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for pattern, t in v.items():
            if not TENSOR_PATTERN_RE.match(pattern):
                raise Invalid(f"tensor pattern '{pattern}' has characters llama-quantize patterns do not need",
                              "use letters, digits, '_', '.', '*', '-' only")
            out[pattern] = _tensor_type(t)
        return out

    def needs_imatrix(self) -> bool:
        chosen = [self.output_tensor_type, self.token_embedding_type, *self.tensor_types.values()]
        return any(t in TENSOR_TYPES_NEEDING_IMATRIX for t in chosen if t)

    def args(self) -> list[str]:
        out: list[str] = []
        if self.output_tensor_type:
            out += ["--output-tensor-type", self.output_tensor_type]
        if self.token_embedding_type:
            out += ["--token-embedding-type", self.token_embedding_type]
        for pattern, t in sorted(self.tensor_types.items()):
            out += ["--tensor-type", f"{pattern}={t}"]
        return out


def _tensor_type(v: str) -> str:
    low = v.lower()
    if low not in TENSOR_TYPES:
        raise Invalid(f"unknown ggml tensor type '{v}'", _suggest(low, TENSOR_TYPES) or f"use one of {', '.join(TENSOR_TYPES)}")
    return low


def _suggest(value: str, choices) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else ""


def _quant_type(v: str) -> str:
    if v in QUANT_TYPES:
        return v
    if v in ALIASES:
        raise Invalid(f"'{v}' is an alias of {ALIASES[v]}", f"write {ALIASES[v]} so the file name says what it is")
    if v.upper() in QUANT_TYPES:
        raise Invalid(f"unknown llama-quantize type '{v}' (names are case-sensitive)", f"write {v.upper()}")
    raise Invalid(f"unknown llama-quantize type '{v}'",
                  _suggest(v.upper(), QUANT_TYPES) or "run `llama-quantize --help` for the list of type names")


class GGUFVariant(TensorOverrides):
    """One llama-quantize output. ``imatrix: null`` follows the gguf.imatrix setting."""

    type: str
    label: SafeName | None = Field(None, description="unique name of the variant (default: type, '-noimat' suffix)")
    imatrix: bool | None = None

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        return _quant_type(v)


class ImatrixSpec(Section):
    enabled: bool = True
    ctx: int = Field(512, ge=16, le=131_072)
    chunks: int = Field(100, ge=1, le=100_000)
    # Mixture-of-experts models (quantkit.experts): an expert routed fewer calibration tokens than this
    # has too little importance data. A few dozen tokens is a guess at "some", not a measured threshold;
    # 0 acts only on experts that got none.
    min_expert_tokens: int = Field(32, ge=0, le=10_000_000,
                                   description="experts with fewer imatrix tokens are uncovered (MoE models)")
    uncovered_experts: Literal["fallback", "refuse"] = Field(
        "fallback", description="for types that need an imatrix: give uncovered layers' expert tensors q4_k "
                                "(fallback, named in the report) or refuse the variant")


class FitsBudget(Section):
    """Memory the GGUF must fit in at a context length: weights + KV cache + headroom (quantkit.publish.hardware)."""

    memory_gib: float = Field(gt=0, le=4096)
    ctx: int = Field(ge=16, le=1_048_576)


# The smallest candidate of the budget search (quantkit.budget.CANDIDATES): Q2_K blocks are 84 bytes per
# 256 weights. No mix of the candidates can go below it.
MIN_TARGET_BPW = 2.625


class GGUFTarget(Section):
    """A budget for a searched per-tensor mix: exactly one of size_gib, bpw, fits."""

    size_gib: float | None = Field(None, gt=0, le=4096, description="file size at most this many GiB")
    bpw: float | None = Field(None, gt=0, le=32, description="file bits per weight at most this")
    fits: FitsBudget | None = Field(None, description="weights + KV cache (f16) + headroom fit this memory")
    label: SafeName | None = Field(None, description="unique name of the variant (default target-4.50bpw, "
                                   "target-8GiB, target-8GiB-8k)")

    @model_validator(mode="after")
    def _one_budget(self) -> GGUFTarget:
        given = [k for k in ("size_gib", "bpw", "fits") if getattr(self, k) is not None]
        if len(given) != 1:
            raise Invalid(f"a target needs exactly one budget, found {len(given)}" + (f" ({', '.join(given)})" if given else ""),
                          "write one of {bpw: 4.5}, {size_gib: 4}, {fits: {memory_gib: 8, ctx: 8192}}")
        if self.bpw is not None and self.bpw < MIN_TARGET_BPW:
            raise Invalid(f"no mix can meet {self.bpw} bits per weight: the smallest candidate type (Q2_K) "
                          f"takes {MIN_TARGET_BPW}", f"use bpw >= {MIN_TARGET_BPW}", loc=("bpw",))
        return self

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.bpw is not None:
            return f"target-{self.bpw:.2f}bpw"
        if self.size_gib is not None:
            return f"target-{self.size_gib:g}GiB"
        ctx = self.fits.ctx
        return f"target-{self.fits.memory_gib:g}GiB-" + (f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx))


class GGUFSection(Section):
    base_type: Literal["f16", "bf16", "f32"] = "f16"
    imatrix: ImatrixSpec = ImatrixSpec()
    types: list[GGUFVariant] = Field(default_factory=list, max_length=64)
    targets: list[GGUFTarget] = Field(default_factory=list, max_length=16,
                                      description="budgets for searched per-tensor mixes (quantkit.budget)")
    overrides: TensorOverrides = TensorOverrides()

    @field_validator("types", mode="before")
    @classmethod
    def _strings_are_types(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"type": t} if isinstance(t, str) else t for t in v]
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> GGUFSection:
        if not self.types and not self.targets:
            raise Invalid("gguf makes no variant", "list llama-quantize types under 'types' or budgets under 'targets'")
        if self.targets and not self.imatrix.enabled:
            raise Invalid("gguf.targets need the importance matrix: the search weights each tensor's error by it",
                          "set gguf.imatrix.enabled: true", loc=("targets",))
        for i, variant in enumerate(self.types):
            use_imatrix = self.uses_imatrix(variant)
            qt = QUANT_TYPES[variant.type]
            if not use_imatrix and (qt.needs_imatrix or variant.needs_imatrix() or self.overrides.needs_imatrix()):
                raise Invalid(f"types[{i}]: {variant.type} needs an importance matrix (llama-quantize refuses it without one)",
                              "set gguf.imatrix.enabled: true and do not set imatrix: false on this type")
        return self

    def uses_imatrix(self, variant: GGUFVariant) -> bool:
        return self.imatrix.enabled if variant.imatrix is None else (variant.imatrix and self.imatrix.enabled)

    def label(self, variant: GGUFVariant) -> str:
        if variant.label:
            return variant.label
        return variant.type if self.uses_imatrix(variant) or not self.imatrix.enabled else f"{variant.type}-noimat"

    def override_args(self, variant: GGUFVariant) -> list[str]:
        """Section-wide overrides, with the variant's own taking precedence."""
        merged = TensorOverrides(
            output_tensor_type=variant.output_tensor_type or self.overrides.output_tensor_type,
            token_embedding_type=variant.token_embedding_type or self.overrides.token_embedding_type,
            tensor_types={**self.overrides.tensor_types, **variant.tensor_types},
        )
        return merged.args()


def _group_size(v: int) -> int:
    if v != -1 and not (16 <= v <= 1024 and v & (v - 1) == 0):
        raise Invalid(f"group_size {v} is not supported", "use -1 (per channel) or a power of two from 16 to 1024, e.g. 128")
    return v


class GPTQVariant(Section):
    """GPTQ settings; the defaults are the seed's (bits 4, group 128, desc_act, damp 0.1)."""

    label: SafeName | None = Field(None, description="unique name of the variant (default GPTQ-<bits>bit-g<group>)")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="-1 (per channel) or a power of two from 16 to 1024")
    desc_act: bool = True
    sym: bool = True
    damp_percent: float = Field(0.1, gt=0, lt=1)
    samples: int = Field(128, ge=1, le=4096)
    seq_len: int = Field(512, ge=16, le=32_768)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    _group = field_validator("group_size")(_group_size)

    @property
    def name(self) -> str:
        return self.label or f"GPTQ-{self.bits}bit-g{self.group_size}"


class AWQVariant(Section):
    """AWQ settings; defaults are the seed's (w_bit 4, group 128, zero point, GEMM)."""

    label: SafeName | None = Field(None, description="unique name of the variant (default AWQ-<bits>bit-g<group>)")
    w_bit: Literal[4] = 4
    q_group_size: Literal[32, 64, 128] = 128
    zero_point: bool = True
    version: Literal["GEMM"] = "GEMM"
    samples: int = Field(128, ge=1, le=4096)
    seq_len: int = Field(512, ge=16, le=32_768)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    clip: bool = Field(True, description="AWQ's clipping search after the scale search (AutoAWQ's apply_clip): "
                       "a grid over each linear's weight range; on a CPU most of AWQ's time")

    @property
    def name(self) -> str:
        return self.label or f"AWQ-{self.w_bit}bit-g{self.q_group_size}"

    # The names GPTQ and RTN variants use, so code reading any checkpoint spec asks one way.
    @property
    def bits(self) -> int:
        return self.w_bit

    @property
    def group_size(self) -> int:
        return self.q_group_size

    @property
    def sym(self) -> bool:
        return not self.zero_point  # GPTQModel's "sym" is the opposite of AWQ's zero point


class RTNVariant(Section):
    """Plain round-to-nearest in GPTQ's format (GPTQModel's weight-only RTN, no calibration, no smoothing): a
    reference that the GPTQ and AWQ variants of the same bits and group size must beat. Scored and shown in
    the report, never recommended, gated or published."""

    label: SafeName | None = Field(None, description="unique name of the variant (default RTN-<bits>bit-g<group>, "
                                   "'-asym' added when sym is false)")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="-1 (per channel) or a power of two from 16 to 1024")
    sym: bool = Field(True, description="symmetric like GPTQ's default; false: a zero point per group, like AWQ's")

    _group = field_validator("group_size")(_group_size)

    @property
    def name(self) -> str:
        return self.label or f"RTN-{self.bits}bit-g{self.group_size}" + ("" if self.sym else "-asym")


class PublishThresholds(Section):
    """When a re-run may replace the last published one (see quantkit.publish.release.regression_gate)."""

    max_kld_increase: float = Field(0.10, ge=0, le=10, description="allowed rise of a variant's mean KLD over the "
                                    "last published run, as a fraction of it (0.10 = +10%)")
    max_task_drop: float = Field(0.01, ge=0, le=1, description="allowed drop of a task score (absolute, 0..1)")
    min_recovery_gptq: float = Field(0.94, ge=0, le=1, description="GPTQ task score / base score must reach this")
    min_recovery_awq: float = Field(0.90, ge=0, le=1, description="AWQ task score / base score must reach this")
    min_recovery_gguf: float | None = Field(None, ge=0, le=1, description="same for GGUF variants; off by default")
    recommend_max_kld: float = Field(0.05, gt=0, le=10, description="the report recommends the smallest variant "
                                     "whose mean KLD is under this")
    gate_sigmas: float = Field(3.0, ge=1, le=10, description="standard errors each gate check's bounds lie from "
                               "its estimate (3: one-sided 99.87 % under a normal error); a check fails only when "
                               "its optimistic bound misses the limit")
    strict: bool = Field(False, description="inconclusive checks (bounds straddling the limit) block publishing too")


HUB_FORMATS = ("gguf", "gptq", "awq")
HUB_PLACEHOLDERS = {"gguf": {"owner", "model"}, "gptq": {"owner", "model", "bits", "group"},
                    "awq": {"owner", "model", "bits", "group"}}
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def _template_fields(template: str) -> list[str]:
    """The ``{placeholder}`` names of a repo template; a stray brace or a format spec is refused."""
    import string

    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise Invalid(f"'{template}' is not a valid repo template ({e})",
                      "write placeholders as {owner}, {model}, {bits}, {group}; no other braces") from None
    out = []
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if spec or conversion or not field.isidentifier():
            raise Invalid(f"'{template}': placeholder '{{{field}{'!' + conversion if conversion else ''}"
                          f"{':' + spec if spec else ''}}}' is not a plain name",
                          "write placeholders as {owner}, {model}, {bits}, {group}")
        out.append(field)
    return out


class HubRepos(Section):
    """Hub repo id templates, one repo per format (the names publishers use: …-GGUF, …-GPTQ-…, …-AWQ).

    Placeholders: {owner} (publish.owner), {model} (the model's name, as in the GGUF file names),
    and for GPTQ/AWQ {bits} and {group} (group size; -1 is per channel)."""

    gguf: str = Field("{owner}/{model}-GGUF", max_length=200)
    gptq: str = Field("{owner}/{model}-GPTQ-{bits}bit-g{group}", max_length=200)
    awq: str = Field("{owner}/{model}-AWQ", max_length=200)

    @field_validator("gguf", "gptq", "awq")
    @classmethod
    def _known_placeholders(cls, v: str, info: ValidationInfo) -> str:
        allowed = HUB_PLACEHOLDERS[info.field_name]
        unknown = [f for f in _template_fields(v) if f not in allowed]
        if unknown:
            raise Invalid(f"'{v}' uses {', '.join('{' + f + '}' for f in unknown)}, unknown for {info.field_name} repos",
                          f"use only {', '.join('{' + f + '}' for f in sorted(allowed))}")
        return v


HUB_MAX_FILE_GIB = 46.5  # the Hub refuses files over 50 GB (46.57 GiB); a split GGUF's shards stay under it


class Publish(Section):
    """Where a scored run goes: the local artifact store (always), and the Hub when target is 'hub':
    one repo per format, named by ``repos`` (templates over owner, model, bits and group size)."""

    target: Literal["local", "hub"] = "local"
    owner: str | None = Field(None, description="Hub user or organisation the repos go to (target 'hub')")
    repos: HubRepos = Field(HubRepos(), description="repo id templates per format, e.g. gguf: '{owner}/{model}-GGUF'")
    repo: str | None = Field(None, description="older form: the GGUF repo id (owner/name); owner defaults to its "
                             "owner, the GPTQ/AWQ repos still follow 'repos'")
    private: bool = Field(True, description="create the Hub repos private")
    dir: ProjectDir = Field("artifacts", validate_default=True,
                            description="local artifact store: <dir>/<recipe>/<run-id>/ and latest")
    max_file_gib: float = Field(HUB_MAX_FILE_GIB, gt=0, le=HUB_MAX_FILE_GIB,
                                description="a GGUF larger than this is published as llama-gguf-split shards "
                                "(default: just under the Hub's 50 GB per-file limit)")
    thresholds: PublishThresholds = PublishThresholds()

    _repo = field_validator("repo")(_repo_id)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_gib * 2**30)

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str | None) -> str | None:
        if v is not None and not OWNER_RE.match(v):
            raise Invalid(f"'{v}' is not a Hugging Face user or organisation name",
                          "write the name alone, e.g. my-org (letters, digits, '.', '_', '-')")
        return v

    @model_validator(mode="after")
    def _target(self) -> Publish:
        if self.target == "hub" and self.repo is None and self.owner is None:
            raise Invalid("publish.target is 'hub' but there is no 'owner' (and no 'repo')",
                          "add owner: <your user or organisation>")
        if self.target == "local" and (self.repo is not None or self.owner is not None):
            key = "repo" if self.repo is not None else "owner"
            raise Invalid(f"publish.{key} '{getattr(self, key)}' is set but target is 'local'",
                          f"set target: hub to upload, or remove {key}")
        if self.repo is not None and "gguf" in self.repos.model_fields_set:
            raise Invalid("publish.repo and publish.repos.gguf both name the GGUF repo",
                          "keep repos.gguf and remove repo", loc=("repo",))
        return self

    @property
    def hub_owner(self) -> str | None:
        return self.owner or (self.repo.split("/")[0] if self.repo else None)

    def repo_id(self, fmt: str, *, model: str, bits: int | None = None, group: int | None = None) -> str:
        """The Hub repo id of one format's repo (not validated: see ``hub_repo_ids``)."""
        if fmt == "gguf" and self.repo is not None:
            return self.repo
        return getattr(self.repos, fmt).format(owner=self.hub_owner, model=model, bits=bits, group=group)

    def hub_repo_ids(self, recipe: Recipe) -> list[tuple[tuple, str, str, str]]:
        """``(recipe path, format, variant label, repo id)`` of every variant published to the Hub (the
        base checkpoint is not: it is on the Hub already). Raises Invalid, naming the recipe path, for a
        repo id the Hub would refuse and for two GPTQ or AWQ configs that would share one repo."""
        model = recipe.model.display_name
        labels = {loc: label for loc, _, label in recipe.variant_labels()}
        out: list[tuple[tuple, str, str, str]] = []
        if recipe.gguf:
            out += [(("gguf", "types", i), "gguf", labels[("gguf", "types", i)], self.repo_id("gguf", model=model))
                    for i in range(len(recipe.gguf.types))]
        out += [(("gptq", i), "gptq", labels[("gptq", i)],
                 self.repo_id("gptq", model=model, bits=v.bits, group=v.group_size)) for i, v in enumerate(recipe.gptq)]
        out += [(("awq", i), "awq", labels[("awq", i)],
                 self.repo_id("awq", model=model, bits=v.w_bit, group=v.q_group_size)) for i, v in enumerate(recipe.awq)]
        seen: dict[str, tuple] = {}
        for loc, fmt, label, repo_id in out:
            where = ("publish", "repo") if fmt == "gguf" and self.repo else ("publish", "repos", fmt)
            if not REPO_RE.match(repo_id) or len(repo_id) > 96:
                raise Invalid(f"the {fmt} repo of {dotted(loc)} would be '{repo_id}', not a Hugging Face repo id",
                              "make owner and the template give owner/name with letters, digits, '.', '_', '-' "
                              "(at most 96 characters)", loc=where)
            first = seen.setdefault(repo_id, loc)
            if first != loc and first[0] != loc[0]:
                raise Invalid(f"{dotted(first)} and {dotted(loc)} would both publish to {repo_id}: "
                              "one repo per format", "give each format its own repo template", loc=where)
            if first != loc and fmt != "gguf":
                raise Invalid(f"{dotted(first)} and {dotted(loc)} would both publish to {repo_id}",
                              f"add {{bits}} and {{group}} to publish.repos.{fmt}, or drop one of them", loc=where)
        return out


class Output(Section):
    dir: ProjectDir = Field("runs", validate_default=True, description="run folders (manifest, links to outputs) go here")


CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
CRON_PART_RE = re.compile(r"^(\*|(\d{1,2})(-(\d{1,2}))?)(/(\d{1,2}))?$")


class Schedule(Section):
    """A nightly (or other) cron for the recipe's deployment; without it the deployment has no schedule."""

    cron: str = Field(description="five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *'")
    timezone: str = Field("UTC", description="IANA name, e.g. UTC or Europe/Berlin")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        fields = v.split()
        if len(fields) != 5:
            raise Invalid(f"cron '{v}' has {len(fields)} fields, expected 5",
                          "write minute hour day month weekday, e.g. '0 2 * * *'")
        for text, (what, lo, hi) in zip(fields, CRON_FIELDS):
            for part in text.split(","):
                m = CRON_PART_RE.match(part)
                numbers = [int(g) for g in (m.group(2), m.group(4)) if g] if m else []
                if not m or any(not lo <= n <= hi for n in numbers) or (m.group(6) and int(m.group(6)) == 0):
                    raise Invalid(f"cron {what} field '{text}' is not valid",
                                  f"use *, a number {lo}-{hi}, a range a-b, a list a,b or a step */n "
                                  "(no names like MON)")
        return " ".join(fields)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        import zoneinfo

        if v not in zoneinfo.available_timezones():
            raise Invalid(f"unknown timezone '{v}'",
                          _suggest(v, zoneinfo.available_timezones()) or "use an IANA name such as UTC")
        return v


class ToolchainPin(Section):
    """The llama.cpp toolchain: quantkit's pinned llama-cpp-python sdist unless ``version`` names another
    release (pinned by its sha256); ``track`` is what `quantkit run --track` follows (docs/nightly.md)."""

    version: str | None = Field(None, description="llama-cpp-python sdist version, e.g. 0.3.37 (default: "
                                "quantkit's pin)")
    sdist_sha256: str | None = Field(None, description="sha256 of that sdist (64 hex); required with 'version'")
    track: str | None = Field(None, description="'latest', or a version range such as '>=0.3.36,<0.4'")

    @field_validator("version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None and not RELEASE_RE.match(v):
            raise Invalid(f"version '{v}' is not a release number", "write a release such as 0.3.37")
        return v

    @field_validator("sdist_sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not SDIST_SHA_RE.match(v):
            raise Invalid("sdist_sha256 is not a sha256", "write the sdist's 64 lowercase hex digits")
        return v

    @field_validator("track")
    @classmethod
    def _track(cls, v: str | None) -> str | None:
        if v is None or v == "latest":
            return v
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:
            spec = SpecifierSet(v)
        except InvalidSpecifier:
            spec = None
        if spec is None or not len(spec) or not SAFE_TEXT_RE.match(v.replace("<", "").replace(">", "").replace("!", "")
                                                                    .replace("~", "")):
            raise Invalid(f"track '{v}' is not 'latest' or a version range", "write latest, or e.g. '>=0.3.36,<0.4'")
        return v

    @model_validator(mode="after")
    def _pinned(self) -> ToolchainPin:
        if (self.version is None) != (self.sdist_sha256 is None):
            raise Invalid("'version' and 'sdist_sha256' go together: a release is pinned by its bytes",
                          "give both (`quantkit run --track` writes them), or neither for quantkit's pin",
                          loc=("version",) if self.version is not None else ("sdist_sha256",))
        return self


class Serve(Section):
    """The serve check (quantkit.serving): each GGUF chats through llama-server --jinja, each GPTQ/AWQ
    checkpoint in transformers on the CPU; an artifact whose check fails is not published."""

    max_tokens: int = Field(64, ge=4, le=4096, description="bound on each reply: a reply that has not stopped "
                            "by then fails 'did not stop'")
    start_timeout_s: float = Field(60.0, gt=0, le=3600, description="how long llama-server may take to be ready")


class Recipe(Section):
    """One reproducible run. ``name`` becomes the Prefect deployment name."""

    name: str = Field(description="[a-z0-9._-]+; becomes the deployment name quantize/<name>")
    description: str | None = Field(None, max_length=2000)
    model: ModelSource
    calibration: Calibration
    evaluation: Evaluation | None = None
    gguf: GGUFSection | None = None
    gptq: list[GPTQVariant] = Field(default_factory=list, max_length=16)
    awq: list[AWQVariant] = Field(default_factory=list, max_length=16)
    rtn: list[RTNVariant] = Field(default_factory=list, max_length=16,
                                  description="round-to-nearest references: scored and reported, never published")
    serve: Serve | None = Field(None, description="serve each artifact before publishing ({} for the defaults)")
    output: Output = Field({}, validate_default=True)  # a dict, so its default dir is checked like a given one
    publish: Publish | None = Field(None, description="publishing and the regression gate; local store if absent")
    schedule: Schedule | None = Field(None, description="cron for the deployment (none: runs only when asked)")
    toolchain: ToolchainPin | None = Field(None, description="another llama.cpp release, or what --track follows")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise Invalid(f"name '{v}' is not a valid deployment name",
                          "use lowercase letters, digits, '.', '_' and '-' only (at most 64), e.g. llama-8b")
        return v

    @field_validator("description")
    @classmethod
    def _description(cls, v: str | None) -> str | None:
        if v is not None and any(ord(c) < 32 and c not in "\n\t" for c in v):
            raise Invalid("description contains control characters", "remove them")
        return None if v is None else no_templating(v)

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> Recipe:
        if self.gguf is None and not self.gptq and not self.awq:
            raise Invalid("the recipe produces nothing" + (" to publish: rtn variants are references only" if self.rtn
                                                           else ""), "add a 'gguf', 'gptq' or 'awq' section")
        if self.rtn and self.evaluation is None:
            raise Invalid("rtn variants are references for comparison, and without 'evaluation' nothing is compared",
                          "add an 'evaluation' section, or remove 'rtn'", loc=("rtn",))
        if self.evaluation and self.calibration.files and self.evaluation.file in self.calibration.files:
            raise Invalid(f"evaluation.file '{self.evaluation.file}' is also calibration text",
                          "score on held-out text: scores on text the quantizer saw are not evidence")
        for i, s in enumerate(self.evaluation.sets if self.evaluation else []):
            if s.file in (self.calibration.files or []) + self.calibration.conversations:
                raise Invalid(f"evaluation set '{s.name}' ({s.file}) is also calibration text",
                              "score on held-out text: scores on text the quantizer saw are not evidence",
                              loc=("evaluation", "sets", i, "file"))
        lines = (info.context or {}).get("lines", {})
        seen: dict[str, tuple] = {}
        for loc, _, label in self.variant_labels():
            if label in seen:
                first = seen[label]
                at = f" (line {lines[first]})" if first in lines else ""
                raise Invalid(f"variant '{label}' is made twice: by {dotted(loc)} and by {dotted(first)}{at}; "
                              "both would write the same files", "give one of them a different 'label'", loc=loc)
            seen[label] = loc
        if self.publish is not None and self.publish.target == "hub":
            self.publish.hub_repo_ids(self)  # one valid repo per format and per GPTQ/AWQ config
        if self.publish is None:  # publishing still writes to the default artifacts/: check it as if given
            try:
                _project_dir(Publish.model_fields["dir"].default, info)
            except Invalid as e:
                raise Invalid(str(e), e.fix, loc=("publish", "dir")) from None
        return self

    def variant_labels(self) -> list[tuple[tuple, str, str]]:
        """``(recipe path, format, label)`` of every variant the recipe makes, defaults included: the one
        place labels are decided (they name files, so each is unique across formats)."""
        out: list[tuple[tuple, str, str]] = []
        if self.gguf:
            out.append((("gguf", "base_type"), "gguf", self.gguf.base_type.upper()))
            out += [(("gguf", "types", i), "gguf", self.gguf.label(v)) for i, v in enumerate(self.gguf.types)]
            out += [(("gguf", "targets", i), "gguf", t.name) for i, t in enumerate(self.gguf.targets)]
        out += [(("gptq", i), "gptq", v.name) for i, v in enumerate(self.gptq)]
        out += [(("awq", i), "awq", v.name) for i, v in enumerate(self.awq)]
        out += [(("rtn", i), "rtn", v.name) for i, v in enumerate(self.rtn)]
        return out


# --- loading -------------------------------------------------------------------------------------

def find_project_root(start: Path) -> Path:
    """The nearest folder above ``start`` with a pyproject.toml or a recipes/ folder."""
    env = os.environ.get("QUANTKIT_PROJECT")
    if env:
        return Path(env).resolve()
    start = start.resolve()
    for folder in [start, *start.parents]:
        if (folder / "pyproject.toml").is_file() or (folder / "recipes").is_dir():
            return folder
    return start


_FIXES = {
    "extra_forbidden": "remove it, or check its spelling against `quantkit schema`",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
}


def _fix_for(err: dict) -> str:
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, Invalid):
        return cause.fix
    if err["type"] in _FIXES:
        return _FIXES[err["type"]]
    if err["type"].endswith("_type") or err["type"].endswith("_parsing"):
        return "use a value of the expected type"
    if "too_long" in err["type"] or "too_short" in err["type"] or "less_than" in err["type"] or "greater_than" in err["type"]:
        return "use a value inside the allowed range"
    return "see `quantkit schema` for what this field accepts"


def _problems(e: pydantic.ValidationError, file: str, lines: dict) -> list[Problem]:
    out = []
    for err in e.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in {"function-after", "str", "int"}))
        # Pydantic puts the variant's tag into loc for unions; keep only real path parts.
        path = tuple(p for p in loc if isinstance(p, int) or not p.startswith("function-"))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, Invalid) and cause.loc:
            path = path + cause.loc
        line = 0
        for cut in range(len(path), -1, -1):
            if path[:cut] in lines:
                line = lines[path[:cut]]
                break
        msg = err["msg"]
        msg = msg.removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{path[-1]}'"
        out.append(Problem(file, line, dotted(path), msg, _fix_for(err)))
    return sorted(out, key=lambda p: p.line)


def load_recipe(path: str | Path, *, root: Path | None = None) -> Recipe:
    """Read and validate a recipe file; raise RecipeError listing every problem.

    No input file makes this raise anything else: an unexpected exception while loading becomes a
    RecipeError naming the file, chained to the original (the CLI shows it under --debug).
    """
    path = Path(path)
    root = root or find_project_root(path.parent)
    display = os.path.relpath(path.resolve(), root) if path.resolve().is_relative_to(root) else str(path)
    try:
        return _load(path, root, display)
    except RecipeError:
        raise
    except Exception as e:  # a bug or a limit we did not foresee: still one line naming the file
        raise RecipeError([Problem(display, 0, "", f"could not load the recipe ({type(e).__name__}: {e})"[:500],
                                   "simplify the file; run with --debug for the traceback and report it")]) from e


def _load(path: Path, root: Path, display: str) -> Recipe:
    data, lines = load_yaml(path, display)
    if not isinstance(data, dict):
        raise RecipeError([Problem(display, 1, "", "a recipe is a mapping of keys to values",
                                   "start from a recipe in recipes/")])
    try:
        recipe = Recipe.model_validate(data, context={"root": root, "lines": lines})
    except pydantic.ValidationError as e:
        raise RecipeError(_problems(e, display, lines)) from None
    problems = _check_files(recipe, root, display, lines)
    if problems:
        raise RecipeError(problems)
    from quantkit.recipefiles import resolve_mmproj  # a local model's config.json decides model.mmproj

    return resolve_mmproj(recipe, root, display, lines)


def _check_files(recipe: Recipe, root: Path, file: str, lines: dict) -> list[Problem]:
    """Files the recipe names must exist (the model folder may be made later by a setup step)."""
    wanted: list[tuple[tuple, str]] = []
    for i, f in enumerate(recipe.calibration.files or []):
        wanted.append((("calibration", "files", i), f))
    for i, f in enumerate(recipe.calibration.conversations):
        wanted.append((("calibration", "conversations", i), f))
    if recipe.evaluation:
        wanted.append((("evaluation", "file"), recipe.evaluation.file))
        wanted += [(("evaluation", "sets", i, "file"), s.file) for i, s in enumerate(recipe.evaluation.sets)]
    from quantkit.recipefiles import pointed_problems  # symlinks, local tasks that are not data

    out = pointed_problems(recipe, root, file, lines)
    linked = any(p.file == file for p in out)  # a link: then nothing below reads a file (it could follow it)
    for loc, rel in wanted:
        p = root / rel
        if not p.is_file():
            out.append(Problem(file, lines.get(loc, 0), dotted(loc), f"file '{rel}' does not exist",
                               "add the file or fix the path"))
    if recipe.evaluation and recipe.calibration.files and not linked:
        eval_bytes = (root / recipe.evaluation.file).read_bytes() if (root / recipe.evaluation.file).is_file() else b""
        for i, f in enumerate(recipe.calibration.files):
            p = root / f
            if eval_bytes and p.is_file() and _overlap(p.read_bytes(), eval_bytes):
                loc = ("evaluation", "file")
                out.append(Problem(file, lines.get(loc, 0), dotted(loc),
                                   f"evaluation text shares paragraphs with calibration file '{f}'",
                                   "use held-out text that the calibration never saw"))
    if recipe.evaluation and (recipe.evaluation.sets or recipe.calibration.conversations) and not linked:
        out += _check_sets(recipe, root, file, lines)
    return out


def _check_sets(recipe: Recipe, root: Path, file: str, lines: dict) -> list[Problem]:
    """Each more evaluation set: a chat set must be conversations (its own file:line names the bad one), and
    no set may share a paragraph (or, for chat, a message) with the calibration text."""
    from quantkit.scoring.chat import ChatSetError, parse_conversations

    out = []
    calib = [(f, (root / f).read_bytes()) for f in recipe.calibration.files or [] if (root / f).is_file()]
    for i, f in enumerate(recipe.calibration.conversations):
        if (root / f).is_file():
            try:
                texts = [t for c in parse_conversations((root / f).read_bytes()) for t in c.texts()]
            except ChatSetError as e:
                loc = ("calibration", "conversations", i)
                out.append(Problem(f, e.line, dotted(loc), f"calibration conversations: {e.message}",
                                   "write one {\"messages\": [{\"role\": ..., \"content\": ...}]} object per line"))
                continue
            calib.append((f, "\n\n".join(texts).encode()))
    convs = set(recipe.calibration.conversations)
    for i, s in [(None, recipe.evaluation.all_sets()[0]), *enumerate(recipe.evaluation.sets)]:
        loc = ("evaluation", "file") if i is None else ("evaluation", "sets", i, "file")
        p = root / s.file
        if not p.is_file():
            continue  # reported as missing above
        data = p.read_bytes()
        if s.kind == "chat":
            try:
                data = "\n\n".join(t for c in parse_conversations(data) for t in c.texts()).encode()
            except ChatSetError as e:
                out.append(Problem(s.file, e.line, dotted(loc), f"chat set '{s.name}': {e.message}",
                                   "write one {\"messages\": [{\"role\": ..., \"content\": ...}]} object per line"))
                continue
        for f, cb in calib:
            if i is None and f not in convs:
                continue  # evaluation.file against the text files: checked above
            if _overlap(cb, data):
                out.append(Problem(file, lines.get(loc, 0), dotted(loc),
                                   f"evaluation set '{s.name}' shares paragraphs with calibration file '{f}'",
                                   "use held-out text that the calibration never saw"))
    return out


def _overlap(calib: bytes, evaluation: bytes) -> bool:
    """True if any substantial paragraph of the evaluation text also appears in the calibration text."""
    def paragraphs(b: bytes) -> set[bytes]:
        return {p.strip() for p in b.split(b"\n\n") if len(p.strip()) >= 80}
    return bool(paragraphs(calib) & paragraphs(evaluation))


def schema() -> dict:
    return Recipe.model_json_schema()

"""The recipe's model, calibration and evaluation sections."""

from __future__ import annotations


import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, ValidationInfo, field_validator, model_validator

from quantkit.paths import name_problem
from quantkit.recipe.fields import (COMMIT_RE, Invalid, ProjectPath, SafeName, SafeText, Section, TRACK_RE,
                                    WORKER_ALLOWS_PICKLE, WORKER_ALLOWS_REMOTE_CODE, _pinned_revision, _project_path,
                                    _repo_id)


class ModelSource(Section):
    """Where the unquantized model comes from: a pinned Hub revision or a local folder."""

    repo: str | None = Field(None, description="Hugging Face repo id, e.g. meta-llama/Llama-3.1-8B-Instruct")
    revision: str | None = Field(None, description="commit sha (40 hex) or tag; branches move and are refused")
    path: ProjectPath | None = Field(None, description="local HF checkpoint folder, relative to the project")
    name: SafeName | None = Field(None, description="name used in file names and GGUF metadata")
    allow_pickle: bool = Field(False, description="allow pickle .bin/.pt weights (they can run code on load)")
    trust_remote_code: bool = Field(False, description=f"needs the worker to set {WORKER_ALLOWS_REMOTE_CODE}=1 too")
    mmproj: bool | None = Field(None, description="convert the vision projector (mmproj-<name>-f16.gguf) beside the "
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


class CompareFile(Section):
    """Another publisher's GGUF of the same base model (``compare:``): scored on every evaluation set with the
    same base logits, shown as an "external" row beside the ladder, never published nor recommended."""

    label: SafeName = Field(description="its row in the report, e.g. bartowski-Q4_K_M")
    file: str = Field(description="a .gguf inside the project; with 'repo', the file's path in that repo")
    repo: str | None = Field(None, description="the publisher's Hugging Face repo id, e.g. bartowski/Model-GGUF")
    revision: str | None = Field(None, description="with 'repo': the commit sha (40 hex) the file is pinned at")

    _repo = field_validator("repo")(_repo_id)

    @model_validator(mode="after")
    def _where(self, info: ValidationInfo) -> CompareFile:
        if not self.file.endswith(".gguf"):
            raise Invalid(f"'{self.file}' is not a .gguf file", "compare GGUF files of the same base model",
                          loc=("file",))
        if self.repo is None:
            if self.revision is not None:
                raise Invalid("'revision' pins a file in a Hub repo, and no 'repo' is given",
                              "add the repo, or drop 'revision' for a file inside the project", loc=("revision",))
            try:
                if _project_path(self.file, info) != self.file:
                    raise Invalid(f"write '{self.file}' as {PurePosixPath(self.file)}", "use the plain relative path")
            except Invalid as e:
                raise Invalid(str(e), e.fix, loc=("file",)) from None
            return self
        if self.revision is None or not COMMIT_RE.match(self.revision):
            raise Invalid(f"revision {self.revision!r} does not pin the file: a Hub file is compared at one commit",
                          "write the repo's commit sha (40 lowercase hex digits)", loc=("revision",))
        parts = PurePosixPath(self.file).parts
        if self.file.startswith("/") or any(name_problem(p) for p in parts):  # refuses "." and ".." too
            raise Invalid(f"'{self.file}' is not a file path inside a repo",
                          "write the path as the repo lists it, e.g. Model-Q4_K_M.gguf", loc=("file",))
        return self

"""The recipe's publish, output, schedule, toolchain and serve sections."""

from __future__ import annotations


import re
from typing import Literal, TYPE_CHECKING

from pydantic import Field, ValidationInfo, field_validator, model_validator

from quantkit.formats import FORMATS
from quantkit.recipe.fields import (Invalid, ProjectDir, RELEASE_RE, REPO_RE, SAFE_TEXT_RE, SDIST_SHA_RE, Section,
                                    _repo_id)
from quantkit.recipe.fields import suggest
from quantkit.yamlsrc import dotted

if TYPE_CHECKING:  # the method below only names it; document.py imports this module
    from quantkit.recipe.document import Recipe


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
        # a checkpoint's repo holds one config, named by its bits and group size; a GGUF repo holds every type
        allowed = {"owner", "model"} | ({"bits", "group"} if FORMATS[info.field_name].checkpoint else set())
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
        if self.repo is not None and any(FORMATS[f].llama_cpp for f in self.repos.model_fields_set):
            raise Invalid("publish.repo and publish.repos.gguf both name the GGUF repo",
                          "keep repos.gguf and remove repo", loc=("repo",))
        return self

    @property
    def hub_owner(self) -> str | None:
        return self.owner or (self.repo.split("/")[0] if self.repo else None)

    def repo_id(self, fmt: str, *, model: str, bits: int | None = None, group: int | None = None) -> str:
        """The Hub repo id of one format's repo (not validated: see ``hub_repo_ids``)."""
        if FORMATS[fmt].llama_cpp and self.repo is not None:
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
            where = ("publish", "repo") if FORMATS[fmt].llama_cpp and self.repo else ("publish", "repos", fmt)
            if not REPO_RE.match(repo_id) or len(repo_id) > 96:
                raise Invalid(f"the {fmt} repo of {dotted(loc)} would be '{repo_id}', not a Hugging Face repo id",
                              "make owner and the template give owner/name with letters, digits, '.', '_', '-' "
                              "(at most 96 characters)", loc=where)
            first = seen.setdefault(repo_id, loc)
            if first != loc and first[0] != loc[0]:
                raise Invalid(f"{dotted(first)} and {dotted(loc)} would both publish to {repo_id}: "
                              "one repo per format", "give each format its own repo template", loc=where)
            if first != loc and FORMATS[fmt].checkpoint:  # the GGUF types share their one repo
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
                          suggest(v, zoneinfo.available_timezones()) or "use an IANA name such as UTC")
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

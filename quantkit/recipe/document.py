"""The whole recipe: its sections and the rules that join them."""

from __future__ import annotations

import typing

from pydantic import Field, ValidationInfo, field_validator, model_validator

from quantkit.recipe.fields import Invalid, NAME_RE, Section, _project_dir, no_templating
from quantkit.recipe.model import Calibration, CompareFile, Evaluation, ModelSource
from quantkit.recipe.publishing import Output, Publish, Schedule, Serve, ToolchainPin
from quantkit.recipe.quant import AWQVariant, GGUFSection, GPTQVariant, RTNVariant
from quantkit.yamlsrc import dotted


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
    compare: list[CompareFile] = Field(default_factory=list, max_length=16,
                                       description="other publishers' GGUFs of the same model, scored beside ours")

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
        if self.compare and (self.gguf is None or self.evaluation is None or not self.evaluation.kld):
            raise Invalid("compare: other publishers' GGUFs are scored against this run's base GGUF's logits",
                          "add a 'gguf' section and an 'evaluation' section (with kld on)", loc=("compare",))
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

    @classmethod
    def entry_class(cls, section: str) -> type | None:
        """The class of one entry of the recipe's list ``section`` (``gptq``: GPTQVariant), from the field's own
        type; None when ``section`` is not a list of the recipe (``gguf``, ``hf``)."""
        field = cls.model_fields.get(section)
        if field is None or typing.get_origin(field.annotation) is not list:
            return None
        return typing.get_args(field.annotation)[0]

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
        out += [(("compare", i), "external", c.label) for i, c in enumerate(self.compare)]
        return out


# --- loading -------------------------------------------------------------------------------------

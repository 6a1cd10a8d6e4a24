"""The variant formats: what a variant of each format is in the run folder, the report, the cards and publishing.

Below every other quantkit module (it imports none), so the recipe layer reads the same definitions as the
graph (``quantkit.graph``: a kind's ``format``), the run folder and ``quantkit.publish``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantkit.store import Entry


@dataclass(frozen=True)
class Format:
    """What a variant of one format is; its name (the key of ``FORMATS``) is also its Hub tag."""

    title: str  # how cards and the report name it
    marker: str  # its marker in the report's plot
    suffix: str | None = None  # placed in the run folder as <model>-<label><suffix>; None: not placed
    single: str | None = None  # the one store file it is; else every file of its entry, in a folder
    served: bool = False  # served before publishing, and published (one Hub repo per format)
    llama_cpp: bool = False  # a GGUF file: llama.cpp's commands, shards, Modelfiles
    torch: bool = False  # scored in torch: its tasks are compared with the HF base's
    base: bool = False  # the unquantized model itself (the torch formats' reference)
    checkpoint: bool = False  # a quantized checkpoint users serve with transformers or vLLM
    external: bool = False  # another publisher's file (``compare:``), scored beside the run's own
    library: str | None = None  # the Hub card's library_name
    recovery_floor: str | None = None  # the PublishThresholds field its task score / base score must reach
    # architectures the installed GPTQModel cannot make this format of, and why (at its source): refused by
    # `quantkit validate` for a local model and by the step before any work for a fetched one
    cannot_quantize: Mapping[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> bool:
        """Scored for comparison, never recommended nor published (rtn, external)."""
        return not self.served and not self.base

    @property
    def split(self) -> bool:
        """Published as llama-gguf-split shards when over ``publish.max_file_gib``."""
        return self.served and self.llama_cpp

    def file_name(self, model: str, label: str) -> str | None:
        return None if self.suffix is None else f"{model}-{label}{self.suffix}"

    def placed(self, file_name: str, store_name: str) -> str:
        """Where a store file of the variant is in the run folder (relative, '/'-separated)."""
        return file_name if self.single else f"{file_name}/{store_name}"

    def store_files(self, entry: Entry) -> list[str]:
        return [self.single] if self.single else list(entry.files)


# Found on the tiny Ernie-4.5 MoE of tests/tinymoe.py (GPTQ and AWQ fail the same way) and on the Gemma-3-270M
# shape of benchmarks/scaling.py (GPTQ quantizes it, AWQ does not).
_ERNIE = {"Ernie4_5_MoeForCausalLM": "GPTQModel 7.6 cannot quantize Ernie-4.5 MoE with transformers 5: its model "
                                     "definition (gptqmodel/models/definitions/ernie4_5_moe.py:106) calls "
                                     "Ernie4_5_MoeModel._update_causal_mask, which transformers 5 removed"}
_GEMMA3 = {arch: "GPTQModel 7.6's AWQ cannot run Gemma-3 layers with transformers 5: its layer forward "
                 "(gptqmodel/looper/awq_processor.py) calls the rotary embedding without the layer_type "
                 "Gemma3RotaryEmbedding.forward() requires" for arch in ("Gemma3ForCausalLM",
                                                                         "Gemma3ForConditionalGeneration")}

FORMATS: dict[str, Format] = {
    "gguf": Format("GGUF", "o", ".gguf", "model.gguf", served=True, llama_cpp=True, library="gguf",
                   recovery_floor="min_recovery_gguf"),
    "gptq": Format("GPTQ", "s", "", served=True, torch=True, checkpoint=True, library="transformers",
                   recovery_floor="min_recovery_gptq", cannot_quantize=_ERNIE),
    "awq": Format("AWQ", "^", "", served=True, torch=True, checkpoint=True, library="transformers",
                  recovery_floor="min_recovery_awq", cannot_quantize={**_ERNIE, **_GEMMA3}),
    "rtn": Format("RTN", "x", torch=True),  # a reference: scored, never placed nor published
    "hf": Format("HF", "D", torch=True, base=True),  # the source folder itself
    # another publisher's GGUF: scored, never placed nor published
    "external": Format("external GGUF", "P", llama_cpp=True, external=True),
}

HUB_FORMATS = tuple(name for name, f in FORMATS.items() if f.served)  # their Hub repos, in this order


def format_of(variant: Any) -> Format:
    """The ``Format`` of a manifest's variant (``quantkit.manifest.ManifestVariant``) or a report's row (a dict
    with "format")."""
    return FORMATS[variant["format"] if isinstance(variant, Mapping) else variant.format]

"""A vision-language model's projector: ``convert_hf_to_gguf.py --mmproj`` -> ``mmproj-<name>-f16.gguf``.

llama-server (``--mmproj``, or found beside the GGUF by ``-hf``), llama-mtmd-cli and Ollama load the
text GGUF with this separate file, which holds the vision tower and its projector (issue #28). It is
converted once per model, F16 and Q8_0 (the converter's ``--outtype q8_0`` applies to projectors as to
text models: its ``ftype_map``), and kept in the store like the base GGUF. Whether a model has one is
decided from its ``config.json`` (a ``vision_config``), or by ``model.mmproj`` in the recipe.
"""

from __future__ import annotations

import ast
import logging
import sys
from pathlib import Path

from quantkit.errors import QuantkitError, VerificationError
from quantkit.ggufinfo import _read
from quantkit.proc import run_tool
from quantkit.source import ModelSnapshot
from quantkit.store import Entry, Staging, Store
from quantkit.toolchain import Toolchain

log = logging.getLogger(__name__)

STEP = "mmproj"
TYPES = ("F16", "Q8_0")  # what bartowski and unsloth publish beside the GGUFs; F16 is the reference
FILE_TYPES = {"F16": 1, "Q8_0": 7}  # general.file_type (llama_ftype) the converter writes for each


class ProjectorError(QuantkitError):
    tip = "set model.mmproj: false in the recipe to publish the text GGUFs without the projector"


def store_name(qtype: str) -> str:
    return f"mmproj-{qtype}.gguf"


def file_name(model_name: str, qtype: str) -> str:
    """The name in the run folder and the GGUF repo: ``mmproj-<name>-f16.gguf``, ``mmproj-<name>-q8_0.gguf``,
    the type in lower case as bartowski's repos name it. llama.cpp's ``-hf`` takes a ``.gguf`` whose name
    contains ``mmproj`` in the model's folder or above it (common/download.cpp ``find_best_sibling``), the one
    with the closest bit count to the chosen quant (its tag regex ignores case)."""
    return f"mmproj-{model_name}-{qtype.lower()}.gguf"


def vision_architecture(config: dict) -> str | None:
    """The architecture the converter's ``--mmproj`` would look up (``get_model_architecture``: the vision
    config's ``architectures``, else the top level's), or None when the config has no ``vision_config``."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return None
    for arches in (vision.get("architectures"), config.get("architectures")):
        if isinstance(arches, list) and arches and isinstance(arches[0], str):
            return arches[0]
    return ""


def check_decided(model: ModelSnapshot) -> None:
    """A downloaded model whose recipe left ``model.mmproj`` out (a Hub model: its config.json was not known
    when the recipe was loaded) must not be a vision-language model: whether its projector is published is
    then the recipe's decision, and the run stops at its first node to ask for it."""
    import json

    model.check_links()
    config = json.loads((model.path / "config.json").read_text())
    if (arch := vision_architecture(config) if isinstance(config, dict) else None) is not None:
        raise ProjectorError(f"{model.repo or model.path.name} is a vision-language model ({arch or 'vision_config'}): "
                             "set model.mmproj: true to publish its vision projector beside the GGUFs, or false to "
                             "publish the text GGUFs alone")


def converter_architectures(src: Path) -> frozenset[str]:
    """The architectures the pinned converter converts with ``--mmproj``: the keys of ``MMPROJ_MODEL_MAP`` in
    its ``conversion/__init__.py``, read as data (importing it needs torch and runs the tree's code)."""
    tree = ast.parse((Path(src) / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "MMPROJ_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return frozenset(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    raise ProjectorError(f"{src}/conversion/__init__.py has no MMPROJ_MODEL_MAP: the converter's layout changed")


def mmproj_inputs(*, model: ModelSnapshot, model_name: str, toolchain: Toolchain) -> dict:
    return {"model_digest": model.digest, "model_name": model_name, "types": list(TYPES),
            "llama_cpp": toolchain.commit}


def convert_mmproj(*, model: ModelSnapshot, config: dict, model_name: str, toolchain: Toolchain, store: Store,
                   asked: bool) -> Entry | None:
    """The projector's store entry (``mmproj-F16.gguf``, ``mmproj-Q8_0.gguf``), or None when the model has
    none. ``asked``: the recipe set ``model.mmproj: true`` (a model without a convertible projector is then
    an error; when it was only detected, a projector the converter cannot make is left out with a warning)."""
    arch = vision_architecture(config)
    if arch is None:
        if asked:
            raise ProjectorError(f"model.mmproj is true but {model.path.name}/config.json has no vision_config")
        log.info("mmproj: %s has no vision_config: a text model, no projector", model.path.name)
        return None
    supported = converter_architectures(toolchain.src)
    if arch not in supported:
        why = (f"the pinned converter (llama.cpp {toolchain.commit}) has no --mmproj conversion for "
               f"{arch or 'a model without architectures'}")
        if asked:
            raise ProjectorError(why)
        log.warning("mmproj: %s; publishing the text GGUFs without a projector", why)
        return None

    def produce(staging: Staging) -> None:
        model.check_links()  # the converter follows links: none may have appeared since fetch_model
        made = {}
        for qtype in TYPES:
            out = staging.path / store_name(qtype)
            run = run_tool([sys.executable, toolchain.convert_script, model.path, "--mmproj", "--outfile", out,
                            "--outtype", qtype.lower(), "--model-name", model_name],
                           cwd=staging.path, env=toolchain.python_env())
            made[qtype] = {**check_projector(out, qtype), "seconds": round(run.seconds, 3)}
        staging.info.update(tool=toolchain.version, architecture=arch, projectors=made,
                            seconds=round(sum(m["seconds"] for m in made.values()), 3))

    entry = store.ensure(STEP, mmproj_inputs(model=model, model_name=model_name, toolchain=toolchain), produce)
    log.info("mmproj: %s %s (%s)", "reused" if entry.reused else "converted", arch, ", ".join(TYPES))
    return entry


def check_projector(path: Path, qtype: str) -> dict:
    """Read the file back: a GGUF of type ``mmproj`` with a vision encoder, of the file type asked for."""
    meta, tensors, _ = _read(path, "projector GGUF", ("general.type", "clip.has_vision_encoder",
                                                       "clip.projector_type"))
    if meta.get("general.type") != "mmproj" or not meta.get("clip.has_vision_encoder"):
        raise VerificationError(f"{path.name} is not a vision projector (general.type {meta.get('general.type')!r})")
    if meta.get("general.file_type") != FILE_TYPES[qtype]:
        raise VerificationError(f"{path.name}: the converter wrote file type {meta.get('general.file_type')}, "
                                f"expected {FILE_TYPES[qtype]} ({qtype})")
    return {"projector_type": meta.get("clip.projector_type"), "tensors": len(tensors),
            "parameters": sum(n for _, n, _ in tensors)}

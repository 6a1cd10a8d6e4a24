"""Step 5: GPTQ 4-bit checkpoints with GPTQModel (and the machinery awq.py and rtn.py share).

GPTQModel (not the end-of-life auto-gptq/autoawq) quantizes one decoder layer at a time,
offloading finished layers to disk, on the GPU when there is one and on the CPU otherwise.
It writes standard checkpoints: ``quantization_config`` in config.json, packed
``qweight``/``qzeros``/``scales`` in safetensors, which vLLM, TGI and transformers load as they are.
The offload folder is one quantkit chooses, ``store.scratch``: removed when the step ends however it
ends, and by the next run when this one is killed (GPTQModel's own default is a fresh system temp
folder per run that a failed run leaves behind).
Before any work, ``check_group_size`` reads the tensor shapes from the safetensors headers and
names the first layer whose input width the group size does not divide.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from quantkit.calibration import CalibrationText
from quantkit.errors import QuantkitError, VerificationError
from quantkit.recipe import GPTQVariant
from quantkit.samples import choose_windows, samples_digest
from quantkit.source import ModelSnapshot, remote_code_allowed
from quantkit.store import Entry, Staging, Store

log = logging.getLogger(__name__)

STEP = "gptq"
BACKEND = "gptqmodel"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
# Spec fields added after checkpoints were stored, with their defaults (see checkpoint_inputs).
LATER_DEFAULTS = {"clip": True, "group_aware": False}
# GPTQModel writes its offload folder into the config; it differs per run and names a host path.
VOLATILE_META = ("offload_to_disk_path",)
# tokenicer (imported by GPTQModel) points these at /tmp/tokenicer_hf_home unless they are set.
HF_CACHE_ENV = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")


class GroupSizeError(QuantkitError, ValueError):
    """A group size that does not divide a quantized layer's input width."""

    tip = "use a group size that divides every layer's input width, or -1 (one group per channel)"

    def __init__(self, layer: str, width: int, group_size: int):
        self.layer = layer
        self.width = width
        self.group_size = group_size
        super().__init__(layer, width, group_size)

    def __str__(self) -> str:
        return f"{self.layer}: input width {self.width} is not a multiple of group_size {self.group_size}"


class QuantizerError(QuantkitError, RuntimeError):
    """GPTQModel failed while quantizing, or the checkpoint has nothing to quantize."""


class BackendMissingError(QuantizerError, ImportError):
    """GPTQModel is not installed, or does not import."""

    tip = "install the GPTQ/AWQ backend: pip install 'quantkit[gptq]'"


def unsupported(arch: str | None, fmt: str) -> str | None:
    """Why the installed GPTQModel cannot make a ``fmt`` checkpoint of ``arch`` (None: it can;
    ``quantkit.formats.Format.cannot_quantize``)."""
    from quantkit.formats import FORMATS

    return FORMATS[fmt].cannot_quantize.get(arch or "") if fmt in FORMATS else None


# Mixture-of-experts routers: GPTQModel keeps them in float (its model definitions leave them out of the
# quantized modules), as llama.cpp does (src/llama-quant.cpp never quantizes ffn_gate_inp).
ROUTER = re.compile(r"\.(?:mlp|block_sparse_moe)\.gate$|\.shared_expert_gate$")


def _config(model_path: Path) -> dict:
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def is_moe(model_path: Path) -> bool:
    from quantkit.estimate import expert_count

    cfg = _config(model_path)
    return expert_count(cfg.get("text_config") or cfg) > 0


def moe_routing(gm) -> Any:
    """GPTQModel's setting that sends every calibration token through every expert (ExpertsRoutingBypass):
    an expert the router seldom picks is still calibrated on the whole sample, never left unquantized or
    with NaN scales. Refused (QuantizerError) when the installed GPTQModel has no such setting."""
    try:
        from gptqmodel.quantization.config import ExpertsRoutingBypass, MoEConfig
    except ImportError as e:
        raise QuantizerError(f"GPTQModel {backend_version()} cannot route calibration to every expert "
                             "(no MoEConfig/ExpertsRoutingBypass): a mixture-of-experts model would leave rarely "
                             "routed experts uncalibrated; pin GPTQModel 7.6") from e
    return MoEConfig(routing=ExpertsRoutingBypass())


def linear_shapes(model_path: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every 2-D weight inside the decoder layers, read from safetensors headers only.

    These are the linears GPTQModel quantizes; embeddings, lm_head and MoE routers stay in float.
    """
    from safetensors import safe_open

    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                if ".layers." in name and name.endswith(".weight") and len(shape) == 2:
                    if not ROUTER.search(name.removesuffix(".weight")):
                        shapes[name.removesuffix(".weight")] = (shape[0], shape[1])
    return dict(sorted(shapes.items(), key=lambda kv: _natural(kv[0])))


def check_group_size(model_path: Path, group_size: int) -> int:
    """Raise ``GroupSizeError`` naming the first layer ``group_size`` does not fit; return layers checked."""
    shapes = linear_shapes(model_path)
    if not shapes:
        raise QuantizerError(f"{model_path} has no decoder-layer linear weights in its safetensors files")
    if group_size != -1:
        for layer, (_, width) in shapes.items():
            if width % group_size:
                raise GroupSizeError(layer, width, group_size)
    return len(shapes)


def gptq(*, model: ModelSnapshot, spec: GPTQVariant, calibration: CalibrationText, store: Store,
         device: str | None = None, threads: int | None = None) -> Entry:
    """Quantize ``model`` with GPTQ as ``spec`` says; the checkpoint is at the entry's root."""

    def config(gm, **common):
        return gm.GPTQConfig(bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act,
                             act_group_aware=spec.group_aware, sym=spec.sym, damp_percent=spec.damp_percent, **common)

    return quantize_with_gptqmodel(
        step=STEP, model=model, spec=spec, group_size=spec.group_size, calibration=calibration, store=store,
        device=device, threads=threads, make_config=config, cpu_kernel=None,
        expect={"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size,
                "desc_act": spec.desc_act, "sym": spec.sym})


def checkpoint_inputs(*, model: ModelSnapshot, spec, calibration: CalibrationText | None,
                      device: str | None = None, threads: int | None = None) -> dict:
    """The store key's source of a GPTQ, AWQ or RTN checkpoint (the step name separates them). RTN reads no
    calibration text (``None``), so its key does not name one: new calibration text does not rebuild it.

    The machine that quantizes goes in too: the device, and on the CPU torch's thread count (a tiny Llama's
    GPTQ checkpoint differs byte for byte between 1 and 2 threads: the sums of the Hessians are split
    differently), so a store shared by unlike machines never hands one machine's result to another's key."""
    # a setting added later is left out at its default, so the checkpoints made before it keep their keys
    later = {name for name, default in LATER_DEFAULTS.items() if getattr(spec, name, default) == default}
    inputs = {"model_digest": model.digest, "spec": spec.model_dump(exclude={"label"} | later),
              "backend": {"name": BACKEND, "version": backend_version()}}
    if calibration is not None:
        inputs["calibration_sha256"] = calibration.sha256
    if device is not None:
        inputs["machine"] = {"device": device, **({"threads": threads} if device == "cpu" and threads else {})}
    return inputs


def quantize_with_gptqmodel(*, step: str, model: ModelSnapshot, spec, group_size: int,
                            calibration: CalibrationText | None, store: Store, device: str | None,
                            make_config: Callable[[Any], Any], cpu_kernel: str | None,
                            expect: dict[str, Any], around: Callable[[], Any] = contextlib.nullcontext,
                            threads: int | None = None) -> Entry:
    """The steps GPTQ, AWQ and RTN share: preflight, key, sample, quantize, save, verify.

    ``make_config(gm, **common)`` builds GPTQModel's quantize config, passing ``common`` (the
    offload folder) on; ``cpu_kernel`` names the
    ``gptqmodel.BACKEND`` to pack with on CPU (None: GPTQModel's choice); ``expect`` is what the
    saved config.json's ``quantization_config`` must hold. ``calibration`` None: a weight-only config
    (RTN), quantized without samples. ``around()`` is a context manager held while GPTQModel quantizes
    (settings its config does not carry). ``threads``: torch's thread count on the CPU (this machine's
    ``QUANTKIT_THREADS``), named in the key; None leaves torch's own.
    """
    arch = next(iter(_config(model.path).get("architectures") or []), None)
    if (why := unsupported(arch, step)) is not None:
        raise QuantizerError(f"{step} {spec.label or step}: {arch}: {why}")
    import torch

    layers = check_group_size(model.path, group_size)
    version = backend_version()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    inputs = checkpoint_inputs(model=model, spec=spec, calibration=calibration, device=dev, threads=threads)
    label = spec.label or step
    moe = is_moe(model.path) and calibration is not None
    if moe:
        inputs["moe_routing"] = "all-experts"  # only MoE keys name it: dense checkpoints keep theirs

    def produce(staging: Staging) -> None:
        model.check_links()  # GPTQModel and transformers follow links: none may have appeared since fetch_model
        gm = import_gptqmodel()
        samples = _calibration_windows(model, spec, calibration)
        windows = samples.pop("windows") if samples is not None else None
        log.info("%s %s: quantizing %d linears in %s on %s with GPTQModel %s (%s)", step, label, layers, model.path,
                 dev, version, "weights only, no calibration" if samples is None else
                 f"{samples['count']} windows of {spec.seq_len} tokens")
        start = time.perf_counter()
        saved_threads = torch.get_num_threads()
        if dev == "cpu" and threads:
            torch.set_num_threads(threads)  # what the key says, not what the process inherited (Ray sets 1)
        try:
            with store.scratch(f"{step}-offload") as offload:
                log.debug("%s %s: GPTQModel offloads finished layers to %s", step, label, offload)
                extra = {"moe": moe_routing(gm)} if moe else {}
                qconfig = make_config(gm, offload_to_disk_path=str(offload), **extra)
                if (windows is None) != qconfig.uses_weight_only_lifecycle():  # the key would misname the inputs
                    raise QuantizerError(f"{step} {label}: {type(qconfig).__name__} "
                                         + ("needs calibration text" if windows is None else "reads no calibration"))
                qmodel = gm.GPTQModel.load(str(model.path), qconfig, device=dev,
                                           trust_remote_code=remote_code_allowed(model.trust_remote_code))
                backend = getattr(gm.BACKEND, cpu_kernel) if cpu_kernel and dev == "cpu" else gm.BACKEND.AUTO
                with around():
                    qmodel.quantize(None if windows is None else [{"input_ids": w, "attention_mask": [1] * len(w)}
                                                                  for w in windows],
                                    batch_size=1, backend=backend)
                qmodel.save(str(staging.path))
                del qmodel  # its offloaded layers are files in ``offload``: let go before it is removed
        except QuantkitError:
            raise
        except Exception as e:  # GPTQModel raises bare ValueError/RuntimeError; keep the cause chained
            raise QuantizerError(f"{step} {label}: GPTQModel failed on {model.path}: {e}") from e
        finally:
            torch.set_num_threads(saved_threads)
        seconds = time.perf_counter() - start
        _copy_tokenizer(model.path, staging.path)
        _scrub_volatile(staging.path)
        verify_checkpoint(staging.path, expect=expect, layers=linear_shapes(model.path))
        staging.info.update(backend=BACKEND, backend_version=version, torch=torch.__version__, device=dev,
                            threads=torch.get_num_threads() if threads is None else threads,
                            seconds=round(seconds, 3), samples=samples)
        if moe:
            # with the bypass every expert sees every calibration token (what the report names per expert)
            staging.info["experts"] = {"routing": "all experts (GPTQModel ExpertsRoutingBypass)",
                                       "tokens_per_expert": samples["count"] * spec.seq_len}

    entry = store.ensure(step, inputs, produce)
    log.info("%s %s: %s %s (%.1f s)", step, label, "reused" if entry.reused else "built", entry.path,
             entry.info.get("seconds", 0.0))
    return entry


def _calibration_windows(model: ModelSnapshot, spec, calibration: CalibrationText | None) -> dict | None:
    """The seeded calibration windows (``windows``) and what the entry records of them; None without text."""
    if calibration is None:
        return None
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=remote_code_allowed(model.trust_remote_code))
    ids = tokenizer(calibration.text, add_special_tokens=False, verbose=False)["input_ids"]
    offsets, windows = choose_windows(ids, samples=spec.samples, seq_len=spec.seq_len, seed=spec.seed)
    torch.manual_seed(spec.seed)
    return {"count": len(windows), "seq_len": spec.seq_len, "seed": spec.seed, "text_tokens": len(ids),
            "offsets": offsets, "digest": samples_digest(windows), "windows": windows}


def _steady_quant_log(file: Path) -> None:
    """GPTQModel's per-module log lists modules in the order its threads finished them, each with its wall
    time: sorted by layer and module, without the time, so a checkpoint's bytes depend on its inputs only
    (two runs on one machine otherwise differ in this file alone)."""
    if not file.is_file():
        return
    import csv
    import io

    rows = list(csv.reader(io.StringIO(file.read_text())))
    if not rows or "time" not in rows[0] or rows[0][:2] != ["layer", "module"]:
        return
    keep = [i for i, name in enumerate(rows[0]) if name != "time"]
    body = sorted((r for r in rows[1:] if r), key=lambda r: (int(r[0]) if r[0].isdigit() else -1, r[0], r[1]))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([[r[i] for i in keep] for r in [rows[0], *body]])
    file.write_text(out.getvalue())


def verify_checkpoint(path: Path, *, expect: dict[str, Any], layers: dict[str, tuple[int, int]]) -> None:
    """Read the saved checkpoint back: quantization_config as promised, every linear packed."""
    try:
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
    except (OSError, ValueError, KeyError) as e:
        raise VerificationError(f"{path / 'config.json'} has no readable quantization_config ({e})") from e
    wrong = {k: (qc.get(k), v) for k, v in expect.items() if qc.get(k) != v}
    if wrong:
        raise VerificationError("quantization_config differs from the recipe: "
                                + ", ".join(f"{k}={got!r} (expected {want!r})" for k, (got, want) in wrong.items()))
    packed = set()
    from safetensors import safe_open

    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="numpy") as f:
            packed.update(n.removesuffix(".qweight") for n in f.keys() if n.endswith(".qweight"))
    packed = {_saved_name(n) for n in packed}
    missing = [name for name in layers if _saved_name(name) not in packed]
    if missing:
        raise VerificationError(f"{missing[0]} was not quantized (no {missing[0]}.qweight in the output; "
                                f"{len(missing)} of {len(layers)} linears missing)")
    if not (path / "tokenizer_config.json").exists():
        raise VerificationError(f"{path} has no tokenizer files")


# transformers 5 loads Mixtral's experts under the names of its MoE layer, and GPTQModel saves them so
_SAVED_NAMES = ((re.compile(r"\.block_sparse_moe\."), ".mlp."),
                (re.compile(r"(\.experts\.\d+)\.w1$"), r"\1.gate_proj"),
                (re.compile(r"(\.experts\.\d+)\.w3$"), r"\1.up_proj"),
                (re.compile(r"(\.experts\.\d+)\.w2$"), r"\1.down_proj"))


def _saved_name(name: str) -> str:
    for pattern, to in _SAVED_NAMES:
        name = pattern.sub(to, name)
    return name


def backend_version() -> str:
    try:
        return metadata.version(BACKEND)
    except metadata.PackageNotFoundError as e:
        raise BackendMissingError("GPTQ and AWQ need GPTQModel, which is not installed") from e


def import_gptqmodel() -> SimpleNamespace:
    """GPTQModel's entry points; the one place quantkit imports it (scoring calls this before
    transformers would import it to load a GPTQ/AWQ checkpoint)."""
    # GPTQModel sizes its CPU worker pool from this; with 2 cores or fewer its default is one
    # worker, which it cannot run with, so give it two unless the user chose.
    if (os.cpu_count() or 1) <= 2:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    with _hf_cache_env_kept():
        try:
            from gptqmodel import BACKEND, GPTQModel
            from gptqmodel.quantization.config import FORMAT, AWQConfig, GPTQConfig, RTNConfig
        except ImportError as e:
            raise BackendMissingError(f"cannot import GPTQModel: {e}") from e
    _abort_with_a_message()
    return SimpleNamespace(GPTQModel=GPTQModel, BACKEND=BACKEND, GPTQConfig=GPTQConfig, AWQConfig=AWQConfig,
                           RTNConfig=RTNConfig, FORMAT=FORMAT)


def _abort_with_a_message() -> None:
    """GPTQModel's worker threads end the process (os._exit(1)) on any error in a task, after printing it to
    stderr, which during a node is the node's log file: the run then exited 1 and said nothing. The same exit,
    with the error and that file on the terminal (the interpreter's own stderr)."""
    try:
        from gptqmodel.utils.threadx import _DeviceWorker
    except ImportError:
        return
    original = _DeviceWorker._abort_process
    if getattr(original, "quantkit", False):
        return

    def abort(self, exc: BaseException) -> None:
        where = getattr(sys.stderr, "name", None)
        print(f"error: GPTQModel stopped the process: {type(exc).__name__}: {exc}"
              + (f" (its traceback: {where})" if isinstance(where, str) and not where.startswith("<") else ""),
              file=sys.__stderr__, flush=True)
        original(self, exc)

    abort.quantkit = True
    _DeviceWorker._abort_process = abort


@contextlib.contextmanager
def _hf_cache_env_kept() -> Iterator[None]:
    """Import GPTQModel without its tokenicer moving the Hugging Face cache to /tmp/tokenicer_hf_home.

    tokenicer sets ``HF_HOME`` (and the caches under it) to a folder in /tmp when unset and
    creates it; pointing ``HF_HOME`` at huggingface_hub's own choice for the import, then putting
    the environment back, keeps every cache where the user has it."""
    from huggingface_hub import constants

    saved = {name: os.environ.get(name) for name in HF_CACHE_ENV}
    os.environ.setdefault("HF_HOME", constants.HF_HOME)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _copy_tokenizer(src: Path, dest: Path) -> None:
    """The source's own tokenizer files, byte for byte (GPTQModel re-saves only some of them)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)


def _scrub_volatile(path: Path) -> None:
    _steady_quant_log(path / "quant_log.csv")
    for name in ("config.json", "quantize_config.json"):
        file = path / name
        if not file.exists():
            continue
        data = json.loads(file.read_text())
        meta = (data.get("quantization_config", data)).get("meta") or {}
        if any(k in meta for k in VOLATILE_META):
            for k in VOLATILE_META:
                meta.pop(k, None)
            file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _natural(name: str) -> list[tuple[int, int, str]]:
    """Sort key putting layer 2 before layer 10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]

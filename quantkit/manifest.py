"""``runs/<recipe>/manifest.json``: the schema of the record of one run, and checks of files against it.

The run-folder node (``quantkit.runfolder``) writes it: every input (recipe, model files, calibration
text, toolchain) and every output (store key, sha256 and size of each file, scores). The report, the
publisher and `store gc` read it, through the typed records below (``Manifest.coerce``), never as raw dicts.

Every record reads with ``from_dict`` and writes with ``to_dict``; ``Manifest.from_dict(d).to_dict() == d``
for every manifest quantkit wrote (the JSON on disk, published manifests and release fingerprints depend on
it): a key that may be missing is remembered as missing (``absent``) and stays missing. A key the schema
does not know, or a value of the wrong type, is refused (StoreError naming where it is).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from quantkit import __version__
from quantkit.errors import StoreError
from quantkit.formats import FORMATS
from quantkit.paths import inside
from quantkit.store import Entry, FileRecord, file_problem

MANIFEST_SCHEMA = 2  # 2: steps are graph nodes (kind:label), base logits not listed (transient)
READABLE_SCHEMAS = (1, 2)  # 1 listed the same fields with hand-written step names


# --- reading and writing records --------------------------------------------------------------------
# A field's metadata says what its JSON value may be ("kind"), whether the key may be missing ("optional")
# and whether it is left out when empty ("omit_empty": projectors, shards). ``absent`` (not compared) holds
# the optional keys a record read from JSON did not have: they stay missing while they hold their default
# (``dataclasses.replace`` giving one a value writes it). A record built in code has None there: every key
# is written, omit_empty ones only when not empty.

_KINDS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "num": (int, float), "bool": (bool,),
                                       "dict": (dict,), "list": (list,)}


def _f(kind: str, *, optional: bool = False, none: bool = False, omit_empty: bool = False, default: Any = None,
       factory: Any = None):
    """A record field: ``kind`` one of _KINDS, a record class, ``("map", FileRecord)``, ``("list", cls)`` or
    "any"; ``none``: JSON null is allowed."""
    meta = {"kind": kind, "optional": optional or omit_empty, "none": none, "omit_empty": omit_empty}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is not None or optional or omit_empty or none:
        return field(default=default, metadata=meta)
    return field(metadata=meta)


def _absent():
    return field(default=None, compare=False, repr=False)


def _refuse(where: str, what: str) -> StoreError:
    return StoreError(f"{where if where.startswith('manifest') else 'manifest ' + where}: {what}")


def _value(kind: Any, value: Any, where: str, none: bool) -> Any:
    if value is None:
        if none or kind == "any":
            return None
        raise _refuse(where, "is null, expected " + _kind_name(kind))
    if kind == "any":
        return value
    if isinstance(kind, tuple):
        outer, inner = kind
        if outer == "map":
            if not isinstance(value, dict):
                raise _refuse(where, f"expected an object, got {type(value).__name__}")
            return {str(k): v if _bare(inner, v) else _record(inner, v, f"{where}[{k!r}]")
                    for k, v in value.items()}
        if not isinstance(value, list):
            raise _refuse(where, f"expected a list, got {type(value).__name__}")
        return tuple(_record(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(kind, type):
        return _record(kind, value, where)
    ok = isinstance(value, _KINDS[kind]) and not (kind in ("int", "num") and isinstance(value, bool))
    if not ok:
        raise _refuse(where, f"expected {_kind_name(kind)}, got {type(value).__name__} {value!r:.60}")
    return value


def _bare(cls: type, value: Any) -> bool:
    return getattr(cls, "bare_number", False) and isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind_name(kind: Any) -> str:
    return {"str": "a string", "int": "an integer", "num": "a number", "bool": "true or false",
            "dict": "an object", "list": "a list"}.get(kind, str(kind)) if isinstance(kind, str) else "an object"


def _record(cls: type, data: Any, where: str) -> Any:
    if cls is FileRecord:
        if not isinstance(data, dict):
            raise _refuse(where, f"expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"sha256", "size"})
        if unknown:
            raise _refuse(where, f"unknown key {unknown[0]!r} (a file record has sha256, size)")
        missing = [k for k in ("sha256", "size") if k not in data]
        if missing:
            raise _refuse(where, f"lacks {missing[0]!r}")
        return FileRecord(_value("str", data["sha256"], f"{where}.sha256", False),
                          _value("int", data["size"], f"{where}.size", False))
    return cls.from_dict(data, where=where)


def _dump(value: Any) -> Any:
    if isinstance(value, FileRecord):
        return {"sha256": value.sha256, "size": value.size}
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    if isinstance(value, dict) and any(isinstance(v, (FileRecord, _Record)) for v in value.values()):
        return {k: _dump(v) for k, v in value.items()}
    return value


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


class _Record:
    """``from_dict``/``to_dict`` of a frozen dataclass whose fields are made with ``_f``."""

    _where: ClassVar[str] = ""

    @classmethod
    def _schema_fields(cls):
        return [f for f in fields(cls) if f.name != "absent"]

    @classmethod
    def from_dict(cls, data: Any, *, where: str | None = None):
        where = where or cls._where
        if not isinstance(data, Mapping):
            raise _refuse(where, f"expected an object, got {type(data).__name__}")
        known = cls._schema_fields()
        unknown = sorted(set(data) - {f.name for f in known})
        if unknown:
            raise _refuse(where, f"unknown key {unknown[0]!r} (not in manifest schema {MANIFEST_SCHEMA}: "
                                 f"{cls.__name__} has {', '.join(f.name for f in known)})")
        values, absent = {}, set()
        for f in known:
            if f.name not in data:
                if not f.metadata["optional"]:
                    raise _refuse(where, f"lacks {f.name!r}")
                absent.add(f.name)
                continue
            values[f.name] = _value(f.metadata["kind"], data[f.name], f"{where}.{f.name}", f.metadata["none"])
        return cls(**values, absent=frozenset(absent))

    def to_dict(self) -> dict:
        absent = self.absent
        out = {}
        for f in self._schema_fields():
            value = getattr(self, f.name)
            if f.metadata["omit_empty"] and not value:
                continue
            if absent is not None and f.name in absent and value == _default(f):  # missing when read, unchanged
                continue
            out[f.name] = _dump(value)
        return out

    def number(self, name: str) -> float | None:
        """A numeric score as a finite float, or None (missing, null, NaN or infinite)."""
        v = getattr(self, name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# --- the records ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RecipeInfo(_Record):
    """The recipe the run was made from: its name, file, sha256 and the resolved recipe (a plain dict:
    ``quantkit.recipe``'s models of the quantkit that wrote it, read there when needed)."""

    _where: ClassVar[str] = "recipe"
    name: str | None = _f("str", optional=True, none=True)
    file: str | None = _f("str", optional=True, none=True)
    sha256: str | None = _f("str", optional=True, none=True)
    resolved: dict | None = _f("dict", optional=True, none=True)
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class ModelInfo(_Record):
    """The base checkpoint (``quantkit.source``): repo, revision, commit, folder, digest, files (name -> sha256)."""

    _where: ClassVar[str] = "model"
    repo: str | None = _f("str", optional=True, none=True)
    revision: str | None = _f("str", optional=True, none=True)
    commit: str | None = _f("str", optional=True, none=True)
    path: str | None = _f("str", optional=True, none=True)
    digest: str | None = _f("str", optional=True, none=True)
    files: dict = _f("dict", optional=True, factory=dict)
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class CalibrationInfo(_Record):
    """The calibration text (``quantkit.calibration``): sha256, source files, length; parse_special when set."""

    _where: ClassVar[str] = "calibration"
    sha256: str | None = _f("str", optional=True, none=True)
    sources: list = _f("list", optional=True, factory=list)
    chars: int | None = _f("int", optional=True, none=True)
    parse_special: bool | None = _f("bool", optional=True)
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class ToolchainInfo(_Record):
    """The llama.cpp build: commit, version string, where it came from, CUDA."""

    _where: ClassVar[str] = "toolchain"
    llama_cpp: str | None = _f("str", optional=True, none=True)
    version: str | None = _f("str", optional=True, none=True)
    origin: str | None = _f("str", optional=True, none=True)
    cuda: Any = _f("any", optional=True)  # a version string, or a flag in older manifests
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True)
class ManifestStep(_Record):
    """One stored node of the run: its store key, whether it was reused, how long it took when built, and
    the machine that built it (host name, llama.cpp build and its folder there, threads; None in manifests
    before they were kept)."""

    _where: ClassVar[str] = "steps[]"
    step: str = _f("str")
    key: str = _f("str")
    reused: bool = _f("bool")
    seconds: float | None = _f("num", none=True)
    host: str | None = _f("str", optional=True, none=True)
    toolchain: str | None = _f("str", optional=True, none=True)
    toolchain_dir: str | None = _f("str", optional=True, none=True)
    threads: int | None = _f("int", optional=True, none=True)
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class TaskScore(_Record):
    """One lm-eval task on one variant (``quantkit.scoring.tasks.task_summary``): its accuracies, the metric
    its backend decides with, per-item correctness (for paired tests between variants) and the items' digest.
    A manifest may hold a bare number instead (``Scores.tasks`` keeps it as a float)."""

    _where: ClassVar[str] = "scores.tasks[]"
    bare_number: ClassVar[bool] = True
    task: str | None = _f("str", optional=True, none=True)
    acc: float | None = _f("num", optional=True, none=True)
    acc_norm: float | None = _f("num", optional=True, none=True)
    acc_token_norm: float | None = _f("num", optional=True, none=True)
    n: int | None = _f("int", optional=True, none=True)
    chance: float | None = _f("num", optional=True, none=True)
    p_value: float | None = _f("num", optional=True, none=True)
    metric: str | None = _f("str", optional=True, none=True)
    backend: str | None = _f("str", optional=True, none=True)
    correct: list | None = _f("list", optional=True, none=True)  # 0/1 per item, for ``metric``
    per_item: dict | None = _f("dict", optional=True, none=True)  # metric -> 0/1 per item
    items_sha256: str | None = _f("str", optional=True, none=True)
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class Speed(_Record):
    """Throughput of one artifact on the machine that measured it: llama-bench's (``windows.Speed``) for a
    GGUF, greedy generation in transformers (``scoring.hf.bench_hf``) for a checkpoint."""

    _where: ClassVar[str] = "scores.speed"
    pp_tokens_per_s: float | None = _f("num", optional=True, none=True)
    pp_stddev: float | None = _f("num", optional=True, none=True)
    tg_tokens_per_s: float | None = _f("num", optional=True, none=True)
    tg_stddev: float | None = _f("num", optional=True, none=True)
    prompt_tokens: int | None = _f("int", optional=True, none=True)
    gen_tokens: int | None = _f("int", optional=True, none=True)
    reps: int | None = _f("int", optional=True, none=True)
    threads: int | None = _f("int", optional=True, none=True)
    backend: str | None = _f("str", optional=True, none=True)
    cpu: str | None = _f("str", optional=True, none=True)
    repack: bool | None = _f("bool", optional=True, none=True)
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class ServeResult(_Record):
    """The serve check of one artifact (``quantkit.serving.ServeCheck.to_dict()``); keys a check of an older
    CHECK_VERSION did not write are missing."""

    _where: ClassVar[str] = "scores.serve"
    backend: str | None = _f("str", optional=True, none=True)
    loads: bool | None = _f("bool", optional=True, none=True)
    chat_stops: bool | None = _f("bool", optional=True, none=True)
    template_matches: bool | None = _f("bool", optional=True, none=True)
    tool_call: str | None = _f("str", optional=True, none=True)
    tool: dict | None = _f("dict", optional=True, none=True)  # serving.ToolOutcome's fields
    tool_detail: str | None = _f("str", optional=True, none=True)
    image: str | None = _f("str", optional=True, none=True)
    vllm: str | None = _f("str", optional=True, none=True)
    vllm_version: str | None = _f("str", optional=True, none=True)
    tokens_per_s: float | None = _f("num", optional=True, none=True)
    reply: str | None = _f("str", optional=True, none=True)
    failures: list | None = _f("list", optional=True, none=True)
    passed: bool | None = _f("bool", optional=True, none=True)
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class _Quality(_Record):
    """``quantkit.scoring.windows.Score.to_dict()``: a variant's quality on one held-out set. Every key may be
    missing (a variant nothing scored, a manifest of an older quantkit); a missing number reads as None."""

    backend: str | None = _f("str", optional=True, none=True)
    ppl: float | None = _f("num", optional=True, none=True)
    ppl_err: float | None = _f("num", optional=True, none=True)
    kld_mean: float | None = _f("num", optional=True, none=True)
    kld_mean_err: float | None = _f("num", optional=True, none=True)
    kld_p99: float | None = _f("num", optional=True, none=True)
    kld_p999: float | None = _f("num", optional=True, none=True)
    same_top_pct: float | None = _f("num", optional=True, none=True)
    n_tokens: int | None = _f("int", optional=True, none=True)
    n_chunks: int | None = _f("int", optional=True, none=True)
    ctx: int | None = _f("int", optional=True, none=True)
    seconds: float | None = _f("num", optional=True, none=True)
    printed: dict | None = _f("dict", optional=True, none=True)  # llama-perplexity's own strings, by field
    set_info: dict | None = _f("dict", optional=True, none=True)  # a chat set's conversations, tokens
    chunk_kld: list | None = _f("list", optional=True, none=True)  # each chunk's mean KLD
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class SetScore(_Quality):
    """A variant's quality on one evaluation set (``quantkit.evalsets.set_scores``): which set, its kind (text
    or chat) and what the KLD is against (the base GGUF or the HF checkpoint)."""

    _where: ClassVar[str] = "scores.sets[]"
    set: str | None = _f("str", optional=True, none=True)
    kind: str | None = _f("str", optional=True, none=True)
    reference: str | None = _f("str", optional=True, none=True)


@dataclass(frozen=True, kw_only=True)
class Scores(_Quality):
    """A variant's scores (``graph.variant_scores``): its quality on the first held-out set, plus what the
    other measuring nodes add: tasks, speed, the serve check, and every evaluation set by name."""

    _where: ClassVar[str] = "scores"
    tasks: dict[str, TaskScore | float] | None = _f(("map", TaskScore), optional=True, none=True)
    speed: Speed | None = _f(Speed, optional=True, none=True)
    serve: ServeResult | None = _f(ServeResult, optional=True, none=True)
    sets: dict[str, SetScore] | None = _f(("map", SetScore), optional=True, none=True)


@dataclass(frozen=True, kw_only=True)
class Shard(_Record):
    """One llama-gguf-split shard of a GGUF published in parts (``publish.release.shard_staged``)."""

    _where: ClassVar[str] = "shards[]"
    file: str = _f("str")
    size: int = _f("int")
    sha256: str = _f("str")
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class ManifestVariant(_Record):
    """One artifact of the run as the manifest lists it (``Variant.describe()``): its format and label, its
    name in the run folder (None for a reference, or a variant publishing leaves out), the store node that
    made it, its files, the node's info (plain: each kind's own), its scores, and ``shards`` when publishing
    split it."""

    _where: ClassVar[str] = "variants[]"
    format: str = _f("str")
    label: str = _f("str")
    file: str | None = _f("str", optional=True, none=True)
    step: str | None = _f("str", optional=True, none=True)
    key: str | None = _f("str", optional=True, none=True)
    reused: bool | None = _f("bool", optional=True, none=True)
    files: dict[str, FileRecord] = _f(("map", FileRecord), optional=True, factory=dict)
    info: dict = _f("dict", optional=True, factory=dict)  # the store entry's info (gguf, mix, made_by, ...)
    scores: Scores = _f(Scores, optional=True, factory=Scores)
    shards: tuple[Shard, ...] = _f(("list", Shard), omit_empty=True, factory=tuple)
    absent: frozenset[str] | None = _absent()

    @property
    def id(self) -> str:
        return f"{self.format}:{self.label}"


@dataclass(frozen=True, kw_only=True)
class Projector(_Record):
    """A VLM's mmproj file of one type (``runfolder.projector_records``)."""

    _where: ClassVar[str] = "projectors[]"
    file: str = _f("str")
    type: str = _f("str")
    store_file: str | None = _f("str", optional=True, none=True)
    step: str | None = _f("str", optional=True, none=True)
    key: str | None = _f("str", optional=True, none=True)
    reused: bool | None = _f("bool", optional=True, none=True)
    sha256: str = _f("str")
    size: int = _f("int")
    architecture: str | None = _f("str", optional=True, none=True)
    projector_type: str | None = _f("str", optional=True, none=True)
    absent: frozenset[str] | None = _absent()


@dataclass(frozen=True, kw_only=True)
class Manifest(_Record):
    """``runs/<recipe>/manifest.json``: every input and every output of one run, versioned."""

    _where: ClassVar[str] = "manifest"
    # every run writes recipe, model, calibration and quantkit; synthetic manifests (tests) may leave them out
    recipe: RecipeInfo = _f(RecipeInfo, optional=True, factory=RecipeInfo)
    model: ModelInfo = _f(ModelInfo, optional=True, factory=ModelInfo)
    calibration: CalibrationInfo = _f(CalibrationInfo, optional=True, factory=CalibrationInfo)
    toolchain: ToolchainInfo | None = _f(ToolchainInfo, optional=True, none=True)
    steps: tuple[ManifestStep, ...] = _f(("list", ManifestStep), optional=True, factory=tuple)
    variants: tuple[ManifestVariant, ...] = _f(("list", ManifestVariant), factory=tuple)
    quantkit: str = _f("str", optional=True, default=__version__)
    schema: int = _f("int", default=MANIFEST_SCHEMA)
    projectors: tuple[Projector, ...] = _f(("list", Projector), omit_empty=True, factory=tuple)  # absent without
    absent: frozenset[str] | None = _absent()

    def __post_init__(self):  # records built in code may hand plain dicts (runfolder, tests)
        for name, cls in (("recipe", RecipeInfo), ("model", ModelInfo), ("calibration", CalibrationInfo),
                          ("toolchain", ToolchainInfo)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, cls.from_dict(value, where=name))
        for name, cls in (("steps", ManifestStep), ("variants", ManifestVariant), ("projectors", Projector)):
            object.__setattr__(self, name, tuple(cls.from_dict(v, where=f"{name}[{i}]") if isinstance(v, Mapping)
                                                 else v for i, v in enumerate(getattr(self, name))))

    @classmethod
    def from_dict(cls, data: Any, *, where: str | None = None) -> Manifest:
        if not isinstance(data, Mapping):
            raise _refuse("manifest", f"expected an object, got {type(data).__name__}")
        if data.get("schema") not in READABLE_SCHEMAS:
            raise StoreError(f"manifest schema {data.get('schema')!r} is not one this quantkit reads "
                             f"({', '.join(map(str, READABLE_SCHEMAS))})")
        return super().from_dict(data, where=where)

    @classmethod
    def coerce(cls, manifest: Manifest | Mapping) -> Manifest:
        """A Manifest from itself or from its JSON (a dict): what public readers call once at their boundary."""
        return manifest if isinstance(manifest, Manifest) else cls.from_dict(manifest)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def variant(self, vid: str) -> ManifestVariant | None:
        return next((v for v in self.variants if v.id == vid), None)


@dataclass(frozen=True)
class Variant:
    """One produced artifact of the run, as the report and publishing see it."""

    format: str  # "gguf", "gptq", "awq", "hf", "rtn" (a reference: scored, never linked or published)
    label: str
    entry: Entry
    file_name: str | None  # name in the run folder; None for a reference, which stays in the store
    scores: dict = field(default_factory=dict)  # Score.to_dict() plus "speed", "tasks"

    def describe(self) -> ManifestVariant:
        """The manifest's record of this artifact."""
        return ManifestVariant(format=self.format, label=self.label, file=self.file_name, step=self.entry.step,
                               key=self.entry.key, reused=self.entry.reused, files=dict(self.entry.files),
                               info=self.entry.info, scores=Scores.from_dict(self.scores))


def linked_files(manifest: Manifest | Mapping) -> Iterator[tuple[ManifestVariant | Projector, str, FileRecord]]:
    """``(variant or projector, path in the run folder, record)`` of every store file a manifest's run folder
    links."""
    manifest = Manifest.coerce(manifest)
    for v in manifest.variants:
        fmt = FORMATS.get(v.format)
        if fmt is None or fmt.suffix is None or not v.file:
            continue
        for name, rec in v.files.items():
            if fmt.single and name != fmt.single:  # the entry's other files (a mix's tensor-types.txt) stay put
                continue
            yield v, fmt.placed(v.file, name), rec
    for p in manifest.projectors:
        yield p, p.file, FileRecord(p.sha256, p.size)


def damaged_files(folder: Path, manifest: Manifest | Mapping, *,
                  digests: bool = False) -> list[tuple[ManifestVariant | Projector, str]]:
    """``(variant, what is wrong)`` for each file a manifest lists that ``folder`` (a run folder or a
    published run) does not hold as recorded: its size, and with ``digests`` its sha256."""
    found = []
    for v, rel, record in linked_files(manifest):
        problem = file_problem(inside(folder, *rel.split("/")), record, digest=digests)
        if problem is not None:
            found.append((v, f"{folder.name}/{rel}: {problem}"))
    return found


def differing_files(published: Path, run_folder: Path, manifest: Manifest | Mapping) -> list[str]:
    """The files of ``manifest`` whose size in ``published`` is not their size in ``run_folder`` (or
    that either lacks): a published run that shared a damaged store file, rebuilt since. Cheap."""
    def size(path: Path) -> int | None:
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return None

    return [rel for _, rel, _ in linked_files(manifest)
            if (a := size(published / rel)) is None or a != size(run_folder / rel)]

"""A local lm-eval task is data: quantkit reads its ``task.yaml`` and gives lm-eval a config of allowed keys.

Handed to lm-eval as it is, a task folder could run code on the worker: ``include`` pulls in another
YAML, ``!function`` imports a Python file from the folder, ``process_docs``, ``process_results``,
``filter_list`` and ``custom_dataset`` call such functions, ``doc_to_*`` strings are Jinja templates
rendered outside a sandbox (``{{ cycler.__init__.__globals__.os.system(...) }}``), a metric name lm-eval
does not know is fetched from the Hub and run by HF ``evaluate``, and a ``dataset_path`` other than
``json`` loads a dataset script. So a ``task.yaml`` may hold only:

- ``task`` (the recipe's name for it), ``dataset_path: json`` with ``dataset_kwargs.data_files``: a
  ``.json``/``.jsonl`` file inside the task folder per split, and ``training_split``, ``validation_split``,
  ``test_split``, ``fewshot_split`` naming those splits; ``output_type: multiple_choice``;
- ``doc_to_text``, ``doc_to_choice``, ``doc_to_target``: field references and plain text only
  (``{{question}}``, ``"{{choices}}"``, ``answer``; ``doc_to_target`` may be an index, ``doc_to_choice``
  a list of plain strings), checked by ``TEMPLATE_RE``;
- ``target_delimiter`` (plain text), ``num_fewshot``, ``metric_list`` of lm-eval's built-in
  multiple-choice metrics with their built-in aggregation, and ``metadata`` (plain values).

Anything else, and any YAML tag, is refused with ``task.yaml:line`` and a fix. The config lm-eval gets is
rebuilt from the checked values (never the file's own mapping) and reads a copy of the data file that
quantkit made, so what lm-eval loads is what was checked and digested.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from quantkit.errors import Problem, RecipeError
from quantkit.yamlsrc import dotted, parse_yaml

TASK_YAML = "task.yaml"
LOCAL_TASKS_DIR = "calibration/tasks"
DATA_SUFFIXES = (".json", ".jsonl")
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
TEMPLATE_KEYS = ("doc_to_text", "doc_to_choice", "doc_to_target")
OUTPUT_TYPES = ("multiple_choice",)  # what quantkit scores (quantkit.scoring.tasks.load_items)
# lm-eval's registered multiple-choice metrics and the aggregation each is registered with.
METRICS = {"acc": "mean", "acc_norm": "mean", "acc_mutual_info": "mean", "acc_bytes": "mean",
           "brier_score": "brier_score"}
ALLOWED_KEYS = ("task", "dataset_path", "dataset_kwargs", *SPLIT_KEYS, "output_type", *TEMPLATE_KEYS,
                "target_delimiter", "num_fewshot", "metric_list", "metadata")
# Keys that run code or load something else: named in the refusal so the reader sees why.
CODE_KEYS = {"include": "it makes lm-eval read another YAML file, which may name Python functions",
             "process_docs": "it names a Python function lm-eval imports and calls",
             "process_results": "it names a Python function lm-eval imports and calls",
             "custom_dataset": "it names a Python function lm-eval imports and calls",
             "filter_list": "filters can name Python functions lm-eval imports and calls",
             "dataset_name": "local tasks read one json/jsonl file, not a named dataset configuration"}

FIELD = r"[A-Za-z][A-Za-z0-9_]{0,63}"
# Plain text (no braces, no control characters but tab and newline) around {{field}} references.
TEMPLATE_RE = re.compile(rf"(?:[^{{}}\x00-\x08\x0b-\x1f\x7f]|\{{\{{ ?{FIELD} ?\}}\}})*")
PLAIN_RE = re.compile(r"[^{}\x00-\x08\x0b-\x1f\x7f]*")
TEMPLATE_MAX = 1000
# Jinja's globals and constants: not fields of a document.
JINJA_NAMES = frozenset({"range", "lipsum", "dict", "cycler", "joiner", "namespace", "self", "loop", "caller",
                         "varargs", "kwargs", "true", "false", "none", "True", "False", "None"})
TEMPLATE_FIX = ("write plain text around field references only, e.g. \"Question: {{question}}\", "
                "\"{{choices}}\" or answer")


def task_folder(name: str, path: str | None) -> str:
    """The folder of a recipe task, relative to the project: its ``path``, or ``calibration/tasks/<name>``
    (when that folder does not exist, the name is a task lm-eval ships)."""
    return path or f"{LOCAL_TASKS_DIR}/{name}"


class _Checker:
    def __init__(self, file: str, lines: dict, folder: Path | None):
        self.file, self.lines, self.folder = file, lines, folder
        self.problems: list[Problem] = []

    def bad(self, path: tuple, message: str, fix: str) -> None:
        line = next((self.lines[path[:cut]] for cut in range(len(path), -1, -1) if path[:cut] in self.lines), 1)
        self.problems.append(Problem(self.file, line, dotted(path), message, fix))

    def text(self, path: tuple, value: Any, *, template: bool) -> str | None:
        if not isinstance(value, str):
            self.bad(path, f"the value must be a string, not {type(value).__name__}",
                     TEMPLATE_FIX if template else "quote it")
            return None
        if len(value) > TEMPLATE_MAX:
            self.bad(path, f"the value is {len(value)} characters, over the {TEMPLATE_MAX} limit", "shorten it")
            return None
        if not (TEMPLATE_RE if template else PLAIN_RE).fullmatch(value):
            what = ("only plain text around {{field}} references is allowed: no Jinja expression, call, filter, "
                    "{% %} block or control character (lm-eval renders templates unsandboxed)"
                    if template else "the value may not contain '{', '}' or control characters")
            self.bad(path, what, TEMPLATE_FIX if template else "write plain text")
            return None
        names = re.findall(rf"\{{\{{ ?({FIELD}) ?\}}\}}", value) if template else []
        if jinja := sorted(set(names) & JINJA_NAMES):
            self.bad(path, f"'{jinja[0]}' is a Jinja name, not a field of the data", "name a field of the jsonl rows")
            return None
        return value

    def data_file(self, path: tuple, value: Any) -> str | None:
        pure = PurePosixPath(value) if isinstance(value, str) else None
        fix = "name a .json or .jsonl file inside the task folder, e.g. items.jsonl"
        if pure is None or pure.is_absolute() or not pure.parts or any(p in ("", ".", "..") for p in pure.parts) \
                or not PLAIN_RE.fullmatch(value) or "\\" in value:
            self.bad(path, f"{value!r} is not a path inside the task folder", fix)
            return None
        if pure.suffix not in DATA_SUFFIXES:
            self.bad(path, f"'{value}' is not a .json or .jsonl file", fix)
            return None
        if self.folder is not None:
            target = self.folder.joinpath(*pure.parts)
            if not target.is_file() or target.is_symlink():
                self.bad(path, f"'{value}' is not a file in the task folder" +
                         (" (it is a symlink)" if target.is_symlink() else ""), fix)
                return None
        return pure.as_posix()


def check_task_config(data: Any, lines: dict, *, file: str, name: str, folder: Path | None) -> dict:
    """The config lm-eval gets for a local task (``data_files`` relative to the folder), or RecipeError
    listing every key that is not allowed, each at its ``task.yaml`` line with a fix."""
    c = _Checker(file, lines, folder)
    if not isinstance(data, dict):
        c.bad((), "a task.yaml is a mapping of keys to values",
              "start from calibration/tasks/which-word-fits/task.yaml")
        raise RecipeError(c.problems)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in CODE_KEYS:
            c.bad((key,), f"'{key}' is not allowed in a local task: {CODE_KEYS[key]}",
                  f"remove {key}; a local task is data: {', '.join(ALLOWED_KEYS[:3])}, the splits, templates, "
                  "metrics and metadata")
        elif key not in ALLOWED_KEYS:
            c.bad((key,), f"'{key}' is not an allowed key of a local task",
                  f"remove it; allowed: {', '.join(ALLOWED_KEYS)}")
    if data.get("task") != name:
        c.bad(("task",), f"task is {data.get('task')!r}, the recipe asks for {name!r}",
              f"write task: {name}, or name the task in the recipe as the file does")
    out["task"] = name
    if data.get("dataset_path") != "json":
        c.bad(("dataset_path",), f"dataset_path is {data.get('dataset_path')!r}; a local task reads its own "
              "json/jsonl file (another loader could run a dataset script)", "write dataset_path: json")
    out["dataset_path"] = "json"
    kwargs = data.get("dataset_kwargs")
    files: dict[str, str] = {}
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("data_files"), dict) or not kwargs["data_files"]:
        c.bad(("dataset_kwargs",), "dataset_kwargs needs data_files: a mapping of split names to files",
              "write dataset_kwargs: {data_files: {test: items.jsonl}}")
    else:
        for extra in sorted(set(kwargs) - {"data_files"}):
            c.bad(("dataset_kwargs", extra), f"'{extra}' is not allowed in dataset_kwargs", "remove it; only "
                  "data_files is read")
        for split, rel in kwargs["data_files"].items():
            where = ("dataset_kwargs", "data_files", split)
            if not re.fullmatch(FIELD, split):
                c.bad(where, f"split name {split!r} is not a plain name", "use a name like test or validation")
            elif (ok := c.data_file(where, rel)) is not None:
                files[split] = ok
    out["dataset_kwargs"] = {"data_files": files}
    named = set(kwargs["data_files"]) if isinstance(kwargs, dict) and isinstance(kwargs.get("data_files"), dict) \
        else set()
    for key in SPLIT_KEYS:
        if key in data:
            if data[key] not in named:
                c.bad((key,), f"{key} {data[key]!r} is not a split of data_files ({', '.join(named) or 'none'})",
                      "name a key of dataset_kwargs.data_files")
            out[key] = data[key]
    if not any(k in data for k in SPLIT_KEYS):
        c.bad((), "the task names no split to score", "add test_split: test (a key of data_files)")
    if data.get("output_type") not in OUTPUT_TYPES:
        c.bad(("output_type",), f"output_type is {data.get('output_type')!r}; quantkit scores multiple_choice "
              "tasks only", "write output_type: multiple_choice")
    out["output_type"] = "multiple_choice"
    for key in TEMPLATE_KEYS:
        value = data.get(key)
        if value is None:
            c.bad((key,), f"{key} is missing", f"add {key}: a field reference such as {{{{question}}}}")
        elif key == "doc_to_target" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out[key] = value
        elif key == "doc_to_choice" and isinstance(value, list):
            if 2 <= len(value) <= 32 and all(c.text((key, i), v, template=False) is not None
                                             for i, v in enumerate(value)):
                out[key] = list(value)
            elif not 2 <= len(value) <= 32:
                c.bad((key,), f"a list of {len(value)} choices", "give 2 to 32 plain strings, or \"{{choices}}\"")
        elif c.text((key,), value, template=True) is not None:
            out[key] = value
    delimiter = data.get("target_delimiter")
    if delimiter is not None and c.text(("target_delimiter",), delimiter, template=False) is not None:
        out["target_delimiter"] = delimiter
    if "num_fewshot" in data:
        n = data["num_fewshot"]
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 25:
            c.bad(("num_fewshot",), f"num_fewshot {n!r} is not a whole number from 0 to 25", "write a number 0-25")
        else:
            out["num_fewshot"] = n
    if "metric_list" in data:
        out["metric_list"] = _metrics(c, data["metric_list"])
    if "metadata" in data:
        meta = data["metadata"]
        if not isinstance(meta, dict):
            c.bad(("metadata",), "metadata is a mapping of names to plain values", "write metadata: {version: 1.0}")
        else:
            out["metadata"] = {}
            for k, v in meta.items():
                if not re.fullmatch(FIELD, k) or not isinstance(v, (str, int, float, bool, type(None))):
                    c.bad(("metadata", k), "metadata holds plain names and values only",
                          "write a name and a number or plain string, e.g. version: 1.0")
                elif not isinstance(v, str) or c.text(("metadata", k), v, template=False) is not None:
                    out["metadata"][k] = v
    if c.problems:
        raise RecipeError(sorted(c.problems, key=lambda p: p.line))
    return out


def _metrics(c: _Checker, value: Any) -> list[dict]:
    fix = f"use lm-eval's built-in metrics: {', '.join(METRICS)}, each with its aggregation and higher_is_better"
    if not isinstance(value, list) or not value:
        c.bad(("metric_list",), "metric_list is a list of metrics", fix)
        return []
    out = []
    for i, m in enumerate(value):
        where = ("metric_list", i)
        if not isinstance(m, dict) or m.get("metric") not in METRICS:
            shown = m.get("metric") if isinstance(m, dict) else m
            c.bad(where, f"metric {shown!r} is not a built-in multiple-choice metric (lm-eval would fetch an "
                  "unknown name from the Hub and run it)", fix)
            continue
        for extra in sorted(set(m) - {"metric", "aggregation", "higher_is_better"}):
            c.bad(where + (extra,), f"'{extra}' is not allowed in a metric", "keep metric, aggregation and "
                  "higher_is_better only")
        agg = m.get("aggregation", METRICS[m["metric"]])
        if agg != METRICS[m["metric"]]:
            c.bad(where + ("aggregation",), f"aggregation {agg!r} is not {m['metric']}'s built-in one",
                  f"write aggregation: {METRICS[m['metric']]}")
        hib = m.get("higher_is_better", True)
        if not isinstance(hib, bool):
            c.bad(where + ("higher_is_better",), "higher_is_better is true or false", "write true")
        out.append({"metric": m["metric"], "aggregation": METRICS[m["metric"]], "higher_is_better": hib is True})
    return out


def read_task_config(raw: bytes, *, file: str, name: str, folder: Path | None) -> dict:
    """Parse a task.yaml's bytes (read without following links) and check them: ``check_task_config``."""
    data, lines = parse_yaml(raw, file, kind="task file")
    return check_task_config(data, lines, file=file, name=name, folder=folder)

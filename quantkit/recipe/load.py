"""Reading a recipe file: YAML with line numbers, validation, every problem with file, line and fix."""

from __future__ import annotations


import os
from pathlib import Path

import pydantic

from quantkit.errors import Problem, RecipeError
from quantkit.recipe.document import Recipe
from quantkit.recipe.fields import Invalid
from quantkit.recipe.files import pointed_problems, resolve_mmproj
from quantkit.yamlsrc import dotted, load_yaml


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
    return resolve_mmproj(recipe, root, display, lines)  # a local model's config.json decides model.mmproj


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

"""What a recipe points at, checked when it is validated: no symlinks, and local tasks that are data.

The model folder (every file in it), task folders, calibration and evaluation files arrive in the same
pull request as the recipe. Each problem names the recipe line that points at the file (a symlink) or
the ``task.yaml`` line that is not allowed (``quantkit.scoring.taskconfig``). The steps check again when
they read (``quantkit.nofollow``), so a recipe object that skipped validation is refused as well.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import Problem, RecipeError
from quantkit.formats import FORMATS
from quantkit.nofollow import SymlinkError, read_beneath, symlink_on_path, symlinks_below
from quantkit.recipe.document import Recipe
from quantkit.scoring.taskconfig import TASK_YAML, read_task_config, task_folder
from quantkit.yamlsrc import dotted


LINK_FIX = "replace the link with the file itself (commit the file, not a symlink to it)"

def checkpoint_problems(recipe: Recipe, root: Path, problem) -> None:
    """GPTQ/AWQ variants of a local model whose architecture GPTQModel cannot quantize in that format: refused
    here, before any work, at the variant's line. (A Hub model's config is read by ``plan``/``run`` once it is
    fetched.)"""
    import json

    from quantkit.gptq import unsupported

    if recipe.model.path is None or not (recipe.gptq or recipe.awq):
        return
    try:
        cfg = json.loads(read_beneath(root, f"{recipe.model.path}/config.json"))
    except (OSError, ValueError, SymlinkError):
        return  # no config yet (made by a setup step) or a link, reported above
    arch = next(iter(cfg.get("architectures") or []), None) if isinstance(cfg, dict) else None
    for fmt in [f for f, x in FORMATS.items() if x.checkpoint]:
        if (why := unsupported(arch, fmt)) is not None:
            for i, _ in enumerate(getattr(recipe, fmt)):
                problem((fmt, i), f"{arch}: {why}", f"remove the {fmt} variant; the GGUF ladder supports this model")


def write_folders(recipe: Recipe, root: Path, problem) -> None:
    """A symlink at (or above) a folder a run writes: ``output.dir/<name>`` (and its tracking run's
    ``<name>.tracked``), ``publish.dir/<name>``. The writers refuse one too, but only after every step has run;
    here it is named at output.dir / publish.dir (the recipe's first line when left to the default)."""
    from quantkit.recipe.publishing import Publish
    from quantkit.tracking import SUFFIX

    for loc, rel, what in ((("output", "dir"), f"{recipe.output.dir}/{recipe.name}", "the run folder"),
                           (("output", "dir"), f"{recipe.output.dir}/{recipe.name}{SUFFIX}",
                            "the tracking run's folder"),
                           (("publish", "dir"), f"{(recipe.publish or Publish()).dir}/{recipe.name}",
                            "the release folder")):
        if (link := symlink_on_path(root, rel)) is not None:
            problem(loc, f"{what} '{rel}' " + ("is a symlink" if link == rel else f"is under a symlink ('{link}')")
                    + "; quantkit writes through no link", f"remove the link '{link}': quantkit makes the folder")


def pointed_problems(recipe: Recipe, root: Path, file: str, lines: dict) -> list[Problem]:
    """Every symlink among the files the recipe points at, and every disallowed part of its local tasks."""
    out: list[Problem] = []

    def problem(loc: tuple, message: str, fix: str = LINK_FIX) -> None:
        line = next((lines[loc[:cut]] for cut in range(len(loc), -1, -1) if loc[:cut] in lines), 0)
        out.append(Problem(file, line, dotted(loc), message, fix))

    def linked(loc: tuple, rel: str, what: str) -> bool:
        if (link := symlink_on_path(root, rel)) is not None:
            problem(loc, f"{what} '{rel}' " + ("is a symlink" if link == rel else f"is under a symlink ('{link}')")
                    + "; quantkit follows no link in what a recipe points at")
            return True
        return False

    write_folders(recipe, root, problem)
    for i, f in enumerate(recipe.calibration.files or []):
        linked(("calibration", "files", i), f, "calibration file")
    for i, f in enumerate(recipe.calibration.conversations):
        linked(("calibration", "conversations", i), f, "calibration conversations")
    if recipe.model.path is not None:
        loc = ("model", "path")
        folder = root / recipe.model.path
        if not linked(loc, recipe.model.path, "model folder") and folder.is_dir():
            if links := symlinks_below(folder):
                problem(loc, f"the model folder has {len(links)} symlink(s): {', '.join(links[:3])}; a link "
                        "would make the worker read (and publish) a file outside the folder")
    checkpoint_problems(recipe, root, problem)
    for i, c in enumerate(recipe.compare):
        if c.repo is None:
            linked(("compare", i, "file"), c.file, f"compare file '{c.label}'")
    if recipe.evaluation is None:
        return out
    linked(("evaluation", "file"), recipe.evaluation.file, "evaluation file")
    for i, s in enumerate(recipe.evaluation.sets):
        linked(("evaluation", "sets", i, "file"), s.file, f"evaluation set '{s.name}'")
    for i, spec in enumerate(recipe.evaluation.tasks):
        loc = ("evaluation", "tasks", i) + (("path",) if spec.path else ())
        rel = task_folder(spec.name, spec.path)
        if linked(loc, rel, "task folder"):
            continue
        folder = root / rel
        if not folder.is_dir():
            if spec.path:
                problem(loc, f"task folder '{rel}' does not exist",
                        "add the folder with its task.yaml, or fix the path")
            continue  # a task lm-eval ships
        if links := symlinks_below(folder):
            problem(loc, f"task folder '{rel}' has symlink(s): {', '.join(links[:3])}")
            continue
        if not (folder / TASK_YAML).is_file():
            if spec.path:
                problem(loc, f"task folder '{rel}' has no {TASK_YAML}", "add task.yaml, or fix the path")
            continue
        try:
            read_task_config(read_beneath(root, f"{rel}/{TASK_YAML}"), file=f"{rel}/{TASK_YAML}", name=spec.name,
                             folder=folder)
        except RecipeError as e:
            out += e.problems
        except SymlinkError as e:  # swapped for a link since the walk above
            problem(loc, str(e))
    return out


def _config(recipe: Recipe, root: Path) -> dict | None:
    """A local model's config.json (read without following a link), or None when it is not there yet."""
    import json

    try:
        data = json.loads(read_beneath(root, f"{recipe.model.path}/config.json"))
    except (OSError, ValueError, SymlinkError):
        return None
    return data if isinstance(data, dict) else None


def resolve_mmproj(recipe: Recipe, root: Path, file: str, lines: dict) -> Recipe:
    """The recipe with ``model.mmproj`` decided for a local model: its config.json's ``vision_config``
    when the recipe leaves it out. A Hub model's is decided when it is downloaded (the ``mmproj`` node).
    A GPTQ/AWQ section of a vision-language model is refused: GPTQModel would quantize its language model
    only and write a checkpoint without the vision tower, which loads as neither the VLM nor a text model."""
    from quantkit.mmproj import vision_architecture

    config = _config(recipe, root) if recipe.model.path is not None else None
    vision = None if config is None else vision_architecture(config) is not None
    problems = []

    def problem(loc: tuple, message: str, fix: str) -> None:
        problems.append(Problem(file, lines.get(loc, lines.get(loc[:1], 0)), dotted(loc), message, fix))

    if recipe.model.mmproj and vision is False:
        problem(("model", "mmproj"), f"model.mmproj is true but {recipe.model.path}/config.json has no "
                "vision_config: the model has no vision projector", "remove model.mmproj")
    if vision or (recipe.model.mmproj and vision is None):
        for fmt in [f for f, x in FORMATS.items() if x.checkpoint]:
            if getattr(recipe, fmt):
                problem((fmt,), f"{fmt} of a vision-language model is not supported: GPTQModel quantizes the "
                        "language model and the checkpoint would lack the vision tower",
                        f"remove the '{fmt}' section (the GGUFs and their projector are published), or point "
                        "model.path at the text model alone")
    if problems:
        raise RecipeError(problems)
    if recipe.model.mmproj is None and vision is not None:
        return recipe.model_copy(update={"model": recipe.model.model_copy(update={"mmproj": vision})})
    return recipe

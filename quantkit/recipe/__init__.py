"""The recipe: a strict schema for one reproducible quantization run.

Recipes arrive in pull requests, so everything here refuses rather than guesses:
unknown keys, unknown type names, moving revisions, paths that leave the
project, strings that could smuggle shell syntax. ``load_recipe`` reports
every problem at once, each with file, line and a fix.

The schema is split by section (``fields``: the shared validators; ``model``: model, calibration,
evaluation; ``quant``: GGUF, GPTQ, AWQ, RTN; ``publishing``: publish, output, schedule, toolchain, serve;
``document``: the whole recipe); ``load`` reads a file and ``files`` checks what the recipe points at.
"""

from quantkit.recipe.document import Recipe
from quantkit.recipe.fields import COMMIT_RE, TEMPLATE_MARKERS, WORKER_ALLOWS_PICKLE, WORKER_ALLOWS_REMOTE_CODE
from quantkit.recipe.load import find_project_root, load_recipe, schema
from quantkit.recipe.model import Calibration, CompareFile, EvalSet, Evaluation, ModelSource, TaskSpec, default_set_name
from quantkit.recipe.publishing import Output, Publish, PublishThresholds
from quantkit.recipe.quant import (AWQVariant, GGUFSection, GGUFTarget, GPTQVariant, ImatrixSpec, MIN_TARGET_BPW,
                                   RTNVariant)

__all__ = ["AWQVariant", "COMMIT_RE", "Calibration", "CompareFile", "EvalSet", "Evaluation", "GGUFSection", "GGUFTarget", "GPTQVariant",
           "ImatrixSpec", "MIN_TARGET_BPW", "ModelSource", "Output", "Publish", "PublishThresholds", "RTNVariant",
           "Recipe", "TEMPLATE_MARKERS", "TaskSpec", "WORKER_ALLOWS_PICKLE", "WORKER_ALLOWS_REMOTE_CODE",
           "default_set_name", "find_project_root", "load_recipe", "schema"]

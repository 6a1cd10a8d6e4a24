"""The run context: what every node of a run reads, made from the environment once.

The CLI, the Prefect flow and a Ray worker all build it with ``RunContext.from_env`` (so
``QUANTKIT_CUDA``, ``QUANTKIT_THREADS`` and ``QUANTKIT_STORE`` mean the same everywhere). It is frozen
and picklable: a node in another process gets a copy, and nodes exchange results, never this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.recipe import Recipe, find_project_root, load_recipe
from quantkit.store import Store, default_store_root
from quantkit.toolchain import Toolchain, ensure_toolchain, find_toolchain

CUDA_ENV = "QUANTKIT_CUDA"
THREADS_ENV = "QUANTKIT_THREADS"


def wants_cuda() -> bool:
    return os.environ.get(CUDA_ENV) == "1"


def threads_from_env() -> int:
    return int(os.environ.get(THREADS_ENV, 0) or 0) or os.cpu_count() or 1


@dataclass(frozen=True)
class RunContext:
    recipe: Recipe
    recipe_file: Path
    root: Path
    store: Store
    toolchain: Toolchain | None  # None only for `plan` before the toolchain is built
    threads: int

    @classmethod
    def from_env(cls, recipe_file: str | Path, *, toolchain: str = "ensure") -> RunContext:
        """``toolchain``: "ensure" builds the pinned llama.cpp when missing, "find" only looks for it
        (None when absent, for ``plan``)."""
        path = Path(recipe_file)
        root = find_project_root(path.parent)
        recipe = load_recipe(path, root=root)  # a bad recipe fails here, before any work
        if toolchain == "ensure":
            tc = ensure_toolchain(cuda=wants_cuda())
        else:
            try:
                tc = find_toolchain(cuda=wants_cuda())
            except QuantkitError:
                tc = None
        return cls(recipe=recipe, recipe_file=path.resolve(), root=root, store=Store(default_store_root()),
                   toolchain=tc, threads=threads_from_env())

    @property
    def tools(self) -> Toolchain:
        if self.toolchain is None:
            from quantkit.errors import ToolchainError

            raise ToolchainError("the pinned llama.cpp toolchain is not built")
        return self.toolchain

"""The run context: what every node of a run reads, made from the environment of the process that runs it.

A node carries only what is the same on every machine, a ``RunSpec`` (the recipe file and its sha256, the
project root, the store root); the process that runs the node builds its ``RunContext`` from it and from
its own environment (``RunSpec.context``): the toolchain (``QUANTKIT_CUDA``), the thread count
(``QUANTKIT_THREADS``), the torch device. The CLI builds one the same way with ``RunContext.from_env``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError, RecipeChanged
from quantkit.recipe import Recipe, find_project_root, load_recipe
from quantkit.store import Store, default_store_root
from quantkit.toolchain import Toolchain, ensure_toolchain, find_toolchain, recipe_toolchain

CUDA_ENV = "QUANTKIT_CUDA"
THREADS_ENV = "QUANTKIT_THREADS"


def wants_cuda() -> bool:
    return os.environ.get(CUDA_ENV) == "1"


def _toolchain(recipe: Recipe, *, build: bool) -> Toolchain:
    """The recipe's llama.cpp: quantkit's pin, or the release its ``toolchain`` section pins (built when
    missing with ``build``, else only found)."""
    if recipe.toolchain is None or recipe.toolchain.version is None:
        return ensure_toolchain(cuda=wants_cuda()) if build else find_toolchain(cuda=wants_cuda())
    return recipe_toolchain(recipe.toolchain, cuda=wants_cuda(), build=build)


def _gpu_driver() -> bool:
    """Whether an NVIDIA (``/proc/driver/nvidia/gpus/*``) or AMD ROCm (``/dev/kfd``) GPU driver is loaded: without
    one, torch cannot see a GPU."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/kfd").exists()


def threads_from_env() -> int:
    return int(os.environ.get(THREADS_ENV, 0) or 0) or os.cpu_count() or 1


@dataclass(frozen=True)
class RunSpec:
    """What a node needs to build its context anywhere: paths every machine shares, and the recipe's sha256
    so that a recipe edited after the run started is refused rather than mixed in."""

    recipe_file: Path
    root: Path
    store_root: Path
    recipe_sha256: str

    def context(self) -> RunContext:
        """This process's context for the run: built once per process (and environment), then reused."""
        env = (os.environ.get(CUDA_ENV), os.environ.get(THREADS_ENV))
        with _BUILDING:
            ctx = _CONTEXTS.get((self, env))
            if ctx is None:
                ctx = _CONTEXTS[(self, env)] = RunContext.from_spec(self)
        return ctx


_CONTEXTS: dict[tuple[RunSpec, tuple], RunContext] = {}
_BUILDING = threading.Lock()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
            tc = _toolchain(recipe, build=True)
        else:
            try:
                tc = _toolchain(recipe, build=False)
            except QuantkitError:
                tc = None
        ctx = cls(recipe=recipe, recipe_file=path.resolve(), root=root, store=Store(default_store_root()),
                  toolchain=tc, threads=threads_from_env())
        ctx.store.made_by = ctx.made_by()
        return ctx

    @classmethod
    def from_spec(cls, spec: RunSpec) -> RunContext:
        """The context of a node's process: the recipe and the store from ``spec``, the toolchain, threads and
        device from this machine. The toolchain is built here when missing (a GPU worker's CUDA build)."""
        found = _sha256(spec.recipe_file)
        if found != spec.recipe_sha256:
            raise RecipeChanged(str(spec.recipe_file), spec.recipe_sha256, found)
        recipe = load_recipe(spec.recipe_file, root=spec.root)
        tc = _toolchain(recipe, build=True)
        store = Store(spec.store_root)
        ctx = cls(recipe=recipe, recipe_file=spec.recipe_file, root=spec.root, store=store, toolchain=tc,
                  threads=threads_from_env())
        store.made_by = ctx.made_by()
        return ctx

    @functools.cached_property
    def spec(self) -> RunSpec:
        """What a node of this run carries to the process that runs it (the recipe's sha256 read once)."""
        return RunSpec(self.recipe_file, self.root, self.store.root, _sha256(self.recipe_file))

    @functools.cached_property
    def device(self) -> str:
        """Where torch scores and benches checkpoints: the GPU when this machine has one. A machine without a
        GPU driver is answered without importing torch (seconds), since every run reads it for the keys."""
        if not _gpu_driver():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def made_by(self) -> dict:
        """What of this machine went into a result: recorded with every store entry it builds."""
        tc = self.toolchain
        return {"host": socket.gethostname(), "toolchain": tc.build if tc else None,
                "toolchain_dir": str(tc.bin_dir) if tc else None, "threads": self.threads}

    @property
    def tools(self) -> Toolchain:
        if self.toolchain is None:
            from quantkit.errors import ToolchainError

            raise ToolchainError("the pinned llama.cpp toolchain is not built")
        return self.toolchain

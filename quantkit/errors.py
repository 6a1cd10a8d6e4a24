"""One error hierarchy. Every error carries its context and stays picklable
(Prefect moves exceptions between processes), so no error takes keyword-only
state that ``Exception.__reduce__`` would drop."""

from __future__ import annotations

from dataclasses import dataclass


class QuantkitError(Exception):
    """Base of every error quantkit raises on purpose. The CLI prints these as
    one line plus a tip; anything else is a bug and gets a traceback."""

    tip: str | None = None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where, what, and how to fix it."""

    file: str
    line: int
    where: str  # dotted path in the recipe, e.g. "gguf.types[2]"
    message: str
    fix: str

    def __str__(self) -> str:
        where = f" {self.where}:" if self.where else ""
        return f"{self.file}:{self.line}:{where} {self.message} (fix: {self.fix})"


class RecipeError(QuantkitError, ValueError):
    """A recipe that must not run. Holds every problem found, not just the first."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]):
        self.problems = tuple(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class ToolError(QuantkitError, RuntimeError):
    """An external tool exited non-zero. Keeps the command line, the exit code
    and the tail of what it wrote, so the cause is visible without the logs."""

    def __init__(self, command: list[str], returncode: int, output_tail: str):
        self.command = list(command)
        self.returncode = returncode
        self.output_tail = output_tail
        super().__init__(command, returncode, output_tail)

    def __str__(self) -> str:
        cmd = " ".join(self.command)
        return f"{self.command[0]} exited with code {self.returncode}\n  command: {cmd}\n{self.output_tail}"


class ToolchainError(QuantkitError, RuntimeError):
    """The pinned llama.cpp toolchain is missing, mismatched or failed to build."""

    tip = "run `quantkit toolchain --build` to build the pinned llama.cpp once"


class SourceError(QuantkitError, RuntimeError):
    """The model source could not be resolved (not downloaded, offline, refused files)."""


class VerificationError(QuantkitError, RuntimeError):
    """A produced file is not what the step promised (checked by reading it back)."""


class StoreError(QuantkitError, RuntimeError):
    """The content-addressed store is inconsistent or cannot be written."""

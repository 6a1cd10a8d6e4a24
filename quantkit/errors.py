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
        # one problem, one line: a refused value can hold a newline, which must not print a line that looks
        # like another problem
        return _one_line(f"{self.file}:{self.line}:{where} {self.message} (fix: {self.fix})")


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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


class PublishError(QuantkitError, RuntimeError):
    """A run could not be published (target exists, file too large, no token, upload failed)."""


class RegressionError(QuantkitError, RuntimeError):
    """A re-run scored worse than the last published run (or under a recovery floor): not published.
    ``findings`` are the failed checks as dicts (id, check, previous, now, limit)."""

    tip = "see the 'Regression check' section of report.md; fix the cause or raise the recipe's publish.thresholds"

    def __init__(self, recipe: str, findings: list[dict] | tuple[dict, ...], report: str | None = None):
        self.recipe = recipe
        self.findings = tuple(findings)
        self.report = report
        super().__init__(recipe, self.findings, report)

    def __str__(self) -> str:
        lines = [f"{self.recipe}: {len(self.findings)} regression(s), not published"
                 + (f" (report: {self.report})" if self.report else "")]
        lines += [f"  {f['id']}: {f['message']}" for f in self.findings]
        return "\n".join(lines)


class ChanceLevelError(QuantkitError, RuntimeError):
    """A task scored no better than guessing on a variant that must beat it (the base model, Q8_0).
    ``p_value`` is the exact one-sided test of "uniform guessing on every item" (see quantkit.scoring.tasks)."""

    tip = "check the task's gold labels and prompt format, or give it more items (evaluation.tasks[].limit)"

    def __init__(self, task: str, label: str, backend: str, metric: str, accuracy: float, n: int, chance: float,
                 p_value: float, alpha: float):
        self.task, self.label, self.backend, self.metric = task, label, backend, metric
        self.accuracy, self.n, self.chance, self.p_value, self.alpha = accuracy, n, chance, p_value, alpha
        super().__init__(task, label, backend, metric, accuracy, n, chance, p_value, alpha)

    def __str__(self) -> str:
        return (f"task {self.task} scores at chance on {self.label} ({self.backend}): {self.metric} "
                f"{self.accuracy:.3f} over {self.n} items, chance {self.chance:.3f}, one-sided exact binomial "
                f"p = {self.p_value:.3g} >= {self.alpha}")


class ResourceError(QuantkitError, RuntimeError):
    """Not enough disk or memory for what the run still has to do (checked before any work)."""

    tip = "free space, point QUANTKIT_STORE at a larger disk, or shorten the recipe (`quantkit plan` shows the estimates)"


class NodeDoesNotFit(ResourceError):
    """The machine that picked a node has less free disk or available RAM than the node's estimate."""

    def __init__(self, node: str, host: str, need_disk: int | None, need_ram: int | None, free_disk: int,
                 available_ram: int):
        self.node, self.host = node, host
        self.need_disk, self.need_ram = need_disk, need_ram
        self.free_disk, self.available_ram = free_disk, available_ram
        super().__init__(node, host, need_disk, need_ram, free_disk, available_ram)

    def __str__(self) -> str:
        gib = 2**30
        short = []
        if self.need_disk and self.need_disk > self.free_disk:
            short.append(f"about {self.need_disk / gib:.2f} GiB of disk, {self.free_disk / gib:.2f} GiB is free")
        if self.need_ram and self.need_ram > self.available_ram:
            short.append(f"about {self.need_ram / gib:.2f} GiB of RAM, "
                         f"{self.available_ram / gib:.2f} GiB is available")
        return f"{self.host} cannot run {self.node}: it needs {'; and '.join(short)}"


class RecipeChanged(QuantkitError, RuntimeError):
    """The recipe file a node's machine reads is not the one the run was planned from."""

    tip = "let the run finish before editing its recipe, or start it again"

    def __init__(self, path: str, planned: str, found: str):
        self.path, self.planned, self.found = path, planned, found
        super().__init__(path, planned, found)

    def __str__(self) -> str:
        return (f"{self.path} changed since the run was planned (sha256 {self.planned[:12]}, now {self.found[:12]}); "
                "a node would run another recipe than its inputs were made for")

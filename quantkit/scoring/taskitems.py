"""A multiple-choice task's items and one variant's result on them, and the test against guessing.

Shared by both backends: lm-eval's (``quantkit.scoring.tasks``) and llama-perplexity's
(``quantkit.scoring.tasks_llamacpp``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from quantkit.errors import ChanceLevelError


@dataclass(frozen=True)
class TaskItem:
    """One multiple-choice question as both backends see it: ``context + " " + choice``."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class TaskResult:
    """Accuracy of one variant on one task. Metrics a backend does not compute are None."""

    task: str
    backend: str  # "lm-eval-hf" or "llama-perplexity"
    acc: float | None
    acc_norm: float | None
    acc_token_norm: float | None
    n: int
    chance: float  # expected accuracy of uniform guessing, mean of 1/k_i
    metric: str  # the accuracy the chance test used
    p_value: float  # P(at least this many right | uniform guessing), exact
    correct: tuple[int, ...] = field(repr=False)  # per item, for ``metric``
    seconds: float = 0.0
    versions: dict = field(default_factory=dict)
    per_item: dict = field(default_factory=dict, repr=False)  # {metric: per-item 0/1} for every metric computed

    def to_dict(self) -> dict:
        return asdict(self) | {"correct": list(self.correct),
                               "per_item": {m: list(v) for m, v in self.per_item.items()}}


# ---------------------------------------------------------------- chance test

def p_above_chance(correct: list[int] | tuple[int, ...], n_choices: list[int] | tuple[int, ...]) -> float:
    """Exact one-sided p-value of getting at least ``sum(correct)`` right by uniform guessing.

    Item i is right with probability 1/n_choices[i] under the null; the count of
    right items is Poisson-binomial (binomial when all k are equal).
    """
    dist = [1.0]
    for k in n_choices:
        p = 1.0 / k
        nxt = [0.0] * (len(dist) + 1)
        for j, mass in enumerate(dist):
            nxt[j] += mass * (1 - p)
            nxt[j + 1] += mass * p
        dist = nxt
    return min(1.0, sum(dist[sum(correct):]))


def check_above_chance(result: dict, *, label: str, alpha: float) -> None:
    """Raise ``ChanceLevelError`` when a task's accuracy is not significantly above guessing."""
    if result["p_value"] >= alpha:
        raise ChanceLevelError(result["task"] if "task" in result else "?", label, result["backend"],
                               result["metric"], result[result["metric"]], result["n"], result["chance"],
                               result["p_value"], alpha)

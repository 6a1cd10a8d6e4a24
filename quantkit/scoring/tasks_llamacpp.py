"""Multiple-choice tasks on a GGUF: ``llama-perplexity --multiple-choice`` (tools/perplexity/perplexity.cpp).

The items come from ``quantkit.scoring.tasks.load_items`` (lm-eval's own prompts), written
in the binary layout ``multiple_choice_score`` reads from ``-bf``:

    uint32 n_task, uint32 offset[n_task] (byte offset of each task in the file),
    then per task: string question; mc1 = uint32 n, n strings, int32 label[n]
    (1 = correct); mc2 = the same with n = 0 (llama.cpp does not score it).
    A string is uint32 byte length + UTF-8 bytes; all little-endian.

llama.cpp tokenizes ``question + " " + answer`` with BOS (when the vocabulary
adds one) and picks the answer with the highest mean log-likelihood per token
after the prefix all answers share: recorded as ``acc_token_norm``. It prints
only the running accuracy after each task (``n_done<TAB>100*n_correct/n_done``),
from which the per-item results are recovered.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import time
from pathlib import Path

from quantkit.errors import VerificationError
from quantkit.scoring.llamacpp import perplexity_until_parsed
from quantkit.scoring.taskitems import TaskItem, TaskResult, p_above_chance
from quantkit.store import Store

BACKEND = "llama-perplexity"
# llama-perplexity's context is n_parallel * -c; it packs whole tasks (one sequence per answer) into it, at
# most n_parallel / 4 tasks per batch, and allocates n_ctx * n_vocab floats of logits. 64 sequences in a
# 4096-token context batch about 16 tasks: on the demo's 100 first finish-the-sentence items that took 38 s
# of CPU against 81 s with 16 sequences in 1024 tokens (4 tasks a batch), same answers; 128 or 256 sequences
# took longer again. The context grows past 4096 only for a task that does not fit.
PARALLEL = 64
BATCH_CTX = 4096
MIN_CTX = 512
_RUNNING = re.compile(r"^(\d+)\t(\d+\.\d+)\s*$", re.M)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _answer(continuation: str, delimiter: str = " ") -> str:
    # llama.cpp joins question and answer with one space; lm-eval's continuation starts with the delimiter.
    if not continuation.startswith(delimiter):
        raise VerificationError(f"choice {continuation!r} does not start with a space; llama-perplexity joins "
                                "question and answer with one space, so target_delimiter must be ' '")
    return continuation[len(delimiter):]


def write_mc_file(items: list[TaskItem], path: Path) -> None:
    """The items in llama-perplexity's ``--multiple-choice`` binary format."""
    bodies = []
    for it in items:
        answers = [_answer(c) for c in it.choices]
        if not it.context or any(not a for a in answers):
            raise VerificationError("llama-perplexity refuses tasks with an empty question or answer")
        body = _string(it.context) + struct.pack("<I", len(answers)) + b"".join(_string(a) for a in answers)
        body += struct.pack(f"<{len(answers)}i", *(int(i == it.gold) for i in range(len(answers))))
        body += struct.pack("<I", 0)  # mc2: no answers
        bodies.append(body)
    offset = 4 + 4 * len(items)
    positions = []
    for b in bodies:
        positions.append(offset)
        offset += len(b)
    Path(path).write_bytes(struct.pack(f"<I{len(items)}I", len(items), *positions) + b"".join(bodies))


def context_size(items: list[TaskItem]) -> int:
    """Total context that fits the largest task: a token is at least one byte, plus BOS, a power of two."""
    need = max(len(it.context.encode()) + sum(len(c.encode()) for c in it.choices) + 2 for it in items)
    size = MIN_CTX
    while size < need:
        size *= 2
    return size


def per_item_correct(text: str, n: int) -> list[int]:
    """Per-item 0/1 from the running accuracies llama-perplexity prints after each task."""
    # The log file and the output tail may both hold a row: the same run, the same numbers.
    running = {int(a): float(b) for a, b in _RUNNING.findall(text)}
    if sorted(running) != list(range(1, n + 1)):
        raise VerificationError(f"llama-perplexity printed {len(running)} of {n} multiple-choice results; "
                                "its output ended with:\n" + "\n".join(text.splitlines()[-15:]))
    totals = [0] + [round(running[done] * done / 100) for done in range(1, n + 1)]
    return [totals[i + 1] - totals[i] for i in range(n)]


def score_task_gguf(*, gguf: Path, task: str, items: list[TaskItem], toolchain, threads: int | None = None,
                    store: Store | None = None) -> TaskResult:
    """One multiple-choice task on a GGUF; its data file goes to ``store``'s scratch space (when given)."""
    threads = threads or os.cpu_count() or 1
    start = time.perf_counter()
    with store.scratch("mc") if store is not None else tempfile.TemporaryDirectory(prefix="quantkit-mc-") as tmp:
        data = Path(tmp) / "tasks.bin"
        write_mc_file(items, data)
        per_seq = max(BATCH_CTX, context_size(items)) // PARALLEL
        correct = perplexity_until_parsed(
            ["-m", Path(gguf).resolve(), "-bf", data, "--multiple-choice", "-np", str(PARALLEL), "-c", str(per_seq)],
            workdir=Path(tmp), toolchain=toolchain, threads=threads, what=f"{Path(gguf).name} {task}",
            parse=lambda text, _seconds: per_item_correct(text, len(items)))
    n_choices = [len(it.choices) for it in items]
    n = len(items)
    return TaskResult(task=task, backend=BACKEND, acc=None, acc_norm=None, acc_token_norm=sum(correct) / n, n=n,
                      chance=sum(1 / k for k in n_choices) / n, metric="acc_token_norm",
                      p_value=p_above_chance(correct, n_choices), correct=tuple(correct),
                      seconds=round(time.perf_counter() - start, 3), versions={"llama_cpp": toolchain.commit},
                      per_item={"acc_token_norm": tuple(correct)})

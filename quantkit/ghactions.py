"""Recipe problems as GitHub Actions workflow commands, so a pull request shows them on the line.

GitHub reads ``::error file=F,line=L,title=T::MESSAGE`` lines from a step's output and annotates
that line of the diff. Its escaping rules (the runner's ``ActionCommand`` and
``@actions/core``'s ``toCommandValue``): in the message, ``%`` ``\\r`` ``\\n`` become ``%25`` ``%0D``
``%0A``; in a property value ``:`` and ``,`` also become ``%3A`` and ``%2C``, because they end a
property. ``%`` goes first, so an escape is never escaped twice. Without that, a recipe value
that contains a newline could end the annotation and start a workflow command of its own.
"""

from __future__ import annotations

from quantkit.errors import Problem


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def workflow_command(command: str, message: str, **properties: str | int | None) -> str:
    """``::command key=value,…::message`` with every part escaped; None properties are left out."""
    props = ",".join(f"{k}={escape_property(str(v))}" for k, v in properties.items() if v is not None)
    return f"::{command}{' ' + props if props else ''}::{escape_data(message)}"


def annotation(problem: Problem) -> str:
    """One recipe problem as an ``::error`` line on its file and line (no line when it is unknown)."""
    title = f"recipe: {problem.where}" if problem.where else "recipe"
    return workflow_command("error", f"{problem.message} (fix: {problem.fix})", file=problem.file,
                            line=problem.line if problem.line > 0 else None, title=title)

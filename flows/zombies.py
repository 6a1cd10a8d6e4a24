"""Mark flow runs whose process died (a SIGKILLed worker, a lost machine) as Crashed.

A flow run that dies without reporting stays Running on the server for ever, and
`prefect flow-run retry` refuses a run that is not finished. Flow runs started by a
worker send a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds; this
automation, Prefect's documented recipe for self-hosted servers
(https://docs.prefect.io/v3/advanced/detect-zombie-flows), marks a run Crashed when
three heartbeats in a row are missing. After that, `prefect flow-run retry <run>`
schedules it again and the store skips every step that had finished.

    python flows/zombies.py            # create it on the server PREFECT_API_URL names (idempotent)

scripts/prefect-up.sh runs this; the worker environments set the heartbeat frequency.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from quantkit.deployments import HEARTBEAT_SECONDS  # what the pools in prefect.yaml export

NAME = "quantkit: crash flow runs that stopped sending heartbeats"
MISSED = 3  # heartbeats missing before a run is declared dead


def automation(heartbeat_seconds: int = HEARTBEAT_SECONDS) -> Automation:
    finished = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=NAME,
        description="A flow run that misses heartbeats has lost its process; Crashed lets it be retried.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *finished},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=heartbeat_seconds * MISSED),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {heartbeat_seconds * MISSED} s: the flow run's "
                                            "process is gone (retry it: prefect flow-run retry <run>)")],
    )


def _shape(a: Automation) -> tuple:
    # the server gives the trigger an id of its own: compare what it does, not what it is called
    return a.trigger.model_dump(exclude={"id"}), [x.model_dump() for x in a.actions], a.enabled


def ensure(heartbeat_seconds: int = HEARTBEAT_SECONDS) -> tuple[Automation, bool]:
    """The automation on the current server; created when missing, updated when its window differs."""
    wanted = automation(heartbeat_seconds)
    try:
        current = Automation.read(name=NAME)
    except ValueError:  # Automation.read raises ValueError when no automation has that name
        return wanted.create(), True
    if _shape(current) != _shape(wanted):
        wanted.id = current.id
        wanted.update()
        return wanted, True
    return current, False


if __name__ == "__main__":
    seconds = int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_SECONDS))
    made, changed = ensure(seconds)
    print(f"automation '{NAME}': {'created/updated' if changed else 'already there'} ({made.id}); "
          f"a run missing {MISSED} heartbeats of {seconds} s is marked Crashed", file=sys.stderr)

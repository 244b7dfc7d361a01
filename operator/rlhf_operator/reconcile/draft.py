"""A decision being built: the state machine's working state, shared by its modules (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from rlhf_operator import builders
from rlhf_operator.api import RLHFJob, RLHFJobStatus, StageStatus
from rlhf_operator.reconcile.conditions import set_condition
from rlhf_operator.reconcile.model import Action, Decision, Event, Observed


@dataclass
class Draft:
    """The inputs plus the status, actions and events so far; `decision()` is the outcome."""

    job: RLHFJob
    status: RLHFJobStatus
    observed: Observed
    now: datetime
    generation: int | None
    actions: list[Action]
    events: list[Event]
    deleting: bool = False  # the job itself is being deleted (finalizer)
    deleting_since: datetime | None = None
    wait: str | None = None  # finalizer: why the job cannot be let go yet

    @property
    def name(self) -> str:
        return self.job.metadata.name

    @property
    def namespace(self) -> str | None:
        return self.job.metadata.namespace

    @property
    def uid(self) -> str | None:
        return (self.job.metadata.model_extra or {}).get("uid")

    def owner(self) -> dict:
        return builders.owner_reference({"name": self.name, "uid": self.uid or ""})

    def normal(self, reason: str, message: str) -> None:
        self.events.append(Event("Normal", reason, message))

    def warning(self, reason: str, message: str) -> None:
        self.events.append(Event("Warning", reason, message))

    def condition(self, type_: str, value: bool, reason: str, message: str = "") -> None:
        set_condition(
            self.status,
            type_,
            "True" if value else "False",
            reason,
            message,
            self.now,
            self.generation,
        )

    def stage(self, name: str) -> StageStatus:
        return self.status.stages.setdefault(name, StageStatus())

    def decision(self) -> Decision:
        return Decision(
            status=self.status, actions=self.actions, events=self.events, wait=self.wait
        )

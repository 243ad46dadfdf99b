"""A thread's history: its journal replayed step by step, with the outputs of each step.

The journal keeps events and a check per step (output count, CRC, pending ids), not the
outputs themselves. Replaying it with an instance that collects its outputs instead of dropping
them gives each step's records, and comparing each step with its check finds the first step the
code of today no longer reproduces. ``kwf history``, ``kwf replay``, ``kwf timeline`` and
``kwf.testing.Engine.history`` all read a thread through ``replay`` here, so a history looks the
same whichever engine recorded it. Nothing here writes a journal or talks to Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kwf.config import Settings
from kwf.errors import NonDeterminismError
from kwf.instance import Instance, _describe
from kwf.journal import Check, Event, Journal
from kwf.protocol import Headers, Record, output_record
from kwf.registry import Workflow

__all__ = ["History", "Step", "replay"]


@dataclass(frozen=True)
class Step:
    """One step of a thread: what woke it (None for the start), when, and what it wrote."""

    number: int
    event: Event | None
    time: float
    outputs: tuple[Record, ...]
    """Every record the step wrote, the ``workflow-events`` status record included."""
    pending: tuple[str, ...]
    """Suspend ids still waiting after the step."""
    timers: tuple[float, ...]
    """Durable timers after the step (due times, seconds since the epoch)."""
    diverged: str | None = None
    """Why today's code does not reproduce this step (then the history stops here)."""

    @property
    def kind(self) -> str:
        return "start" if self.event is None else str(self.event[0])

    @property
    def ref(self) -> Any:
        return None if self.event is None else self.event[2]

    @property
    def payload(self) -> Any:
        return None if self.event is None else self.event[3]

    @property
    def origin(self) -> str | None:
        """The offset of the ``workflow-resume`` record that caused the step (``17``), or for a
        timer ``<last record's offset>.<k>``; None for the start (see ``Journal.origin``)."""
        return None if self.event is None else str(self.event[4])

    def as_dict(self, events_topic: str | None = None) -> dict[str, Any]:
        """JSON-ready; outputs to ``events_topic`` (the status records) are left out if given."""
        return {"step": self.number, "kind": self.kind, "time": self.time, "ref": self.ref,
                "origin": self.origin,
                "payload": self.payload, "pending": list(self.pending),
                "timers": list(self.timers), "diverged": self.diverged,
                "outputs": [{"topic": r.topic, "key": r.key, "value": r.value,
                             "headers": dict(_text_headers(r.headers))}
                            for r in self.outputs if r.topic != events_topic]}


@dataclass
class History:
    """A thread's steps as today's code replays its journal."""

    journal: Journal
    workflow: str
    steps: list[Step] = field(default_factory=list)
    replayed: bool = True
    """False when the journal could not be replayed (a tombstone, or the workflow is not
    served): ``steps`` then only list the journal's events, without outputs."""
    note: str | None = None
    """Why the history is partial, when it is."""

    @property
    def divergence(self) -> Step | None:
        """The first step today's code does not reproduce, if any."""
        return next((s for s in self.steps if s.diverged is not None), None)

    def as_dict(self, events_topic: str | None = None) -> dict[str, Any]:
        j = self.journal
        return {"thread": j.thread, "workflow": self.workflow, "status": j.status,
                "started": j.started, "origin": j.origin, "arg": j.arg, "step": j.step,
                "result": j.result,
                "replayed": self.replayed, "note": self.note,
                "divergence": None if self.divergence is None else self.divergence.number,
                "steps": [s.as_dict(events_topic) for s in self.steps]}


class _Collecting(Instance):
    """A replaying instance that keeps the records each step writes instead of dropping them."""

    collected: list[Record]

    def _emit(self, topic: str, key: str, value: str | None,
              extra: tuple[tuple[str, str], ...] = (), checked: str | None = None) -> None:
        super()._emit(topic, key, value, extra, checked)
        self.collected.append(output_record(topic, key, value, thread=self.thread_id,
                                            seq=self.seq, step=self.step,
                                            time=self.loop.time(), extra=extra))


def replay(journal: Journal, workflow: Workflow | None, settings: Settings) -> History:
    """Replay ``journal`` under ``workflow`` (today's code), one ``Step`` per journal step.

    Stops at the first step that diverges from the journal's check. With no workflow, or a
    tombstone (a finished thread keeps no events), the history lists what the journal has.
    """
    history = History(journal, journal.workflow)
    if journal.finished and not journal.events:
        history.replayed = False
        history.note = (f"the thread {journal.status} at step {journal.step}; a finished thread "
                        "keeps only its status and result (its events were dropped)")
        return history
    if journal.refused is not None:
        workflow, history.note = None, journal.refused
    if workflow is None:
        history.replayed = False
        history.note = history.note or (f"workflow {journal.workflow!r} is not served here: "
                                        "the journal's events and waits only, no outputs")
        history.steps = [Step(journal.base_step + i, e, e[1] if e else journal.started, (),
                              check[2], ())
                         for i, (e, check) in enumerate(zip([None, *journal.events],
                                                            journal.checks))]
        return history
    inst = _Collecting(workflow, journal, settings, replaying=True)
    inst.collected = []
    try:
        for event, check in zip([None, *journal.events], journal.checks):
            diverged = _run_step(inst, event, check)
            history.steps.append(Step(
                inst.step, event, journal.started if event is None else event[1],
                tuple(inst.collected), tuple(inst.pending),
                tuple(inst.loop.timer_dues()) if inst.status == "running" else (), diverged))
            inst.collected = []
            if diverged is not None:
                break
    finally:
        inst.dispose()
    return history


def _run_step(inst: _Collecting, event: Event | None, check: Check) -> str | None:
    """Run one replayed step; the divergence message, or None if it matches the journal."""
    what = "start" if event is None else _describe(event)
    try:
        if inst._step(event) is None:
            inst._diverged(f"the journal applied {what}, but the code has nothing waiting for it")
        inst._verify(check, what)
    except NonDeterminismError as e:
        return str(e)
    return None


def _text_headers(headers: Headers) -> list[tuple[str, str]]:
    return [(k, v.decode(errors="replace") if isinstance(v, bytes) else v) for k, v in headers]

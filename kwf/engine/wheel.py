"""The timer wheel's Bytewax step: one ``op.stateful`` logic per wheel slot (``kwf.wheel``).

Only these keys hold a Bytewax wakeup for durable timers and tombstone expiries (plus the
``workflow-scheduler`` keys), however many threads wait. The input clock is consumed through
``TimerClock`` alone: the time up to which due timers may fire, and when Bytewax should call
back for a due time, so that the clock's implementation can change without touching this.
"""

from __future__ import annotations

from datetime import datetime
from typing import Generic, Protocol, TypeVar

import bytewax.operators as op
from typing_extensions import override

from kwf.protocol import Record
from kwf.wheel import Arm, WheelState, slot_of


class TimerClock(Protocol):
    """What the wheel needs of the engine's input clock."""

    def now(self) -> float:
        """The time up to which due timers may fire (the wall clock, held back by the input)."""
        ...

    def notify_at(self, due: float | None) -> datetime | None:
        """When Bytewax should call back for a timer due at ``due``."""
        ...


class _Due(Protocol):
    """Due times that fire records to ``workflow-resume``, under one Bytewax key."""

    key: str
    entries: dict[str, float]

    def wakeup(self) -> float | None: ...

    def on_timer(self, now: float, resume_topic: str) -> list[Record]: ...


V = TypeVar("V")
"""What the step receives: an ``Arm`` (wheel), or a parsed ``workflow-scheduler`` record."""
S = TypeVar("S", bound=_Due)
"""The key's state: a ``WheelState`` slot, or a ``ScheduleState``."""


class DueLogic(op.StatefulLogic[V, Record, tuple[str, dict[str, float]]], Generic[V, S]):
    """Bytewax's handle on one key of due times: a wheel slot, or a ``workflow-scheduler`` key.

    Both fire records to ``workflow-resume`` once the input clock reaches their due time, and
    both snapshot ``(key, entries)`` (builders are not given the key). Subclasses say how an
    item changes the state (``_add``).
    """

    def __init__(self, resume_topic: str, clock: TimerClock, state: S | None) -> None:
        self.resume_topic = resume_topic
        self.clock = clock
        self.state = state

    def _add(self, state: S | None, value: V) -> S:
        raise NotImplementedError

    def _done(self, records: list[Record]) -> tuple[list[Record], bool]:
        empty = self.state is None or not self.state.entries
        return records, self.DISCARD if empty else self.RETAIN

    @override
    def on_item(self, value: V) -> tuple[list[Record], bool]:
        self.state = self._add(self.state, value)
        return self._done([])

    @override
    def on_notify(self) -> tuple[list[Record], bool]:
        if self.state is None:
            return self._done([])
        return self._done(self.state.on_timer(self.clock.now(), self.resume_topic))

    @override
    def notify_at(self) -> datetime | None:
        return self.clock.notify_at(self.state.wakeup()) if self.state is not None else None

    @override
    def snapshot(self) -> tuple[str, dict[str, float]]:
        assert self.state is not None
        return self.state.key, dict(self.state.entries)


class WheelLogic(DueLogic[Arm, WheelState]):
    """One timer wheel slot (``kwf.wheel.WheelState``)."""

    def __init__(self, resume_topic: str, clock: TimerClock,
                 resume: tuple[str, dict[str, float]] | None) -> None:
        super().__init__(resume_topic, clock, WheelState(*resume) if resume is not None else None)

    @override
    def _add(self, state: WheelState | None, value: Arm) -> WheelState:
        if state is None:
            state = WheelState(slot_of(value.thread))
        state.on_arm(value)
        return state

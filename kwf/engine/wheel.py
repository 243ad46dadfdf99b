"""The timer wheel's Bytewax step: one ``op.stateful`` logic per wheel slot (``kwf.wheel``).

Only these keys hold a Bytewax wakeup for durable timers and tombstone expiries (plus the
``workflow-scheduler`` keys), however many threads wait. The input clock is consumed through
``TimerClock`` alone: the time up to which due timers may fire, and when Bytewax should call
back for a due time, so that the clock's implementation can change without touching this.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

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


class WheelLogic(op.StatefulLogic[Arm, Record, tuple[str, dict[str, float]]]):
    """Bytewax's handle on one timer wheel slot (``kwf.wheel.WheelState``)."""

    def __init__(self, resume_topic: str, clock: TimerClock,
                 resume: tuple[str, dict[str, float]] | None) -> None:
        self.resume_topic = resume_topic
        self.clock = clock
        self.state = WheelState(*resume) if resume is not None else None

    def _done(self, records: list[Record]) -> tuple[list[Record], bool]:
        empty = self.state is None or not self.state.entries
        return records, self.DISCARD if empty else self.RETAIN

    @override
    def on_item(self, value: Arm) -> tuple[list[Record], bool]:
        if self.state is None:
            self.state = WheelState(slot_of(value.thread))
        self.state.on_arm(value)
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

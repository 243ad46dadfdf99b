"""The timer wheel's Bytewax step: one ``op.stateful`` logic per wheel slot (``kwf.wheel``).

Only these keys hold a Bytewax wakeup for durable timers and tombstone expiries, and the
``workflow-scheduler`` entries are held the same way (``ScheduleSlot``: the scheduler keys of
one slot), so at most ``2 × SLOTS`` keys hold a wakeup however many threads and entries wait.
The input clock is consumed through ``TimerClock`` alone: the time up to which due timers may
fire, and when Bytewax should call back for a due time, so that the clock's implementation can
change without touching this.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import bytewax.operators as op
from typing_extensions import override

from kwf.protocol import Record, Schedule
from kwf.thread import ScheduleState
from kwf.wheel import Arm, WheelState, slot_of


class TimerClock(Protocol):
    """What the wheel needs of the engine's input clock."""

    def now(self) -> float:
        """The time up to which due timers may fire (the wall clock, held back by the input)."""
        ...

    def notify_at(self, due: float | None, owner: int | None = None) -> datetime | None:
        """When Bytewax should call back for a timer due at ``due`` (of the key ``owner``)."""
        ...


class _Due(Protocol):
    """Due times that fire records to ``workflow-resume``, under one Bytewax key."""

    key: str

    def __bool__(self) -> bool: ...

    def wakeup(self) -> float | None: ...

    def dump(self) -> Any: ...

    def on_timer(self, now: float, resume_topic: str) -> list[Record]: ...


V = TypeVar("V")
"""What the step receives: an ``Arm`` (wheel), or a parsed ``workflow-scheduler`` record."""
S = TypeVar("S", bound=_Due)
"""The key's state: a ``WheelState`` slot, or a ``ScheduleState``."""


class DueLogic(op.StatefulLogic[V, Record, tuple[str, Any]], Generic[V, S]):
    """Bytewax's handle on one key of due times: a wheel slot, or a ``workflow-scheduler`` key.

    Both fire records to ``workflow-resume`` once the input clock reaches their due time, and
    both snapshot ``(key, entries)`` (builders are not given the key; ``dump``). Subclasses say
    how an item changes the state (``_add``).
    """

    def __init__(self, resume_topic: str, clock: TimerClock, state: S | None) -> None:
        self.resume_topic = resume_topic
        self.clock = clock
        self.state = state

    def _add(self, state: S | None, value: V) -> S:
        raise NotImplementedError

    def _done(self, records: list[Record]) -> tuple[list[Record], bool]:
        empty = self.state is None or not self.state
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
        due = self.state.wakeup() if self.state is not None else None
        return self.clock.notify_at(due, id(self))

    @override
    def snapshot(self) -> tuple[str, Any]:
        assert self.state is not None
        return self.state.key, self.state.dump()


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


class ScheduleSlot:
    """The ``workflow-scheduler`` keys of one wheel slot (``ScheduleState`` each, the rules of
    the scheduler), indexed by their soonest due time like a wheel slot's threads
    (``WheelState``): one Bytewax wakeup for all of them."""

    def __init__(self, key: str, entries: dict[str, dict[str, float]] | None = None) -> None:
        self.key = key
        self.states = {k: ScheduleState(k, dict(e)) for k, e in (entries or {}).items()}
        self._due = WheelState(key)
        for k, state in self.states.items():
            self._due.set(k, state.wakeup())

    def __bool__(self) -> bool:
        return bool(self.states)

    def on_schedule(self, key: str, schedule: Schedule) -> None:
        state = self.states.get(key) or self.states.setdefault(key, ScheduleState(key))
        state.on_schedule(schedule)
        if not state.entries:
            del self.states[key]
        self._due.set(key, state.wakeup())

    def wakeup(self) -> float | None:
        return self._due.wakeup()

    def on_timer(self, now: float, resume_topic: str) -> list[Record]:
        out: list[Record] = []
        while (entry := self._due.pop_due(now)) is not None:
            state = self.states[entry[1]]
            out += state.on_timer(now, resume_topic)
            if state.entries:
                self._due.set(state.key, state.wakeup())
            else:
                del self.states[state.key]
        return out

    def dump(self) -> dict[str, dict[str, float]]:
        return {k: dict(state.entries) for k, state in self.states.items()}

"""``ListSource``: the input of ``kwf.engine.flow.run_flow``, a list of records with crash points.

Why not ``bytewax.testing.TestingSource``: its resume position counts emitted items but not
the ``ABORT``/``PAUSE`` sentinels it skips, so a resume after a sentinel applies one record
twice (a replayed ``new:`` would restart a thread). Here the position counts data records
only, and sentinels before it are skipped on resume. Test support only: never used by the
engine on Kafka.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from bytewax.inputs import (
    AbortExecution,
    FixedPartitionedSource,
    StatefulSourcePartition,
)
from bytewax.testing import TestingSource
from typing_extensions import override

from kwf.protocol import Incoming

_PART = "records"


def _incoming(item: Sequence[Any], offset: int, stamp: float) -> Incoming:
    topic, key, value = item[0], item[1], item[2]
    ts = float(item[3]) if len(item) > 3 and item[3] is not None else stamp
    return Incoming(topic, key, value, ts, 0, offset)


def _offsets(items: Sequence[Any]) -> list[int]:
    """Each data record's offset, as Kafka (and ``kwf.testing.Engine``) number them: one
    partition per topic, 0, 1, 2, ... in list order; sentinels get none."""
    counts: dict[str, int] = {}
    offsets = []
    for item in items:
        if not isinstance(item, TestingSource.ABORT):
            offsets.append(counts.get(item[0], 0))
            counts[item[0]] = offsets[-1] + 1
    return offsets


class _Partition(StatefulSourcePartition[Incoming, int]):
    def __init__(self, items: Sequence[Any], stamp: float, linger: float, batch_size: int,
                 resume: int | None, clock: Any) -> None:
        self._clock = clock
        self._items = items
        self._offsets = _offsets(items)
        self._stamp = stamp
        self._linger = linger
        self._batch_size = batch_size
        self._emitted = 0  # data records handed to the dataflow: the resume state
        self._pos = 0
        self._awake: datetime | None = None
        self._stop: BaseException | None = None
        for _ in range(resume or 0):  # skip sentinels and the records already consumed
            while isinstance(self._items[self._pos], TestingSource.ABORT):
                self._pos += 1
            self._pos += 1
            self._emitted += 1

    @override
    def next_batch(self) -> list[Incoming]:
        if self._stop is not None:
            raise self._stop
        batch: list[Incoming] = []
        while self._pos < len(self._items) and len(batch) < self._batch_size:
            item = self._items[self._pos]
            self._pos += 1
            if isinstance(item, TestingSource.ABORT):
                if not item._triggered:
                    item._triggered = True
                    self._stop = AbortExecution()
                    return batch
                continue
            batch.append(_incoming(item, self._offsets[self._emitted], self._stamp))
            self._emitted += 1
        if self._pos >= len(self._items) and self._clock is not None:
            self._clock.reached(_PART, float("inf"))  # read to its end, and it never grows
        if self._pos >= len(self._items) and not batch:
            if self._linger > 0 and self._awake is None:
                self._awake = datetime.now(timezone.utc) + timedelta(seconds=self._linger)
                return []
            raise StopIteration
        return batch

    @override
    def next_awake(self) -> datetime | None:
        return self._awake

    @override
    def snapshot(self) -> int:
        return self._emitted


class ListSource(FixedPartitionedSource[Incoming, int]):
    """One partition over ``items``: ``(topic, key, value[, timestamp])`` tuples and ``ABORT``s."""

    def __init__(self, items: Sequence[Any], stamp: float | None = None, *, linger: float = 0.0,
                 batch_size: int = 1) -> None:
        self._items = list(items)
        self._stamp = time.time() if stamp is None else stamp
        self._linger = linger
        self._batch_size = batch_size
        self._clock: Any = None

    def bind_clock(self, clock: Any) -> None:
        """Report to ``kwf.engine.clock.InputClock``: timers wait until the list is read."""
        self._clock = clock
        clock.expect([_PART])

    @override
    def list_parts(self) -> list[str]:
        return [_PART]

    @override
    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Partition:
        return _Partition(self._items, self._stamp, self._linger, self._batch_size, resume_state,
                          self._clock)

"""``ListSource``: the input of ``kwf.engine.flow.run_flow``, a list of records with crash points.

Why not ``bytewax.testing.TestingSource``: its resume position counts emitted items but not
the ``ABORT``/``PAUSE`` sentinels it skips, so a resume after a sentinel applies one record
twice (a replayed ``new:`` would restart a thread). Here the position counts data records
only, and sentinels before it are skipped on resume. Test support only: never used by the
engine on Kafka.

``LoopbackSink`` feeds the timer wheel's firings (``timer:<due>`` records to
``workflow-resume``) back into the ``ListSource``, as Kafka does for the engine, so that
durable timers fire in ``run_flow``; other outputs are only collected. Firings in flight when
an execution stops are lost with it, and fired again by the restored wheel.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from bytewax.inputs import (
    AbortExecution,
    FixedPartitionedSource,
    StatefulSourcePartition,
)
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSource
from typing_extensions import override

from kwf.protocol import TIMER_PREFIX, Incoming, Record

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
                 resume: int | None, clock: Any, loop: deque[Record]) -> None:
        self._clock = clock
        self._items = items
        self._offsets = _offsets(items)
        self._loop = loop
        self._looped = 0
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
        while self._loop and len(batch) < self._batch_size:
            rec = self._loop.popleft()  # numbered apart, partition 1, as Engine numbers them
            batch.append(Incoming(rec.topic, rec.key, rec.value, rec.timestamp, 1, self._looped))
            self._looped += 1
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
            if self._awake is not None and datetime.now(timezone.utc) < self._awake:
                return []  # lingering: looped-back firings may still come
            raise StopIteration
        return batch

    @override
    def next_awake(self) -> datetime | None:
        if self._awake is None:
            return None
        return min(self._awake, datetime.now(timezone.utc) + timedelta(milliseconds=5))

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
        self.loop: deque[Record] = deque()
        """Records the ``LoopbackSink`` sends back (thread-safe appends and pops)."""

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
                          self._clock, self.loop)


class _LoopbackPartition(StatelessSinkPartition[Record]):
    def __init__(self, out: list[Record], loop: deque[Record], resume_topic: str) -> None:
        self._out, self._loop, self._topic = out, loop, resume_topic

    @override
    def write_batch(self, items: list[Record]) -> None:
        for rec in items:
            if (rec.topic == self._topic and isinstance(rec.value, str)
                    and rec.value.startswith(TIMER_PREFIX)):
                self._loop.append(rec)
            else:
                self._out.append(rec)


class LoopbackSink(DynamicSink[Record]):
    """Collects outputs in ``out``; sends the timer wheel's firings back to ``source``."""

    def __init__(self, out: list[Record], source: ListSource, resume_topic: str) -> None:
        self._out, self._source, self._topic = out, source, resume_topic

    @override
    def build(self, step_id: str, worker_index: int, worker_count: int) -> _LoopbackPartition:
        return _LoopbackPartition(self._out, self._source.loop, self._topic)

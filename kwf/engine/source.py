"""kwf's Kafka input: one consumer per worker for all its partitions, no waiting while work waits.

Bytewax's ``KafkaSource`` keeps one consumer per partition and calls ``consume(batch, 0.001)``
on each in turn: a worker reading six partitions, most of them idle, spent half its time
waiting in those milliseconds. Here each worker has one consumer assigned every partition it
reads (of every input step); messages are demultiplexed into per-partition buffers, and a
partition's ``next_batch`` only ever consumes with timeout 0. One partition per worker, the
*waiter*, may block, and only when nothing was handed out since its last call and nothing is
buffered: for at most ``IDLE_WAIT_S`` (less if a timer is due sooner, ``InputClock.wait_s``), so
that timers and epochs keep moving, and it returns at once when a message arrives. While another
worker of the process hands out records it blocks ``BUSY_WAIT_S`` at most: what those records
cause may be routed to it, and a worker blocked in Kafka sees nothing until its wait ends.

Positions: a partition's Bytewax state is the next offset to read, exactly as ``KafkaSource``
keeps it (same step ids, same partition names ``{index}-{topic}``), so a recovery store written
by either resumes with the other. A partition without state starts at the partition's beginning,
never at its end. In a cluster, positions are also committed to the consumer group
``kwf-engine`` (never used to resume: for the other processes' input clocks, and lag tools).

Errors: a broker outage is retried by librdkafka and logged; consumer errors are logged; only a
fatal client error stops the engine. ``request_drain()`` (SIGTERM) ends every partition: Bytewax
then closes the epoch, snapshots and returns, and the next start resumes from the stored offsets.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import structlog
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from typing_extensions import override

from kwf.engine.clock import InputClock, KafkaProbe, commit_metadata
from kwf.protocol import Incoming

log = structlog.get_logger("kwf.engine.source")

NEAR_TIMER_BATCH = 50
"""The most records a partition hands out per call while a timer is near (``NEAR_TIMER_S``):
a due timer waits for the batch in hand, about 4 ms of work at this size."""
NEAR_TIMER_S = 0.1
"""How near a timer of the process makes batches small: more than a full batch takes."""
IDLE_WAIT_S = 0.02
"""The longest an idle worker blocks in Kafka: bounds timer lateness and idle CPU (50 wakeups/s)."""
BUSY_WAIT_S = 0.001
"""The longest a worker blocks while another worker of its process handed out records in the
last ``BUSY_S``: what those records cause may be routed to it, and a worker blocked in Kafka
sees nothing another worker sends it until the wait ends."""
BUSY_S = 0.05
COMMIT_S = 0.02
"""How often moved positions are committed to the consumer group: the other processes' input
clocks hold timers until a commit shows this process read past their due time."""
COMMIT_IDLE_S = 5.0
GROUP = "kwf-engine"
_LOG_EVERY_S = 10.0

_drain = threading.Event()


def request_drain() -> None:
    """End every Kafka input partition at its next call (SIGTERM): the engine drains and exits."""
    _drain.set()


def draining() -> bool:
    return _drain.is_set()


def _incoming(topic: str, index: int, msg: Message) -> Incoming:
    """``msg`` (read from ``topic``'s partition ``index``) as the core takes it."""
    kind, ms = msg.timestamp()
    stamp = ms / 1000 if kind != TIMESTAMP_NOT_AVAILABLE and ms >= 0 else time.time()
    return Incoming(topic, msg.key(), msg.value(), stamp, index, msg.offset() or 0)


class _Shared:
    """One worker's consumer, its per-partition buffers and its waiter."""

    def __init__(self, config: dict[str, Any], clock: InputClock, probe: KafkaProbe) -> None:
        self.clock = clock
        self.probe = probe
        self.consumer = Consumer({
            **config, "group.id": GROUP, "enable.auto.commit": "false",
            "enable.auto.offset.store": "false", "enable.partition.eof": "false",
            # Commits still pending at exit (a broker outage) hold the process this long.
            "socket.timeout.ms": "10000",
        })  # client-level errors go to the config's error_cb (kwf.engine.logs)
        self.buffers: dict[tuple[str, int], deque[Message]] = {}
        self.waiter: tuple[str, int] | None = None
        self.handed = 0
        self.busy_until = 0.0
        """Until when this worker counts as busy for the others (``BUSY_S`` after handing out)."""
        self._next_commit = 0.0
        self._next_idle_commit = 0.0
        self._committed: dict[tuple[str, int], int | None] = {}
        self._logged: dict[str, float] = {}

    def _log(self, event: str, err: KafkaError) -> None:
        now = time.monotonic()
        code = str(err.code())
        if now - self._logged.get(code, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged[code] = now
            log.warning(event, error=err.str(), fatal=err.fatal(), retriable=err.retriable())

    def assign(self, tp: tuple[str, int], offset: int) -> None:
        self.buffers[tp] = deque()
        self.consumer.incremental_assign([TopicPartition(tp[0], tp[1], offset)])
        if self.waiter is None:
            self.waiter = tp

    def fill(self, timeout: float) -> None:
        """Buffer what the consumer has; wait up to ``timeout`` for the first message only.

        (``consume(n, timeout)`` waits for ``n`` messages or the whole timeout; ``poll``
        returns at the first.)"""
        msgs: list[Message] = []
        if timeout > 0:
            first = self.consumer.poll(timeout)
            if first is None:
                return
            msgs.append(first)
        msgs += self.consumer.consume(500, 0)
        for msg in msgs:
            err = msg.error()
            if err is None:
                buf = self.buffers.get((msg.topic() or "", msg.partition() or 0))
                if buf is not None:
                    buf.append(msg)
            elif err.fatal():
                raise KafkaException(err)
            elif err.code() != KafkaError._PARTITION_EOF:
                self._log("kafka_consumer_error", err)

    def idle(self) -> bool:
        return not any(self.buffers.values())

    def wait_s(self) -> float:
        """How long the waiter may block in Kafka this round: not at all if this worker handed
        out records since its last round or holds some; ``BUSY_WAIT_S`` if another worker of the
        process did within ``BUSY_S``; else until its next timer, at most ``IDLE_WAIT_S``."""
        if self.handed or not self.idle():
            return 0.0
        wait = self.clock.wait_s(IDLE_WAIT_S)
        if wait > BUSY_WAIT_S:
            others = [o.busy_until for o in list(_by_thread.values()) if o is not self]
            if others and time.monotonic() < max(others):
                return BUSY_WAIT_S
        return wait

    def commit(self, drain: bool = False) -> None:
        """Commit positions that moved (at most every ``COMMIT_S``), or all every
        ``COMMIT_IDLE_S``, or at once with the drain mark."""
        if not self.clock.peers:
            return  # nobody else needs them, and a pending commit delays exit in an outage
        now = time.monotonic()
        if not drain and now < self._next_commit:
            return
        self._next_commit = now + COMMIT_S  # looked at most this often, moved or not
        # Where this worker's readers are, as the clock knows it: the next offset handed out,
        # or a partition's beginning while it has handed out nothing (an empty partition, often
        # the scheduler's, holds the other processes' timers back all the same).
        positions = {tp: self.clock.local_position(f"{tp[0]}/{tp[1]}") for tp in self.buffers}
        if not drain and positions == self._committed and now < self._next_idle_commit:
            return
        self._next_idle_commit = now + COMMIT_IDLE_S
        self._committed = positions
        meta = commit_metadata(drain)
        offsets = [TopicPartition(t, p, o, meta) for (t, p), o in positions.items()
                   if o is not None and o >= 0]
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as e:  # progress info only: never worth stopping for
                log.debug("kafka_commit_failed", error=str(e))


class _Partition(StatefulSourcePartition[Incoming, int]):
    def __init__(self, shared: _Shared, tp: tuple[str, int], offset: int, batch: int) -> None:
        self._shared = shared
        self._tp = tp
        self._name = f"{tp[0]}/{tp[1]}"
        self._batch = batch
        self._next = offset
        self._buf = shared.buffers[tp]

    @override
    def next_batch(self) -> list[Incoming]:
        if _drain.is_set():
            self._shared.commit(drain=True)  # tells the other processes of a cluster to drain
            raise StopIteration
        shared = self._shared
        waiter = shared.waiter == self._tp
        if waiter:  # once per round, busy or not: the clock's probe and the commits
            shared.probe.tick()
            shared.commit()
        if not self._buf:
            wait = 0.0
            if waiter:
                wait = shared.wait_s()
                shared.handed = 0
            shared.fill(wait)
            if not self._buf:
                return []
        batch = self._batch
        if batch > NEAR_TIMER_BATCH and shared.clock.timer_near(NEAR_TIMER_S):
            batch = NEAR_TIMER_BATCH
        buf, n = self._buf, min(batch, len(self._buf))
        topic, index = self._tp
        pop = buf.popleft
        out = [_incoming(topic, index, pop()) for _ in range(n)]
        self._next = out[-1].offset + 1
        shared.handed += n
        shared.busy_until = time.monotonic() + BUSY_S
        shared.clock.position(self._name, self._next)
        return out

    @override
    def snapshot(self) -> int:
        return self._next

    @override
    def close(self) -> None:
        self._shared.commit()


class KafkaInput(FixedPartitionedSource[Incoming, int]):
    """Every partition of ``topic``, read by the worker Bytewax assigns it to.

    Args:
        config: librdkafka settings (``kwf.engine.logs.kafka_client_config``).
        topic: the topic; its partition list is read once, at start.
        clock: the process's input clock; told the partitions and the positions.
        probe: asks Kafka for watermarks for the clock; ticked by idle partitions.
        batch_size: the most records one partition hands out per call; at most
            ``NEAR_TIMER_BATCH`` while a timer of the process is near.
    """

    def __init__(self, config: dict[str, Any], topic: str, clock: InputClock, probe: KafkaProbe,
                 batch_size: int) -> None:
        self._config = dict(config)
        self._topic = topic
        self._clock = clock
        self._probe = probe
        self._batch = batch_size

    @override
    def list_parts(self) -> list[str]:
        from confluent_kafka.admin import AdminClient

        meta = AdminClient(dict(self._config)).list_topics(self._topic, timeout=10)
        topic = meta.topics.get(self._topic)
        if topic is None or topic.error is not None or not topic.partitions:
            msg = (f"kwf: cannot list the partitions of {self._topic!r} "
                   f"({topic.error if topic is not None else 'no such topic'}); create it with "
                   "`kwf topics create` and check the brokers")
            raise RuntimeError(msg)
        indexes = sorted(topic.partitions)
        self._clock.expect([f"{self._topic}/{i}" for i in indexes])
        return [f"{i}-{self._topic}" for i in indexes]

    @override
    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Partition:
        index, _, topic = for_part.partition("-")
        tp = (topic, int(index))
        shared = _worker_shared(self._config, self._clock, self._probe)
        offset = resume_state if resume_state is not None and resume_state >= 0 else None
        if offset is None:  # never the end: what arrived while no engine ran would be skipped
            offset = OFFSET_BEGINNING
            self._clock.read_here(f"{topic}/{index}")
        else:
            self._clock.position(f"{topic}/{index}", offset)
        shared.assign(tp, offset)
        log.info("input_partition", step=step_id, partition=for_part, offset=offset,
                 resumed=resume_state is not None)
        return _Partition(shared, tp, offset, self._batch)


_by_thread: dict[int, _Shared] = {}
_by_thread_lock = threading.Lock()


def _worker_shared(config: dict[str, Any], clock: InputClock, probe: KafkaProbe) -> _Shared:
    """The calling worker's consumer (a Bytewax worker is one OS thread)."""
    ident = threading.get_ident()
    with _by_thread_lock:
        shared = _by_thread.get(ident)
        if shared is None or shared.clock is not clock:
            shared = _by_thread[ident] = _Shared(config, clock, probe)
        return shared

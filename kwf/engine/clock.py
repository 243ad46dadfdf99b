"""The input clock: the time up to which every input partition has been read, for timers.

A timer due at ``t`` may fire only once the engine has read everything that was in its input at
``t``: otherwise a reply already waiting in Kafka (sent before a deadline) would lose to the wall
clock after a restart, an outage or a backlog. The rule, per partition: a partition has *reached*
time ``t`` once its reader's position is at or past the high watermark the partition had at
``t``. The clock's ``now()`` is the wall clock held back to the least-reached partition of the
whole input (every partition of the cluster, not only those this process reads).

Interface (all a timer design needs; ``kwf.engine.flow`` and the thread/scheduler logics use it):

- ``now()``: the time at which due timers may fire: timers due at or before it fire.
- ``notify_at(due)``: when Bytewax should call a logic back for a timer due at ``due``: the due
  time itself, or a short recheck while the input still holds that time back.
- ``wake_by(t)``: a timer wants a callback by ``t``; a source idling in a bounded wait returns by
  then (``wait_s``).
- ``timer_near(s)``: a timer wants a callback within ``s`` seconds; the sources then hand out
  small batches (``kwf.engine.source.NEAR_TIMER_BATCH``).

How partitions get reached times: a source reports ``expect(parts)`` for the partitions the
whole input has, ``position(part, next_offset)`` as it hands records out, and the high
watermarks come from ``KafkaProbe`` (``ListOffsets`` requests, asynchronous, every
``PROBE_S``); a probe started at ``t0`` answering ``high`` means every record in the partition at
``t0`` sits below ``high``. Partitions another process reads are known through the consumer
group offsets every reader commits (with its commit time as metadata, so that offsets left by an
earlier run do not count; a draining process marks its commits, and its peers drain too). A
finite in-memory source (``run_flow``) reports ``reached`` directly.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any

import structlog

log = structlog.get_logger("kwf.engine.clock")

_NEVER = float("-inf")
_LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc).timestamp()
_PENDING_MAX = 64  # probe answers kept per lagging partition; older ones only make it slower


def utc(t: float | None) -> datetime | None:
    """Bytewax wants tzinfo exactly ``timezone.utc``; anything else crashes the dataflow, and
    so does a time past what ``datetime`` holds (a timer so far away is as good as never)."""
    return None if t is None else datetime.fromtimestamp(min(t, _LATEST), tz=timezone.utc)


class InputClock:
    """One per process: the time up to which every expected input partition has been read.

    Thread-safe: every worker of the process reports to it and reads it. With no partition
    expected (an input that does not report) it is the wall clock.
    """

    RECHECK_S = 0.002
    """How often a held-back timer looks again (instead of a busy loop): each look is one
    activation of its key, and a probe's answer is seen at the next look."""
    STALE_S = 0.05
    """A callback time passed by this much is done with (``timer_near``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: set[str] = set()
        self._local: dict[str, int] = {}
        """Partitions read in this process -> the next offset handed to the dataflow."""
        self._reached: dict[str, float] = {}
        self._pending: dict[str, deque[tuple[float, int]]] = {}
        self._unplaced: set[str] = set()
        """Partitions read here from their beginning that have handed out nothing yet."""
        self._callbacks: dict[int, float] = {}
        """Per timer key (its id): the callback time it asked Bytewax for (``timer_near``)."""
        self._soonest = float("inf")
        """At most the soonest of ``_callbacks`` (lower while a key's time moved later)."""
        self._wake_by: dict[int, float] = {}
        """Per worker thread: when its source's idle wait must end (its own timers)."""
        self._held = False
        self.peers = False
        """Other processes form the cluster with this one: they need its commits, even when it
        reads every input partition itself (then they read none, and wait on its positions)."""
        self.on_held: Callable[[], None] | None = None
        """Called when a due timer is held back: ``KafkaProbe`` asks Kafka at once."""

    # -- what sources report -----------------------------------------------------------------

    def expect(self, parts: list[str]) -> None:
        """The input has these partitions (``topic/index``); each holds timers back until reached."""
        with self._lock:
            self._expected.update(parts)

    def reached(self, part: str, t: float) -> None:
        """Everything that was in ``part`` at time ``t`` has been read."""
        with self._lock:
            self._reach(part, t)

    def position(self, part: str, next_offset: int) -> None:
        """This process reads ``part`` and has handed out every record below ``next_offset``."""
        with self._lock:
            self._local[part] = next_offset
            self._unplaced.discard(part)
            pending = self._pending.get(part)
            while pending and pending[0][1] <= next_offset:
                self._reach(part, pending.popleft()[0])

    def watermark(self, part: str, t0: float, high: int) -> None:
        """Every record ``part`` held at ``t0`` is below offset ``high`` (a probe's answer)."""
        with self._lock:
            pos = self._local.get(part)
            if pos is not None:
                self._reached_by(part, t0, high, pos)

    def remote(self, part: str, t0: float, high: int, committed: int) -> None:
        """Another process has read ``part`` up to ``committed`` (as of after ``t0``).

        Under steady traffic a reader's last commit is always a little behind the watermark of
        the same moment, so a watermark it has not passed yet is kept, as for a local reader,
        and reached by a later commit (else a timer would wait for a lull in the traffic)."""
        with self._lock:
            if part not in self._local:
                self._reached_by(part, t0, high, committed)

    def _reached_by(self, part: str, t0: float, high: int, pos: int) -> None:
        """``part``'s reader is at ``pos``, and the partition held offsets below ``high`` at
        ``t0``: reach what ``pos`` proves, and keep ``(t0, high)`` for a later position."""
        pending = self._pending.get(part)
        while pending and pending[0][1] <= pos:
            self._reach(part, pending.popleft()[0])
        if pos >= high:
            self._reach(part, t0)
            return
        pending = self._pending.setdefault(part, deque(maxlen=_PENDING_MAX))
        if not pending or pending[-1][1] < high:
            pending.append((t0, high))
        else:  # same watermark, later time: reaching it proves the later time
            pending[-1] = (t0, high)

    def _reach(self, part: str, t: float) -> None:
        if t > self._reached.get(part, _NEVER):
            self._reached[part] = t

    def read_here(self, part: str) -> None:
        """This process reads ``part`` from its beginning, position not known yet."""
        with self._lock:
            self._unplaced.add(part)

    def beginning(self, part: str, low: int) -> None:
        """``part`` starts at ``low`` (a probe's answer): its reader's position until it reads."""
        with self._lock:
            if part in self._unplaced and part not in self._local:
                self._local[part] = low
            self._unplaced.discard(part)

    def local_position(self, part: str) -> int | None:
        """Where this process's reader of ``part`` is: the next offset it hands out (its low
        watermark while it has handed out nothing), or None while that is not known yet."""
        with self._lock:
            return self._local.get(part)

    def unplaced(self) -> list[str]:
        with self._lock:
            return sorted(self._unplaced)

    def clustered(self) -> bool:
        """Whether other processes read some of the input (the clock needs their commits)."""
        with self._lock:
            return bool(self._expected - self._local.keys() - self._unplaced)

    def is_local(self, part: str) -> bool:
        return part in self._local or part in self._unplaced

    def expected(self) -> list[str]:
        with self._lock:
            return sorted(self._expected)

    # -- what timers use -----------------------------------------------------------------------

    def now(self) -> float:
        """The time at which due timers may fire: the wall clock, held back by the input."""
        wall = time.time()
        with self._lock:
            if not self._expected:
                return wall
            least = min(self._reached.get(p, _NEVER) for p in self._expected)
        return min(wall, least)

    def notify_at(self, due: float | None, owner: int | None = None) -> datetime | None:
        """When Bytewax should call back for a timer due at ``due``; ``owner`` (a key's id)
        keeps that time for ``timer_near`` until the same owner asks again."""
        if due is None:
            if owner is not None:
                with self._lock:
                    self._callbacks.pop(owner, None)
            return None
        wall = time.time()
        if due <= wall and due > self.now():
            due = wall + self.RECHECK_S
            self._held = True
            if self.on_held is not None:
                self.on_held()
        self.wake_by(due)
        if owner is not None:
            with self._lock:
                self._callbacks[owner] = due
                if due < self._soonest:
                    self._soonest = due
        return utc(due)

    def timer_near(self, within: float) -> bool:
        """Whether a timer of this process wants a callback within ``within`` seconds (a held
        one every ``RECHECK_S``): the sources hand out small batches then, since a due timer
        waits for the batch in hand. Times passed by ``STALE_S`` are done with."""
        now = time.time()
        if self._soonest < now - self.STALE_S:
            with self._lock:
                callbacks = self._callbacks
                for owner, t in list(callbacks.items()):
                    if t < now - self.STALE_S:
                        del callbacks[owner]
                self._soonest = min(callbacks.values(), default=float("inf"))
        return self._soonest <= now + within

    def held(self) -> bool:
        """Whether a due timer was held back since the last call: the input needs a fresh probe."""
        held, self._held = self._held, False
        return held

    def wake_by(self, t: float) -> None:
        """A timer of the calling worker wants a callback by ``t``: that worker's idle source
        returns by then. Per worker: a worker whose wait ended for another's timer would leave
        the timer's own worker blocked for a whole ``IDLE_WAIT_S``."""
        ident = threading.get_ident()
        if t < self._wake_by.get(ident, float("inf")):
            self._wake_by[ident] = t

    def wait_s(self, cap: float) -> float:
        """How long the calling worker's idle source may block: at most ``cap``, less if one
        of its timers is due sooner."""
        ident = threading.get_ident()
        left = self._wake_by.get(ident, float("inf")) - time.time()
        if left <= 0:
            self._wake_by.pop(ident, None)
            return 0.0
        return min(cap, left)


class KafkaProbe:
    """Asks Kafka for the high watermark of every expected partition (and, in a cluster, for the
    offsets the other processes committed), without blocking: every ``interval`` seconds while
    a due timer is held back, every ``IDLE_S`` otherwise (so that an idle engine stays cheap).

    ``tick()`` is called by a source on each activation and by the clock when it holds a timer
    back; it starts a probe when one is due. Answers reach the clock as they arrive (future
    callbacks), so a held timer's next look sees them. A probe that fails (a broker outage) reports
    nothing: timers wait for the input rather than fire on a guess.
    """

    IDLE_S = 0.5

    def __init__(self, clock: InputClock, config: dict[str, Any], group: str | None,
                 interval: float, on_drain: Callable[[], None] | None = None) -> None:
        self._clock = clock
        self._on_drain = on_drain
        self._config = config
        self._group = group
        self._interval = interval
        self._admin: Any = None
        self._inflight: tuple[float, Future[Any] | None, dict[str, Future[Any]]] | None = None
        self._next = 0.0
        self._lock = threading.Lock()
        self._started = time.time()
        self._quiet_until = 0.0
        self._hlock = threading.Lock()
        clock.on_held = self.tick

    def tick(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another worker is at it
        try:
            self._harvest()
            now = time.monotonic()
            if self._inflight is None and (now >= self._next + self.IDLE_S - self._interval
                                           or (now >= self._next and self._clock.held())):
                self._next = now + self._interval
                self._start()
        finally:
            self._lock.release()

    def _start(self) -> None:
        from confluent_kafka import ConsumerGroupTopicPartitions
        from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

        parts = self._clock.expected()
        if not parts:
            return
        if self._admin is None:
            self._admin = AdminClient(dict(self._config))
        tps = {_tp(p): OffsetSpec.latest() for p in parts}  # type: ignore[no-untyped-call]
        t0 = time.time()
        try:
            unplaced = self._clock.unplaced()
            if unplaced:  # where they start: answered before the watermarks are looked at
                lows = self._admin.list_offsets(
                    {_tp(p): OffsetSpec.earliest() for p in unplaced},  # type: ignore[no-untyped-call]
                    request_timeout=5)
                for tp, fut in lows.items():
                    part = f"{tp.topic}/{tp.partition}"
                    fut.add_done_callback(lambda f, part=part: self._placed(part, f))
            highs = self._admin.list_offsets(tps, request_timeout=5)
            remote = [p for p in parts if not self._clock.is_local(p)]
            committed = None
            if remote and self._group is not None:
                req = ConsumerGroupTopicPartitions(self._group, [_tp(p) for p in remote])
                committed = self._admin.list_consumer_group_offsets([req], request_timeout=5)
                committed = committed[self._group]
        except Exception as e:  # noqa: BLE001 - a probe failure must not stop the engine
            self._failed(e)
            return
        by_part = {f"{tp.topic}/{tp.partition}": fut for tp, fut in highs.items()}
        self._inflight = (t0, committed, by_part)
        for fut in [*by_part.values(), *([committed] if committed is not None else [])]:
            fut.add_done_callback(lambda _: self._harvest())

    def _placed(self, part: str, fut: Future[Any]) -> None:
        if fut.exception() is None:
            self._clock.beginning(part, fut.result().offset)

    def _harvest(self) -> None:
        with self._hlock:
            if self._inflight is None:
                return
            t0, committed, highs = self._inflight
            if not all(f.done() for f in highs.values()) or (committed and not committed.done()):
                return
            self._inflight = None
        remote: dict[str, int] = {}
        if committed is not None and committed.exception() is None:
            for tp in committed.result().topic_partitions:
                stamp, drain = _stamp(tp.metadata)
                if tp.error is None and tp.offset >= 0 and stamp >= self._started:
                    remote[f"{tp.topic}/{tp.partition}"] = tp.offset
                    if drain and self._on_drain is not None:
                        self._on_drain()  # another process of the cluster drains: so do we
        for part, fut in highs.items():
            if fut.exception() is not None:  # this partition reports nothing: its timers wait
                self._failed(fut.exception())
                continue
            high = fut.result().offset
            if self._clock.is_local(part):
                self._clock.watermark(part, t0, high)
            elif part in remote:
                self._clock.remote(part, t0, high, remote[part])

    def _failed(self, error: BaseException | None) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:  # an outage fails every probe: say so every 10 s
            self._quiet_until = now + 10.0
            log.warning("input_clock_probe_failed", error=str(error))


def _tp(part: str) -> Any:
    from confluent_kafka import TopicPartition

    topic, _, index = part.rpartition("/")
    return TopicPartition(topic, int(index))


def commit_metadata(drain: bool = False) -> str:
    """What a reader stores with its committed offsets: when (so that commits of an earlier run
    do not count), and whether this process is draining (so that its peers drain too)."""
    return f"kwf:{time.time():.3f}{':drain' if drain else ''}"


def _stamp(metadata: str | None) -> tuple[float, bool]:
    if not metadata or not metadata.startswith("kwf:"):
        return _NEVER, False
    stamp, _, flag = metadata[4:].partition(":")
    try:
        return float(stamp), flag == "drain"
    except ValueError:
        return _NEVER, False

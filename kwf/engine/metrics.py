"""kwf's own Prometheus metrics, served by the engine process.

Bytewax's API server (``BYTEWAX_DATAFLOW_API_ENABLED=true``, port
``BYTEWAX_DATAFLOW_API_PORT``, 3030 by default) answers ``GET /metrics`` with
``prometheus_client``'s default registry (``bytewax._metrics.generate_python_metrics``), where
its own Kafka metrics (``bytewax_kafka_consumer_lag``...) live too; so kwf registers its metrics
there and serves nothing of its own. ``install`` binds the core's ``kwf.observe.stats`` hook to
them: the core counts, this module turns the counts into metrics, and the core never imports
it. Every metric is named ``kwf_*``; the README lists them.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kwf import observe
from kwf.thread import CONTEXTS

_SECONDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 10.0)
_LATENESS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
             3600.0)
_BYTES = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)

class _Tally(Collector):
    """A counter or histogram on the per-record path, without prometheus_client's lock.

    Each OS thread (a Bytewax worker) writes only its own rows, so no update is lost and none
    waits; a scrape sums the rows. ``observe`` costs a dict lookup, a bisect and two list
    updates: a third of the time ``prometheus_client``'s metrics take with their lock.
    """

    def __init__(self, name: str, documentation: str, label: str | None = None,
                 buckets: Sequence[float] | None = None) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = tuple(buckets) if buckets is not None else None
        self._width = len(self.bounds) + 2 if self.bounds is not None else 1  # buckets, +Inf, sum
        self._rows: dict[int, dict[str, list[float]]] = {}
        REGISTRY.register(self)

    def _row(self, label: str) -> list[float]:
        rows = self._rows.get(threading.get_ident())
        if rows is None:
            rows = self._rows.setdefault(threading.get_ident(), {})
        row = rows.get(label)
        if row is None:
            row = rows[label] = [0.0] * self._width
        return row

    def inc(self, label: str = "", amount: float = 1.0) -> None:
        self._row(label)[0] += amount

    def observe(self, value: float, label: str = "") -> None:
        row = self._row(label)
        row[bisect_left(self.bounds, value)] += 1  # type: ignore[arg-type]  # a histogram
        row[-1] += value

    def _totals(self) -> dict[str, list[float]]:
        totals: dict[str, list[float]] = {}
        for rows in list(self._rows.values()):
            for label, row in list(rows.items()):
                total = totals.setdefault(label, [0.0] * self._width)
                for i, value in enumerate(list(row)):
                    total[i] += value
        return totals

    def collect(self) -> Iterator[Metric]:
        labels = [self.label] if self.label else []
        if self.bounds is None:
            counter = CounterMetricFamily(self.name, self.documentation, labels=labels)
            for label, (value,) in sorted(self._totals().items()):
                counter.add_metric([label] if self.label else [], value)
            yield counter
            return
        family = HistogramMetricFamily(self.name, self.documentation, labels=labels)
        for label, row in sorted(self._totals().items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip([*map(str, self.bounds), "+Inf"], row[:-1]):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([label] if self.label else [], buckets, row[-1])
        yield family


THREADS_STARTED = Counter("kwf_threads_started", "Threads started (new:, init:, replacements)",
                          ["workflow"])
THREADS_ENDED = Counter("kwf_threads_ended", "Threads ended, by status: completed, failed, "
                        "cancelled, parked (replay diverged), replaced (by a new: while running), "
                        "continued (continue_as_new: a new run started)",
                        ["workflow", "status"])
RECORDS = _Tally("kwf_records", "Input records applied, by kind: new, init, resume, error, "
                 "cancel, schedule", "kind")
STEP_SECONDS = _Tally("kwf_step_seconds", "Duration of a live step (a start or an event)",
                      "workflow", _SECONDS)
REPLAY_SECONDS = Histogram("kwf_replay_seconds", "Duration of rebuilding a thread from its "
                           "journal (its _count is the number of replays)", ["workflow"],
                           buckets=_SECONDS)
REPLAY_EVENTS = Counter("kwf_replay_events", "Journal events replayed to rebuild threads",
                        ["workflow"])
JOURNAL_BYTES = _Tally("kwf_journal_bytes", "Size of a thread's journal at a snapshot",
                       buckets=_BYTES)
DEAD_LETTERS = Counter("kwf_dead_letters", "Records sent to the dead-letter topic, by the code "
                       "of their kwf-error header", ["code"])
TIMER_LATENESS = _Tally("kwf_timer_lateness_seconds", "How long after its due time a durable "
                        "timer fired (wall clock)", buckets=_LATENESS)
INPUT_LAG = _Tally("kwf_input_lag_seconds", "Age of an input record (wall clock minus its "
                   "Kafka timestamp) when the engine applied it", buckets=_LATENESS)
JOURNALS_LONG = Counter("kwf_journals_long", "Threads whose journal reached "
                        "KWF_JOURNAL_WARN_EVENTS events (they should kwf.continue_as_new)",
                        ["workflow"])
DELIVERY_FAILURES = Counter("kwf_delivery_failures", "Output records Kafka refused (the "
                            "engine stops on them; see kafka_delivery_failed in the log)")


def delivery_failed(count: int) -> None:
    """The sink calls this with the number of records Kafka refused in a batch."""
    DELIVERY_FAILURES.inc(count)


class _Threads(Collector):
    """``kwf_threads{state}`` at scrape time, summed over this process's workers: ``live``
    (an instance in memory), ``journal_only`` (to be rebuilt by replay on its next event),
    ``tombstone`` (finished, remembered for late records)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        live = journals = tombstones = 0
        for ctx in list(CONTEXTS):
            live += len(ctx.cache)
            journals += ctx.journals
            tombstones += ctx.tombstones
        family = GaugeMetricFamily("kwf_threads", "Threads held by this process, by state",
                                   labels=["state"])
        family.add_metric(["live"], live)
        family.add_metric(["journal_only"], max(journals - tombstones - live, 0))
        family.add_metric(["tombstone"], tombstones)
        yield family


REGISTRY.register(_Threads())


class PrometheusStats(observe.Stats):
    """The core's counts as the metrics above."""

    def thread_started(self, workflow: str) -> None:
        THREADS_STARTED.labels(workflow).inc()

    def thread_ended(self, workflow: str, status: str) -> None:
        THREADS_ENDED.labels(workflow, status).inc()

    def record(self, kind: str, timestamp: float | None) -> None:
        RECORDS.inc(kind)
        if timestamp:
            INPUT_LAG.observe(max(time.time() - timestamp, 0.0))

    def step(self, workflow: str, seconds: float) -> None:
        STEP_SECONDS.observe(seconds, workflow)

    def replay(self, workflow: str, seconds: float, events: int) -> None:
        REPLAY_SECONDS.labels(workflow).observe(seconds)
        REPLAY_EVENTS.labels(workflow).inc(events)

    def journal(self, size: int) -> None:
        JOURNAL_BYTES.observe(size)

    def dead_letter(self, code: str) -> None:
        DEAD_LETTERS.labels(code).inc()

    def timer_fired(self, due: float) -> None:
        TIMER_LATENESS.observe(max(time.time() - due, 0.0))

    def journal_long(self, workflow: str) -> None:
        JOURNALS_LONG.labels(workflow).inc()


def install() -> None:
    """Count into the metrics above from now on (the engine process does it at start)."""
    if not isinstance(observe.stats, PrometheusStats):
        observe.install(PrometheusStats())

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

import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kwf import observe
from kwf.thread import CONTEXTS

_SECONDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 10.0)
_LATENESS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
             3600.0)
_BYTES = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)

THREADS_STARTED = Counter("kwf_threads_started", "Threads started (new:, init:, replacements)",
                          ["workflow"])
THREADS_ENDED = Counter("kwf_threads_ended", "Threads ended, by status: completed, failed, "
                        "cancelled, or parked (replay diverged)", ["workflow", "status"])
RECORDS = Counter("kwf_records", "Input records applied, by kind: new, init, resume, error, "
                  "cancel, schedule", ["kind"])
STEP_SECONDS = Histogram("kwf_step_seconds", "Duration of a live step (a start or an event)",
                         ["workflow"], buckets=_SECONDS)
REPLAY_SECONDS = Histogram("kwf_replay_seconds", "Duration of rebuilding a thread from its "
                           "journal (its _count is the number of replays)", ["workflow"],
                           buckets=_SECONDS)
REPLAY_EVENTS = Counter("kwf_replay_events", "Journal events replayed to rebuild threads",
                        ["workflow"])
JOURNAL_BYTES = Histogram("kwf_journal_bytes", "Size of a thread's journal at a snapshot",
                          buckets=_BYTES)
DEAD_LETTERS = Counter("kwf_dead_letters", "Records sent to the dead-letter topic, by the code "
                       "of their kwf-error header", ["code"])
TIMER_LATENESS = Histogram("kwf_timer_lateness_seconds", "How long after its due time a "
                           "durable timer fired (wall clock)", buckets=_LATENESS)
INPUT_LAG = Histogram("kwf_input_lag_seconds", "Age of an input record (wall clock minus its "
                      "Kafka timestamp) when the engine applied it", buckets=_LATENESS)
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
    """The core's counts as the metrics above; children cached so a step costs a dict lookup."""

    def __init__(self) -> None:
        self._steps: dict[str, Histogram] = {}
        self._records: dict[str, Counter] = {}

    def thread_started(self, workflow: str) -> None:
        THREADS_STARTED.labels(workflow).inc()

    def thread_ended(self, workflow: str, status: str) -> None:
        THREADS_ENDED.labels(workflow, status).inc()

    def record(self, kind: str, timestamp: float | None) -> None:
        counter = self._records.get(kind)
        if counter is None:
            counter = self._records[kind] = RECORDS.labels(kind)
        counter.inc()
        if timestamp:
            INPUT_LAG.observe(max(time.time() - timestamp, 0.0))

    def step(self, workflow: str, seconds: float) -> None:
        histogram = self._steps.get(workflow)
        if histogram is None:
            histogram = self._steps[workflow] = STEP_SECONDS.labels(workflow)
        histogram.observe(seconds)

    def replay(self, workflow: str, seconds: float, events: int) -> None:
        REPLAY_SECONDS.labels(workflow).observe(seconds)
        REPLAY_EVENTS.labels(workflow).inc(events)

    def journal(self, size: int) -> None:
        JOURNAL_BYTES.observe(size)

    def dead_letter(self, code: str) -> None:
        DEAD_LETTERS.labels(code).inc()

    def timer_fired(self, due: float) -> None:
        TIMER_LATENESS.observe(max(time.time() - due, 0.0))


def install() -> None:
    """Count into the metrics above from now on (the engine process does it at start)."""
    if not isinstance(observe.stats, PrometheusStats):
        observe.install(PrometheusStats())

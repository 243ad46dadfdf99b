"""The engine's Kafka sink: every record is delivered, or the dataflow stops.

Bytewax's own ``KafkaSink`` registers no delivery callback and ignores what ``flush()`` returns,
so a record the broker refused (a deleted topic, an ACL, a size limit) is dropped without a
word. Here every record is produced at once with a delivery callback, and the sink partition's
``snapshot()``, which Bytewax calls when an epoch closes and before the epoch can commit,
flushes and raises ``DeliveryError`` if any record failed. That stops the dataflow before the
epoch holding those records is committed, so a restart (after fixing the cause) replays the
epoch and produces them again: at-least-once, with ``kwf-seq`` headers for consumers to drop
duplicates. Nothing waits per batch. This module must never swallow a delivery error.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Mapping
from typing import Any

import structlog
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from typing_extensions import override

from kwf.engine import metrics
from kwf.protocol import Record

log = structlog.get_logger("kwf.sink")

PRODUCER_DEFAULTS: dict[str, str] = {
    # Retries must not reorder or duplicate a thread's records within a partition.
    "enable.idempotence": "true",
    "acks": "all",
    # Java clients' partitioner: a thread's records land on the partition a Java (or kafkajs)
    # producer would pick for the same key, so records from both stay in one order.
    "partitioner": "murmur2_random",
    # Records are sent as they come (deliveries are confirmed once per epoch, not per batch):
    # librdkafka's 5 ms default linger would add 5 ms to every reply -> next output, and even
    # 1 ms costs about 1.5 ms per hop. With 0 it still batches: what is produced while a
    # request is in flight goes in the next one.
    "linger.ms": "0",
}
"""Defaults under the user's librdkafka settings (the properties file may override them)."""

_SHOWN = 5  # failures named in an error message
POLL_S = 0.05
"""How often writing serves the client's callbacks (failed deliveries, logs): a ``poll`` per
sink partition per batch cost more than the produce calls of a small batch. ``confirm()``
serves them all (``flush``) before an epoch can commit."""


class DeliveryError(RuntimeError):
    """Kafka refused records; the dataflow stops so that a restart produces them again."""


def _encode(value: str | bytes | None) -> bytes | None:
    """What a key or value is on the wire (the client encodes ``str`` the same way)."""
    return value.encode("utf-8") if isinstance(value, str) else value


class _Producer:
    """One producer per worker thread, shared by the sink partitions that worker holds."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.failures: list[str] = []
        # Client-level errors (brokers down...) go to the config's error_cb
        # (kwf.engine.logs.kafka_client_config): librdkafka retries them; a record is lost only
        # when its own delivery fails, which the delivery callback reports. Delivery reports
        # come for failures only: no Python callback per acknowledged record.
        self.producer = Producer({**PRODUCER_DEFAULTS, **config,
                                  "on_delivery": self._on_delivery,
                                  "delivery.report.only.error": True})
        self.sent = 0
        self._next_poll = 0.0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            key = msg.key()
            shown = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
            self.failures.append(f"{msg.topic()} key={_clip(shown)!r}: {err.str()}")

    def produce(self, records: list[Record]) -> None:
        """Queue ``records`` in order; never waits unless librdkafka's local queue is full.

        Keys, values and header values go as they are: the client encodes ``str`` as UTF-8
        (and raises UnicodeEncodeError for a lone surrogate, which ``kwf.output`` refuses
        first). Headers go as a list, the only sequence the client takes.
        """
        produce = self.producer.produce
        for rec in records:
            stamp = round(rec.timestamp * 1000) if rec.timestamp > 0 else 0  # 0: "now"
            try:
                produce(rec.topic, rec.value, rec.key, headers=list(rec.headers), timestamp=stamp)
            except BufferError:  # the local queue is full: let deliveries drain it
                self._produce_when_room(rec, stamp)
            except KafkaException as e:  # refused before queueing (an unknown topic...)
                self._refused(rec, e)
        self.sent += len(records)
        now = time.monotonic()
        if now >= self._next_poll:  # error reports and client logs; deliveries need none
            self._next_poll = now + POLL_S
            self.producer.poll(0)

    def _produce_when_room(self, rec: Record, stamp: int) -> None:
        while True:
            self.producer.poll(0.1)
            try:
                self.producer.produce(rec.topic, rec.value, rec.key, headers=list(rec.headers),
                                      timestamp=stamp)
                return
            except BufferError:
                continue
            except KafkaException as e:
                self._refused(rec, e)
                return

    def _refused(self, rec: Record, e: KafkaException) -> None:
        self.failures.append(f"{rec.topic} key={_clip(rec.key)!r}: {e.args[0].str()}")

    def confirm(self) -> None:
        """Wait until every record produced so far is acknowledged; raise if any was refused."""
        started = time.monotonic()
        # Bounded by librdkafka's message.timeout.ms: each record is delivered or failed by then.
        while self.producer.flush(10.0) > 0:
            log.warning("kafka_delivery_slow", pending=len(self.producer),
                        seconds=round(time.monotonic() - started, 1))
        sent, self.sent = self.sent, 0
        if self.failures:
            failures, self.failures = self.failures, []
            shown = "; ".join(failures[:_SHOWN])
            more = f" (and {len(failures) - _SHOWN} more)" if len(failures) > _SHOWN else ""
            msg = (f"Kafka refused {len(failures)} of {max(sent, len(failures))} records: "
                   f"{shown}{more}. The engine stops so that nothing is lost: fix the cause "
                   "(create the topic with `kwf topics create`, check ACLs and size limits) and "
                   "restart it; the records are produced again (consumers drop duplicates by "
                   "kwf-thread/kwf-seq)")
            log.error("kafka_delivery_failed", failed=len(failures), first=failures[0])
            metrics.delivery_failed(len(failures))
            raise DeliveryError(msg)


class _Partition(StatefulSinkPartition[Record, None]):
    """Produces at once; ``snapshot()`` (at the epoch's close) waits for the acknowledgements."""

    def __init__(self, producer: _Producer) -> None:
        self._producer = producer

    @override
    def write_batch(self, values: list[Record]) -> None:
        self._producer.produce(values)

    @override
    def snapshot(self) -> None:
        self._producer.confirm()

    @override
    def close(self) -> None:
        self._producer.confirm()


PARTS = 16
"""Sink partitions (never change: they are recovery keys). Outputs are routed to a partition by
their upstream key (the thread id), so a thread's records leave in order from one producer."""


class KafkaRecordSink(FixedPartitionedSink[Record, None]):
    """Produce ``Record``s to their own topics; raise ``DeliveryError`` if any is refused.

    Records are produced as they come, without waiting; each partition's ``snapshot()``, which
    Bytewax calls when the epoch closes and before it can commit, flushes the worker's producer
    and raises if a delivery failed. So the engine never waits per batch, and an epoch whose
    outputs were not all acknowledged is never committed: a restart produces them again.

    Args:
        config: librdkafka settings (``Settings.kafka_config()``), over ``PRODUCER_DEFAULTS``.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = dict(config)
        self._producers: dict[int, _Producer] = {}
        self._lock = threading.Lock()

    @override
    def list_parts(self) -> list[str]:
        return [f"out-{i}" for i in range(PARTS)]

    @override
    def part_fn(self, item_key: str) -> int:
        return zlib.crc32(item_key.encode("utf-8", "surrogatepass"))

    @override
    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Partition:
        ident = threading.get_ident()
        with self._lock:
            producer = self._producers.get(ident)
            if producer is None:
                producer = self._producers[ident] = _Producer(self._config)
        return _Partition(producer)


def _clip(key: str | bytes | None, limit: int = 200) -> str | bytes | None:
    """Keys in error messages and logs: enough to find the thread, not a megabyte of it."""
    if key is None or len(key) <= limit:
        return key
    if isinstance(key, bytes):
        return key[:limit] + b"..."
    return key[:limit] + "..."

"""The engine's Kafka sink: every record is delivered, or the dataflow stops.

Bytewax's own ``KafkaSink`` registers no delivery callback and ignores what ``flush()`` returns,
so a record the broker refused (a deleted topic, an ACL, a size limit) is dropped without a
word. Here each batch is produced with a delivery callback and flushed before ``write_batch``
returns; if any record failed, ``write_batch`` raises ``DeliveryError``. That stops the
dataflow before the epoch holding those records is committed, so a restart (after fixing the
cause) replays the epoch and produces them again: at-least-once, with ``kwf-seq`` headers for
consumers to drop duplicates. This module must never swallow a delivery error.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog
from bytewax.outputs import DynamicSink, StatelessSinkPartition
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
}
"""Defaults under the user's librdkafka settings (the properties file may override them)."""

_SHOWN = 5  # failures named in an error message


class DeliveryError(RuntimeError):
    """Kafka refused records; the dataflow stops so that a restart produces them again."""


def _encode(value: str | bytes | None) -> bytes | None:
    return value.encode("utf-8") if isinstance(value, str) else value


def _kafka_headers(rec: Record) -> list[tuple[str, bytes]]:
    return [(name, v.encode("utf-8") if isinstance(v, str) else v) for name, v in rec.headers]


class _Partition(StatelessSinkPartition[Record]):
    """One producer per worker; ``write_batch`` returns only once the batch is acknowledged."""

    def __init__(self, config: Mapping[str, str], worker: int) -> None:
        self._worker = worker
        self._failures: list[str] = []
        # Client-level errors (brokers down...) go to the config's error_cb
        # (kwf.engine.logs.kafka_client_config): librdkafka retries them; a record is lost only
        # when its own delivery fails, which the delivery callback reports.
        self._producer = Producer({**PRODUCER_DEFAULTS, **config})

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            key = msg.key()
            shown = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
            self._failures.append(f"{msg.topic()} key={_clip(shown)!r}: {err.str()}")

    def _produce(self, rec: Record) -> None:
        kwargs: dict[str, Any] = {
            "topic": rec.topic, "key": _encode(rec.key), "value": _encode(rec.value),
            "headers": _kafka_headers(rec), "on_delivery": self._on_delivery,
        }
        if rec.timestamp > 0:  # 0 means "now" to librdkafka
            kwargs["timestamp"] = round(rec.timestamp * 1000)
        while True:
            try:
                self._producer.produce(**kwargs)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.1)
            except KafkaException as e:  # refused before queueing (an unknown topic...)
                self._failures.append(f"{rec.topic} key={_clip(rec.key)!r}: {e.args[0].str()}")
                return

    @override
    def write_batch(self, items: list[Record]) -> None:
        started = time.monotonic()
        for rec in items:
            self._produce(rec)
            self._producer.poll(0)
        # Bounded by librdkafka's message.timeout.ms: each record is delivered or failed by then.
        while self._producer.flush(10.0) > 0:
            log.warning("kafka_delivery_slow", worker=self._worker, pending=len(self._producer),
                        seconds=round(time.monotonic() - started, 1))
        if self._failures:
            failures, self._failures = self._failures, []
            shown = "; ".join(failures[:_SHOWN])
            more = f" (and {len(failures) - _SHOWN} more)" if len(failures) > _SHOWN else ""
            msg = (f"Kafka refused {len(failures)} of {len(items)} records: {shown}{more}. "
                   "The engine stops so that nothing is lost: fix the cause (create the topic "
                   "with `kwf topics create`, check ACLs and size limits) and restart it; the "
                   "records are produced again (consumers drop duplicates by kwf-thread/kwf-seq)")
            log.error("kafka_delivery_failed", worker=self._worker, failed=len(failures),
                      batch=len(items), first=failures[0])
            metrics.delivery_failed(len(failures))
            raise DeliveryError(msg)

    @override
    def close(self) -> None:
        self._producer.flush()
        if self._failures:  # write_batch flushes, so this is only a safety net
            msg = f"Kafka refused records at shutdown: {'; '.join(self._failures[:_SHOWN])}"
            raise DeliveryError(msg)


class KafkaRecordSink(DynamicSink[Record]):
    """Produce ``Record``s to their own topics; raise ``DeliveryError`` if any is refused.

    Args:
        config: librdkafka settings (``Settings.kafka_config()``), over ``PRODUCER_DEFAULTS``.
    """

    def __init__(self, config: Mapping[str, str]) -> None:
        self._config = dict(config)

    @override
    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return _Partition(self._config, worker_index)


def _clip(key: str | bytes | None, limit: int = 200) -> str | bytes | None:
    """Keys in error messages and logs: enough to find the thread, not a megabyte of it."""
    if key is None or len(key) <= limit:
        return key
    if isinstance(key, bytes):
        return key[:limit] + b"..."
    return key[:limit] + "..."

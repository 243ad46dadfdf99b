"""Run answer functions as Kafka services: consume request topics, reply on ``workflow-resume``.

A ``Handler`` is the same function ``kwf.testing.Engine.handle`` takes: ``fn(record)`` returns a
full resume (``{"ref": ..., "value": ...}`` or ``{"ref": ..., "error": ...}``) or None for no
answer. ``ServiceRunner`` gives such functions a Kafka life for demos and end-to-end tests, so
a rule is written once and tested both in virtual time and through the broker. It is a small
background thread with one consumer and one producer: no consumer group, no commits; it reads
from the end of its topics, as it is started before the workflows it serves.

This is demo and test tooling, not a service framework: it answers each record it reads, once,
after a delay; a crash loses the answers not yet sent.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from kwf.protocol import Record, dumps

__all__ = ["Handler", "ServiceRunner", "assign_at_end"]

log = structlog.get_logger("kwf.service")

Handler = Callable[[Record], Any]


def _thread_of(rec: Record) -> str | None:
    key = rec.header("kwf-thread") or rec.key
    return key.decode() if isinstance(key, bytes) else key


def assign_at_end(consumer: Consumer, topics: Iterable[str], timeout: float = 10.0) -> int:
    """Assign every partition of ``topics`` at its current end; returns the partition count.

    No consumer group is joined, so there is no rebalance to wait for: a record written after
    this returns is read. ``LookupError`` names a missing topic.
    """
    metadata = consumer.list_topics(timeout=timeout)
    assignment = []
    for topic in topics:
        meta = metadata.topics.get(topic)
        if meta is None or meta.error is not None:
            msg = (f"topic {topic!r} does not exist; create the engine's and the workflows' "
                   "topics with `kwf topics create`")
            raise LookupError(msg)
        for p in meta.partitions:
            assignment.append(TopicPartition(topic, p, high_watermark(consumer, topic, p, timeout)))
    consumer.assign(assignment)
    return len(assignment)


_NOT_READY = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART)


def high_watermark(consumer: Consumer, topic: str, partition: int, timeout: float) -> int:
    """The partition's high watermark, waiting out a just-created topic's leader election."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            high: int = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                       timeout=timeout)[1]
            return high
        except KafkaException as e:
            if e.args[0].code() not in _NOT_READY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class ServiceRunner:
    """Answer records on ``handlers``' topics from a background thread.

    Args:
        conf: librdkafka settings (``Settings.kafka_config()``).
        handlers: topic -> answer function.
        resume_topic: where answers go, keyed by the requesting thread (header ``kwf-thread``).
        delay: seconds to wait before sending the answer to a record (0 if None).
        accept: which thread ids to answer (all if None); other tests' or runs' records on a
            shared broker are skipped.
    """

    def __init__(self, conf: Mapping[str, str], handlers: Mapping[str, Handler],
                 resume_topic: str, *, delay: Callable[[Record], float] | None = None,
                 accept: Callable[[str], bool] | None = None) -> None:
        self.conf = dict(conf)
        self.handlers = dict(handlers)
        self.resume_topic = resume_topic
        self.delay = delay
        self.accept = accept
        self.seen = 0
        self.answered = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self._due: list[tuple[float, int, str, str]] = []
        self._order = itertools.count()

    def start(self) -> ServiceRunner:
        """Assign every partition of the request topics at its end, then serve in the background.

        Returns once assigned, so that requests written after ``start()`` are all seen.
        """
        consumer = Consumer({**self.conf, "group.id": "kwf-services", "enable.auto.commit": False})
        try:
            partitions = assign_at_end(consumer, self.handlers)
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        self._thread = threading.Thread(target=self._run, name="kwf-services", daemon=True)
        self._thread.start()
        log.info("services_started", topics=sorted(self.handlers), partitions=partitions)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving; answers still waiting for their delay are dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        log.info("services_stopped", seen=self.seen, answered=self.answered, errors=self.errors)

    def __enter__(self) -> ServiceRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        # linger 0, as the engine's sink: every millisecond of linger is one more per answer.
        producer = Producer({**self.conf, "linger.ms": 0})
        try:
            while not self._stop.is_set():
                for msg in consumer.consume(500, timeout=0.02):
                    if msg.error() is None:
                        self._on_record(msg)
                self._send_due(producer, time.monotonic())
                producer.poll(0)
            producer.flush(10)
        finally:
            consumer.close()

    def _on_record(self, msg: Any) -> None:
        ts = msg.timestamp()[1] / 1000
        # "replace": one record that is not UTF-8 (another run's, a stray producer's) must not
        # end the loop; the handler sees U+FFFD and answers or not, like any odd request.
        rec = Record(msg.topic(), msg.key().decode(errors="replace") if msg.key() else None,
                     msg.value().decode(errors="replace") if msg.value() is not None else None,
                     tuple(msg.headers() or ()), ts)
        thread = _thread_of(rec)
        if not thread or (self.accept is not None and not self.accept(thread)):
            return
        self.seen += 1
        try:
            answer = self.handlers[rec.topic](rec)
        except Exception:
            self.errors += 1
            log.exception("service_handler_failed", topic=rec.topic, thread=thread)
            return
        if answer is None:
            return
        if not (isinstance(answer, dict) and isinstance(answer.get("ref"), str)):
            self.errors += 1
            log.error("service_answer_invalid", topic=rec.topic, thread=thread,
                      answer=repr(answer)[:200])
            return
        due = time.monotonic() + (self.delay(rec) if self.delay else 0.0)
        heapq.heappush(self._due, (due, next(self._order), thread, dumps(answer)))

    def _send_due(self, producer: Producer, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            _, _, thread, value = heapq.heappop(self._due)
            producer.produce(self.resume_topic, key=thread.encode(), value=value.encode())
            self.answered += 1

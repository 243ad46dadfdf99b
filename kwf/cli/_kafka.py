"""What the ``kwf`` commands share: exit codes, settings, and short-lived Kafka clients.

Every command talks to Kafka the same way: check the brokers first (a refused connection is
answered at once, not after the timeout), read a topic from its start to its current end, or
produce one record and learn its partition and offset from the delivery report (which is how
``send`` recognises its own record in ``workflow-dlq``: the ``kwf-source`` header).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from kwf.config import Settings
from kwf.engine.admin import START_HINT, KafkaSetupError
from kwf.service import high_watermark

# Exit codes (README "Exit codes"); argparse itself exits 2 on a bad command line.
OK, FAILED, USAGE, NOT_RUNNING, NOT_FOUND, DEAD_LETTERED, THREAD_FAILED, WAITING, DIVERGED = (
    0, 1, 2, 3, 4, 5, 6, 7, 8)


class CliError(Exception):
    """A command failed in a way the user can act on; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


def add_kafka(parser: argparse.ArgumentParser, timeout: float = 10.0) -> None:
    parser.add_argument("--brokers", help="bootstrap servers (default: KWF_BROKERS)")
    parser.add_argument("--timeout", type=float, default=timeout,
                        help="seconds to wait for Kafka (%(default)s)")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def settings_of(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    brokers = getattr(args, "brokers", None)
    return dataclasses.replace(settings, brokers=brokers) if brokers else settings


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def parse_json(text: str, what: str) -> Any:
    """JSON from the command line, or a usage error naming the argument."""
    from kwf.protocol import ProtocolError, loads

    try:
        return loads(text)
    except ProtocolError as e:
        msg = f"{what} is not JSON: {e}"
        raise CliError(msg, USAGE) from None


# -- reaching Kafka ------------------------------------------------------------------------


def reach(settings: Settings, topics: Iterable[str], timeout: float) -> None:
    """Check the brokers answer and ``topics`` exist; a refused connection fails at once.

    librdkafka reports "all brokers down" through ``error_cb`` as soon as every bootstrap
    connection failed, while ``list_topics`` would wait its whole timeout; so the metadata
    request is made in short slices, polling the error callback between them.
    """
    errors: list[KafkaError] = []
    conf: dict[str, Any] = {"log_level": 0, **settings.kafka_config(), "error_cb": errors.append}
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout
    while True:
        try:
            md = admin.list_topics(timeout=0.25)
            break
        except KafkaException as e:
            admin.poll(0)
            down = any(err.code() == KafkaError._ALL_BROKERS_DOWN for err in errors)
            if down or time.monotonic() > deadline:
                reasons = sorted({err.str() for err in errors
                                  if err.code() != KafkaError._ALL_BROKERS_DOWN})
                reason = "; ".join(reasons[:2]) or e.args[0].str()
                msg = (f"Kafka at {settings.brokers} is unreachable ({reason}): {START_HINT}")
                raise KafkaSetupError(msg) from None
    missing = sorted(set(topics) - set(md.topics))
    if missing:
        msg = (f"topics missing on {settings.brokers}: {', '.join(missing)}; create them with "
               "`kwf topics create` (is KWF_*_TOPIC the engine's?)")
        raise KafkaSetupError(msg)


@dataclass(frozen=True)
class Message:
    """A record read from Kafka, decoded for display."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: str | None
    headers: dict[str, str]
    timestamp: float

    @property
    def address(self) -> str:
        """``topic/partition/offset``: what ``kwf-source`` holds."""
        return f"{self.topic}/{self.partition}/{self.offset}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def to_message(msg: Any) -> Message:
    headers = {k: _text(v) or "" for k, v in (msg.headers() or [])}
    return Message(msg.topic(), msg.partition(), msg.offset(), _text(msg.key()),
                   _text(msg.value()), headers, msg.timestamp()[1] / 1000)


def open_consumer(settings: Settings) -> Consumer:
    return Consumer({"log_level": 0, **settings.kafka_config(),
                     "group.id": f"kwf-cli-{uuid.uuid4().hex[:8]}", "enable.auto.commit": "false",
                     "enable.partition.eof": "false"})


def ends(settings: Settings, topic: str, timeout: float) -> dict[int, int]:
    """The next offset of each partition of ``topic`` (where a new record will land)."""
    consumer = open_consumer(settings)
    try:
        parts = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
        return {p: high_watermark(consumer, topic, p, timeout) for p in parts}
    except KafkaException as e:
        raise KafkaSetupError(f"cannot read {topic} on {settings.brokers}: {e}") from e
    finally:
        consumer.close()


def read(settings: Settings, topic: str, timeout: float,
         start: dict[int, int] | None = None) -> list[Message]:
    """Every record of ``topic`` from ``start`` (the beginning) to the current end, in order."""
    stop = ends(settings, topic, timeout)
    first = start or {}
    todo = {p: end for p, end in stop.items() if end > first.get(p, 0)}
    if not todo:
        return []
    consumer = open_consumer(settings)
    found: list[Message] = []
    try:
        consumer.assign([TopicPartition(topic, p, first.get(p, 0)) for p in todo])
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is not None:
                    continue
                p, offset = msg.partition() or 0, msg.offset() or 0
                if p in todo and offset < todo[p]:
                    found.append(to_message(msg))
                if offset + 1 >= stop[p]:
                    todo.pop(p, None)
    except KafkaException as e:
        raise KafkaSetupError(f"cannot read {topic} on {settings.brokers}: {e}") from e
    finally:
        consumer.close()
    if todo:
        print(f"kwf: warning: {topic} not read to its end within {timeout:g} s", file=sys.stderr)
    return found


def latest(messages: Iterable[Message]) -> dict[str, Message]:
    """The last record per key (a null value deletes the key, as compaction does)."""
    last: dict[str, Message] = {}
    for m in sorted(messages, key=lambda m: (m.timestamp, m.partition, m.offset)):
        if m.key is None:
            continue
        if m.value is None:
            last.pop(m.key, None)
        else:
            last[m.key] = m
    return last


def produce(settings: Settings, topic: str, key: str | None, value: str | None,
            timeout: float) -> tuple[int, int]:
    """Write one record and wait for its acknowledgement: its (partition, offset)."""
    producer = Producer({"log_level": 0, **settings.kafka_config(),
                         "partitioner": "murmur2_random"})
    report: list[tuple[int, int]] = []
    failures: list[str] = []

    def delivered(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            failures.append(err.str())
        else:
            report.append((msg.partition(), msg.offset()))

    producer.produce(topic, None if value is None else value.encode(),
                     None if key is None else key.encode(), on_delivery=delivered)
    if producer.flush(timeout) or failures or not report:
        msg = f"the record was not delivered to {topic}: {'; '.join(failures) or 'timeout'}"
        raise KafkaSetupError(msg)
    return report[0]


def dead_letter_of(settings: Settings, source: str, since: dict[int, int],
                   seconds: float) -> Message | None:
    """The dead letter whose ``kwf-source`` is ``source``, if one shows up within ``seconds``."""
    consumer = open_consumer(settings)
    topic = settings.dlq_topic
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in since.items()])
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.2):
                if msg.error() is None and to_message(msg).headers.get("kwf-source") == source:
                    return to_message(msg)
    finally:
        consumer.close()
    return None

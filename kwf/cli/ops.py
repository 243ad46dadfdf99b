"""``kwf send`` and ``kwf status``: poke a running engine from a shell, as an operator would.

``send`` writes one record to ``workflow-resume`` (start a thread, answer a suspend, approve,
cancel); ``status`` reads threads' latest records from the compacted ``workflow-events``
topic. Both use the engine's settings (``KWF_*``), so they talk to the same topics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from kwf.config import Settings
from kwf.engine.admin import KafkaSetupError, check_brokers
from kwf.protocol import ProtocolError, parse_command


def register_ops(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = commands.add_parser("send", help="write one record to workflow-resume")
    send.add_argument("thread", help="the thread id (the record's key)")
    send.add_argument("value", help="new:<json>, new:<name>:<json>, {\"ref\": ..., \"value\": ...}"
                                    ", cancel:, ... (the wire protocol, verbatim)")
    status = commands.add_parser("status", help="threads' latest status from workflow-events")
    status.add_argument("threads", nargs="*", help="thread ids (all threads if none)")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds (%(default)s)")
    for action, handler in ((send, send_command), (status, status_command)):
        action.add_argument("--brokers", help="bootstrap servers (default: KWF_BROKERS)")
        action.set_defaults(handler=handler)


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    return dataclasses.replace(settings, brokers=args.brokers) if args.brokers else settings


def send_command(args: argparse.Namespace) -> int:
    try:  # the engine would dead-letter it: say so here, and send nothing
        parse_command(args.value)
    except ProtocolError as e:
        print(f"kwf send: not sent: {e}")
        return 2
    settings = _settings(args)
    check_brokers(settings.kafka_config(), [settings.resume_topic], timeout=10.0)
    producer = Producer(settings.kafka_config())
    failures: list[str] = []
    producer.produce(settings.resume_topic, args.value.encode(), args.thread.encode(),
                     on_delivery=lambda err, _: failures.append(str(err)) if err else None)
    if producer.flush(10.0) or failures:
        msg = f"the record was not delivered to {settings.resume_topic}: {failures or 'timeout'}"
        raise KafkaSetupError(msg)
    print(f"sent to {settings.resume_topic} key={args.thread!r}")
    return 0


def read_statuses(settings: Settings, threads: set[str] | None,
                  timeout: float) -> dict[str, dict[str, Any]]:
    """The latest ``workflow-events`` value per thread (all of them, or those named)."""
    conf = {**settings.kafka_config(), "group.id": "kwf-status", "enable.auto.commit": "false"}
    consumer = Consumer(conf)
    try:
        meta = consumer.list_topics(settings.events_topic, timeout=timeout)
        parts = meta.topics[settings.events_topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(settings.events_topic, p),
                                                  timeout=timeout)[1] for p in parts}
        consumer.assign([TopicPartition(settings.events_topic, p, 0) for p in parts])
        latest: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        done: set[int] = {p for p, end in ends.items() if end == 0}
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is not None:
                    continue
                key = (msg.key() or b"").decode(errors="replace")
                value, partition, offset = msg.value(), msg.partition() or 0, msg.offset() or 0
                if threads is None or key in threads:
                    if value is None:
                        latest.pop(key, None)  # forgotten after its retention
                    else:
                        latest[key] = json.loads(value)
                if offset + 1 >= ends[partition]:
                    done.add(partition)
        return latest
    except KafkaException as e:
        raise KafkaSetupError(f"cannot read {settings.events_topic}: {e}") from e
    finally:
        consumer.close()


def status_command(args: argparse.Namespace) -> int:
    settings = _settings(args)
    check_brokers(settings.kafka_config(), [settings.events_topic], timeout=10.0)
    wanted = set(args.threads) or None
    statuses = read_statuses(settings, wanted, args.timeout)
    for thread in sorted(statuses):
        s = statuses[thread]
        print(f"{thread}  {s['workflow']}  {s['status']}  step {s['step']}  "
              f"pending {s['pending']}  timers {s['timers']}")
    missing = sorted((wanted or set()) - set(statuses))
    for thread in missing:
        print(f"{thread}  unknown (never started, or forgotten after its retention)")
    return 1 if missing else 0

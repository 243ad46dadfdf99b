"""``kwf kafka`` (the local development broker) and ``kwf topics`` (the topics kwf needs)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from pathlib import Path

from kwf.cli._kafka import NOT_RUNNING
from kwf.config import Settings
from kwf.engine.admin import check_brokers, ensure_topics, required_topics
from kwf.kafka.broker import DEFAULT_PORT, KAFKA_VERSION, BrokerStatus, LocalBroker



# -- kwf kafka start|stop|status|reset -------------------------------------------------------


def register_kafka(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kafka = commands.add_parser("kafka", help="the local development Kafka broker")
    actions = kafka.add_subparsers(title="actions", metavar="ACTION", required=True)
    for name, handler, help_text in (
        ("start", kafka_start, f"start Kafka {KAFKA_VERSION} on 127.0.0.1 (no-op when running)"),
        ("stop", kafka_stop, "stop it (SIGTERM, then SIGKILL)"),
        ("status", kafka_status, f"is it running? (exit code {NOT_RUNNING} when not)"),
        ("reset", kafka_reset, "delete its data (topics, offsets); it must be stopped"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument(
            "--home", help="state directory (default: $KWF_KAFKA_HOME or ./.kwf/kafka)"
        )
        action.set_defaults(handler=handler)
        if name == "status":
            action.add_argument("--json", action="store_true", help="print JSON")
        if name == "start":
            action.add_argument(
                "--port", type=int, default=DEFAULT_PORT, help="client port (%(default)s)"
            )
            action.add_argument(
                "--controller-port", type=int, help="KRaft controller port (port + 1)"
            )
            action.add_argument(
                "--timeout", type=float, default=90.0, help="seconds to wait (%(default)s)"
            )


def _broker(args: argparse.Namespace) -> LocalBroker:
    return LocalBroker(
        home=args.home,
        port=getattr(args, "port", DEFAULT_PORT),
        controller_port=getattr(args, "controller_port", None),
    )


def kafka_start(args: argparse.Namespace) -> int:
    broker = _broker(args)
    was_running = broker.status().running
    if not was_running:
        if not broker.jars_cached():
            print(
                f"resolving Kafka {KAFKA_VERSION} jars with Maven (first run downloads ~50 MB)..."
            )
        print(f"starting Kafka on {broker.bootstrap} (state in {broker.home})...", flush=True)
    status = broker.start(timeout=args.timeout)
    print(
        ("Kafka is already running: " if was_running else "Kafka is running: ") + _describe(status)
    )
    if status.bootstrap != Settings().brokers:
        print(f"  export KWF_BROKERS={status.bootstrap}")
    return 0


def kafka_stop(args: argparse.Namespace) -> int:
    broker = _broker(args)
    pid = broker.status().pid
    stopped = broker.stop()
    print(f"stopped Kafka (pid {pid})" if stopped else f"Kafka is not running ({broker.home})")
    return 0


def kafka_status(args: argparse.Namespace) -> int:
    status = _broker(args).status()
    if args.json:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v
                          for k, v in dataclasses.asdict(status).items()}))
        return 0 if status.running else NOT_RUNNING
    if not status.running:
        print(f"Kafka is not running ({status.home})")
        return NOT_RUNNING
    print(f"Kafka is running: {_describe(status)}")
    return 0


def _describe(status: BrokerStatus) -> str:
    return f"pid {status.pid}, bootstrap {status.bootstrap}, log {status.log_file}"


def kafka_reset(args: argparse.Namespace) -> int:
    broker = _broker(args)
    broker.reset()
    print(f"deleted Kafka data in {broker.data}")
    return 0


# -- kwf topics create|check -----------------------------------------------------------------


def register_topics(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    topics = commands.add_parser("topics", help="the Kafka topics kwf needs")
    actions = topics.add_subparsers(title="actions", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create missing engine and workflow output topics")
    create.add_argument("--partitions", type=int, help="default: KWF_PARTITIONS (3)")
    create.add_argument("--replication", type=int, help="default: KWF_REPLICATION (1)")
    create.set_defaults(handler=topics_create)
    check = actions.add_parser("check", help="fail unless the brokers answer and all topics exist")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds (%(default)s)")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=topics_check)
    for action in (create, check):
        action.add_argument("--brokers", help="bootstrap servers (default: KWF_BROKERS)")
        action.add_argument(
            "--no-workflows",
            action="store_true",
            help="engine topics only: do not import workflows",
        )


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    return dataclasses.replace(settings, brokers=args.brokers) if args.brokers else settings


def topics_create(args: argparse.Namespace) -> int:
    settings = _settings(args)
    wanted = required_topics(settings, with_outputs=not args.no_workflows)
    created = ensure_topics(settings, args.partitions, args.replication, not args.no_workflows)
    existing = [t for t in wanted if t not in created]
    print(f"created {len(created)} topics on {settings.brokers}: {', '.join(created) or '-'}")
    print(f"already there: {', '.join(existing) or '-'}")
    return 0


def topics_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    wanted = required_topics(settings, with_outputs=not args.no_workflows)
    check_brokers(settings.kafka_config(), wanted, timeout=args.timeout)
    if args.json:
        print(json.dumps({"brokers": settings.brokers, "topics": wanted}))
        return 0
    print(f"ok: {settings.brokers} answers and has all {len(wanted)} topics")
    return 0

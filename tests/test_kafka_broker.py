"""The local broker launcher, topic administration and the `kwf kafka` / `kwf topics` commands."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from kwf import cli, config
from kwf.kafka import BrokerError, KafkaSetupError, LocalBroker, check_brokers, create_topics


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of the test's own (ports, state), so killing it leaves the session's alone."""
    port, controller = free_ports(2)
    broker = LocalBroker(home=tmp_path / "kafka", port=port, controller_port=controller)
    yield broker
    broker.stop(timeout=10)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple[int, str]]]:
    """Run ``kwf`` in-process; returns (exit code, stdout + stderr). Restores structlog after."""
    saved = structlog.get_config()

    def run(*argv: str) -> tuple[int, str]:
        code = cli.main(list(argv))
        out = capsys.readouterr()
        return code, out.out + out.err

    yield run
    structlog.configure(**saved)


@pytest.mark.kafka
def test_start_stop_twice_and_restart_after_kill_9(own_broker: LocalBroker) -> None:
    broker = own_broker
    conf = {"bootstrap.servers": broker.bootstrap}

    first = broker.start()
    assert first.running and first.bootstrap == broker.bootstrap
    assert broker.start().pid == first.pid  # already running: a no-op
    check_brokers(conf, [])
    assert broker.stop() is True
    assert broker.stop() is False
    assert not broker.status().running

    second = broker.start()  # restarts on the formatted storage
    assert second.running and second.pid != first.pid
    create_topics(conf, ["survivor"], partitions=1, replication=1)

    assert second.pid is not None
    os.kill(second.pid, signal.SIGKILL)  # stale pid file, data dir lock of a dead process
    deadline = time.monotonic() + 10
    while broker.status().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not broker.status().running
    third = broker.start()
    assert third.running and third.pid != second.pid
    check_brokers(conf, ["survivor"], timeout=10)  # data survived the kill
    assert broker.stop() is True

    # A broker that cannot come up is reported with the end of its log.
    meta = broker.data / "meta.properties"
    meta.write_text(meta.read_text().replace("node.id=1", "node.id=7"))
    with pytest.raises(BrokerError, match="kwf kafka reset") as info:
        broker.start()
    assert "node id" in str(info.value)
    assert not broker.status().running


def test_start_refuses_a_port_taken_by_another_process(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = LocalBroker(home=tmp_path / "kafka", port=port, controller_port=free_ports(1)[0])
        with pytest.raises(BrokerError, match=f"port {port} .* taken by another process"):
            broker.start()
    assert not broker.status().running


def test_check_brokers_fails_fast_when_unreachable() -> None:
    started = time.monotonic()
    with pytest.raises(KafkaSetupError, match="kwf kafka start") as info:
        check_brokers({"bootstrap.servers": "127.0.0.1:1"}, ["anything"], timeout=3)
    assert time.monotonic() - started < 10
    assert "127.0.0.1:1" in str(info.value)


@pytest.mark.kafka
def test_check_brokers_names_missing_topics(
    kafka_conf: dict[str, str], unique: Callable[[str], str]
) -> None:
    present, missing = unique("present"), unique("missing")
    create_topics(kafka_conf, [present], partitions=1, replication=1)
    started = time.monotonic()
    with pytest.raises(KafkaSetupError, match="kwf topics create") as info:
        check_brokers(kafka_conf, [present, missing])
    assert time.monotonic() - started < 10
    assert missing in str(info.value) and present not in str(info.value)


@pytest.mark.kafka
def test_create_topics_is_idempotent_and_compacts_events(
    kafka_conf: dict[str, str], unique: Callable[[str], str]
) -> None:
    events, plain = unique("events"), unique("plain")
    assert sorted(create_topics(kafka_conf, [events, plain], 3, 1, compacted={events})) == sorted(
        [events, plain]
    )
    assert create_topics(kafka_conf, [events, plain], 3, 1, compacted={events}) == []

    admin = AdminClient(kafka_conf)
    assert len(admin.list_topics(timeout=10).topics[events].partitions) == 3
    resources = [ConfigResource("topic", events), ConfigResource("topic", plain)]
    policy = {
        res.name: future.result(timeout=10)["cleanup.policy"].value
        for res, future in admin.describe_configs(resources).items()
    }
    assert policy == {events: "compact", plain: "delete"}


@pytest.mark.kafka
def test_produce_and_consume_through_created_topic(
    kafka_conf: dict[str, str], unique: Callable[[str], str]
) -> None:
    topic = unique("roundtrip")
    create_topics(kafka_conf, [topic], partitions=1, replication=1)
    producer = Producer(kafka_conf)
    producer.produce(topic, key=b"thread-1", value=b'new:{"x": 1}')
    assert producer.flush(10) == 0

    consumer = Consumer(
        {**kafka_conf, "group.id": unique("group"), "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 20
        msg = None
        while msg is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error():
                pytest.fail(str(msg.error()))
    finally:
        consumer.close()
    assert msg is not None
    assert (msg.key(), msg.value()) == (b"thread-1", b'new:{"x": 1}')


@pytest.mark.kafka
def test_cli_topics_create_and_check(
    kafka_brokers: str,
    unique: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    run_cli: Callable[..., tuple[int, str]],
) -> None:
    names = {f: unique(f) for f in ("resume", "scheduler", "result", "error", "events", "dlq")}
    for field, name in names.items():
        monkeypatch.setenv(f"KWF_{field.upper()}_TOPIC", name)
    monkeypatch.setenv("KWF_BROKERS", kafka_brokers)
    monkeypatch.setenv("KWF_WORKFLOWS", "")  # import no workflow module...
    output = unique("saga-out")
    monkeypatch.setattr(config, "output_topics", {output})  # ...but one declared an output

    code, out = run_cli("topics", "check")
    assert code == 1 and "kwf topics create" in out
    code, out = run_cli("topics", "create", "--partitions", "1")
    assert code == 0 and "created 7 topics" in out and output in out
    code, out = run_cli("topics", "create")
    assert code == 0 and "created 0 topics" in out
    code, out = run_cli("topics", "check")
    assert code == 0, out
    code, out = run_cli("topics", "check", "--json")
    assert code == 0 and json.loads(out)["topics"] == [*names.values(), output], out


def test_cli_kafka_status_and_stop_when_not_running(
    tmp_path: Path, run_cli: Callable[..., tuple[int, str]]
) -> None:
    code, out = run_cli("kafka", "status", "--home", str(tmp_path))
    assert code == cli.NOT_RUNNING and "not running" in out
    code, out = run_cli("kafka", "status", "--home", str(tmp_path), "--json")
    assert code == cli.NOT_RUNNING and json.loads(out)["running"] is False
    code, out = run_cli("kafka", "stop", "--home", str(tmp_path))
    assert code == 0 and "not running" in out

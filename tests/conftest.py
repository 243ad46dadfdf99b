"""Shared fixtures: one Kafka per test session, and unique names so runs never collide.

Tests marked ``kafka`` take ``kafka_brokers``. With ``KWF_BROKERS`` set (``.ci/run`` does) they
use that cluster; otherwise a local broker is started once for the session on port 19092 (not
the dev broker's 9092) and stopped at the end. Its state directory is fixed, so a run that died
without stopping it leaves a broker the next run adopts instead of a port it cannot bind; an
adopted broker is left running (it may serve another session's tests).
Because a broker may be shared and reused, every test names its topics, groups and thread ids
with ``unique``.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest

import kwf
from kwf.testing import Engine

TEST_BROKER_PORT = 19092


@pytest.fixture(scope="session")
def kafka_brokers() -> Iterator[str]:
    """Bootstrap servers of a Kafka for this session: ``$KWF_BROKERS`` or a local broker."""
    if os.environ.get("KWF_BROKERS"):
        yield os.environ["KWF_BROKERS"]
        return
    from kwf.kafka import LocalBroker

    home = Path(tempfile.gettempdir()) / f"kwf-test-kafka-{TEST_BROKER_PORT}"
    broker = LocalBroker(home=home, port=TEST_BROKER_PORT)
    adopted = broker.status().running  # another session's or a developer's: left running
    if not adopted:
        broker.reset()  # start from empty: topics of old runs would only accumulate
    broker.start()
    yield broker.bootstrap
    if not adopted:
        broker.stop()


@pytest.fixture
def kafka_conf(kafka_brokers: str) -> dict[str, str]:
    """librdkafka settings for the session's Kafka."""
    return {"bootstrap.servers": kafka_brokers}


@pytest.fixture
def unique() -> Callable[[str], str]:
    """``unique("orders")`` -> ``"orders-1f3a..."``: topic, group, thread names no rerun reuses."""

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture(autouse=True)
def restore_output_topics() -> Iterator[None]:
    """Undo whatever a test adds to ``kwf.config.output_topics`` (modules declare theirs on import,
    before this runs, as workflow modules do)."""
    saved = set(kwf.config.output_topics)
    yield
    kwf.config.output_topics.clear()
    kwf.config.output_topics.update(saved)


@pytest.fixture(params=["live", "replay"])
def make_engine(request: pytest.FixtureRequest) -> Iterator[Callable[..., Engine]]:
    """Engines in both modes: live instances, or rebuilt by replay before every event."""
    engines: list[Engine] = []

    def make(*workflows: Any, **kwargs: Any) -> Engine:
        if request.param == "replay":
            kwargs.setdefault("max_live", 0)
        engines.append(Engine(workflows=list(workflows), **kwargs))
        return engines[-1]
    yield make
    for eng in engines:
        eng.close()

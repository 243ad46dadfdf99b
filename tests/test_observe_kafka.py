"""Observing a running engine on Kafka: its stderr, its metrics, tracebacks and dead letters.

The engine runs as deployed (``python -m bytewax.run dataflow``, see ``test_flow_kafka``). The
stderr test uses a broker of its own on port 19342, because it stops it for an outage.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_flow_kafka import Engine, World

from kwf.kafka import LocalBroker

pytestmark = pytest.mark.kafka

OWN_BROKER_PORT = 19342
"""The outage test's own broker (and 19343 its controller): never the shared one."""


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for engine in started:
        engine.kill()


def lines(engine: Engine) -> list[dict[str, Any]]:
    """Every line the engine wrote, parsed; a line that is not a JSON object fails the test."""
    events = []
    for number, line in enumerate(engine.output().splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} of the engine's output is not JSON: {line!r}")
        assert isinstance(event, dict), f"line {number} is JSON but not an object: {line!r}"
        events.append(event)
    return events


def stop(engine: Engine, sig: int = signal.SIGINT) -> int:
    assert engine.proc is not None
    engine.proc.send_signal(sig)
    return engine.wait(30)

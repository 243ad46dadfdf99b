"""Fixtures and helpers shared by the core's tests (imported by name into test modules)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

import kwf
from kwf.testing import Engine


@pytest.fixture(autouse=True)
def restore_output_topics() -> Iterator[None]:
    """Undo whatever a test adds to ``kwf.config.output_topics``."""
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


def values(eng: Engine, topic: str) -> list[Any]:
    """The values written to ``topic``, in order."""
    return [r.value for r in eng.outputs(topic)]

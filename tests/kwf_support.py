"""Helpers shared by the core's tests."""

from __future__ import annotations

from typing import Any

from kwf.testing import Engine


def values(eng: Engine, topic: str) -> list[Any]:
    """The values written to ``topic``, in order."""
    return [r.value for r in eng.outputs(topic)]

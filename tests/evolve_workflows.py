"""Workflows for the evolve tests: ``evolve-tally`` (continues as new), and ``evolve-greet`` in the
versions a team would deploy.

``v1`` is the original. ``v2_unsafe`` adds an audit record at the start, an edit that threads
in flight cannot replay. ``v2`` makes the same edit behind ``kwf.patched("audit")``. ``v3`` adds
a second patch after the wait, which an old thread meets live for the first time. ``v4`` retires
the ``audit`` patch with ``kwf.deprecate_patch``. Every version registers under the same name;
the last decorated (``v2``) is what ``KWF_WORKFLOWS=evolve_workflows`` serves, as if it were the
code of today; tests choose another by replacing the registry entry.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import kwf

PREFIX = os.environ.get("KWF_TEST_PREFIX", "evolve")
"""The Kafka tests load this module in an engine subprocess with a unique prefix per test."""
TOPIC = f"{PREFIX}-greet-out"
TALLY_TOPIC = f"{PREFIX}-tally-out"
BOOK_TOPIC = f"{PREFIX}-book-out"
NAME = "evolve-greet"
kwf.config.output_topics |= {TOPIC, TALLY_TOPIC, BOOK_TOPIC}


def topic_names(prefix: str) -> dict[str, str]:
    """The user topics of these workflows for a given ``KWF_TEST_PREFIX``."""
    return {"greet": f"{prefix}-greet-out", "tally": f"{prefix}-tally-out",
            "book": f"{prefix}-book-out"}


@kwf.workflow("evolve-kbook")
async def kbook(arg: Any) -> dict[str, str]:
    """A child: ask for ``what`` on the book topic, wait for "confirm"; undo if cancelled."""
    kwf.output_json({"reserve": arg["what"]}, BOOK_TOPIC)
    try:
        await kwf.suspend("confirm")
    except asyncio.CancelledError:
        kwf.output_json({"undo": arg["what"]}, BOOK_TOPIC)
        raise
    return {"booked": arg["what"]}


@kwf.workflow("evolve-ktrip")
async def ktrip(arg: Any) -> dict[str, Any]:
    """A parent: car and hotel as children, then the flight child, cancelled if it is late."""
    car, hotel, flight = (kwf.child("evolve-kbook", {"what": w}) for w in ("car", "hotel", "flight"))
    booked = await kwf.all([car, hotel])
    late = await kwf.race([flight, asyncio.sleep(float(arg.get("flightWaitS", 2)))])
    return {"booked": booked, "flight": late or "cancelled"}


@kwf.workflow("evolve-tally")
async def tally(arg: Any) -> int:
    """Count values on "add" until "stop", continuing as new every ``every`` events."""
    n, every = int(arg.get("n", 0)), int(arg.get("every", 3))
    while True:
        if kwf.journal_length() >= every:
            kwf.continue_as_new({"n": n, "every": every})
        value = await kwf.suspend("add")
        if value == "stop":
            return n
        n += 1
        kwf.output_json({"n": n, "v": value}, TALLY_TOPIC)


@kwf.workflow(NAME)
async def v1(arg: Any) -> dict[str, Any]:
    kwf.output_json({"hello": arg}, TOPIC)
    name = await kwf.suspend("name")
    return {"name": name, "audited": False}


@kwf.workflow(NAME)
async def v2_unsafe(arg: Any) -> dict[str, Any]:
    kwf.output_json({"audit": arg}, TOPIC)
    kwf.output_json({"hello": arg}, TOPIC)
    name = await kwf.suspend("name")
    return {"name": name, "audited": True}


@kwf.workflow(NAME)
async def v3(arg: Any) -> dict[str, Any]:
    audited = kwf.patched("audit")
    if audited:
        kwf.output_json({"audit": arg}, TOPIC)
    kwf.output_json({"hello": arg}, TOPIC)
    name = await kwf.suspend("name")
    if kwf.patched("shout"):
        name = str(name).upper()
    await kwf.suspend("done")
    return {"name": name, "audited": audited}


@kwf.workflow(NAME)
async def v4(arg: Any) -> dict[str, Any]:
    kwf.deprecate_patch("audit")
    kwf.output_json({"audit": arg}, TOPIC)
    kwf.output_json({"hello": arg}, TOPIC)
    name = await kwf.suspend("name")
    return {"name": name, "audited": True}


@kwf.workflow(NAME)
async def v2(arg: Any) -> dict[str, Any]:
    audited = kwf.patched("audit")
    if audited:
        kwf.output_json({"audit": arg}, TOPIC)
    kwf.output_json({"hello": arg}, TOPIC)
    name = await kwf.suspend("name")
    return {"name": name, "audited": audited}

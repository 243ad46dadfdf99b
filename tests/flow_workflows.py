"""Workflows for the dataflow tests: in-process (``test_flow.py``) and on Kafka (``test_flow_kafka.py``).

The Kafka tests load this module in an engine subprocess (``KWF_WORKFLOWS=flow_workflows``), so
topic names come from the environment: ``KWF_TEST_PREFIX`` makes them unique per test run, and
the scheduler topic is the engine's own (``KWF_SCHEDULER_TOPIC``). Workflow names start with
``f`` so they never replace the example workflows registered under ``trip`` or ``cart``.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import kwf
from kwf.config import Settings

KINDS = ("car", "hotel")


def topic_names(prefix: str) -> dict[str, str]:
    """The user topics of these workflows for a given ``KWF_TEST_PREFIX``."""
    names = {f"{op}-{kind}": f"{prefix}-{op}-{kind}" for op in ("reserve", "cancel") for kind in KINDS}
    return {**names, "cart": f"{prefix}-cart", "notify": f"{prefix}-notify"}


PREFIX = os.environ.get("KWF_TEST_PREFIX", "flow")
TOPICS = topic_names(PREFIX)
RESERVE = {kind: TOPICS[f"reserve-{kind}"] for kind in KINDS}
CANCEL = {kind: TOPICS[f"cancel-{kind}"] for kind in KINDS}
CART, NOTIFY = TOPICS["cart"], TOPICS["notify"]
SCHEDULER = Settings.from_env().scheduler_topic

kwf.config.output_topics |= {*TOPICS.values(), SCHEDULER}


async def _reserve(kind: str) -> dict[str, str]:
    ref = kwf.suspend()
    kwf.output(ref.id, RESERVE[kind])
    try:
        await ref
    except asyncio.CancelledError:
        kwf.output(ref.id, CANCEL[kind])
        raise
    return {"id": ref.id}


@kwf.workflow("ftrip")
async def ftrip(opts: Any) -> dict[str, Any]:
    """Reserve a car and a hotel together (one failure cancels the other), then rest a while."""
    opts = opts if isinstance(opts, dict) else {}
    car, hotel = await kwf.all([_reserve("car"), _reserve("hotel")])
    await asyncio.sleep(float(opts.get("rest", 60)))
    return {"car": car, "hotel": hotel}


@kwf.workflow("fcart")
async def fcart(opts: Any) -> dict[str, Any]:
    """Signals on the named channel ``cart``; abandoned after ``timeout`` seconds without one."""
    opts = opts if isinstance(opts, dict) else {}
    items: dict[str, int] = {}
    while True:
        try:
            signal = await asyncio.wait_for(kwf.suspend("cart"), float(opts.get("timeout", 600)))
        except TimeoutError:
            return {"status": "abandoned", "items": items}
        op = signal.get("op") if isinstance(signal, dict) else None
        if op == "add":
            items[str(signal.get("item"))] = items.get(str(signal.get("item")), 0) + 1
        elif op == "remove":
            items.pop(str(signal.get("item")), None)
        elif op == "checkout":
            return {"status": "ordered", "items": items}
        kwf.output_json({"items": items}, CART)


@kwf.workflow("falarm")
async def falarm(opts: Any) -> str:
    """Ask ``workflow-scheduler`` to wake the thread after ``ms`` milliseconds (the seed's way)."""
    opts = opts if isinstance(opts, dict) else {}
    wake = json.dumps({"ref": "alarm", "value": "rang"})
    kwf.output(str(int(opts.get("ms", 1000))), SCHEDULER, key=f"{kwf.thread_id()}|{wake}")
    return str(await kwf.suspend("alarm"))


@kwf.workflow("fnotify")
async def fnotify(opts: Any) -> int:
    """Write each signal on ``note`` to the notify topic, until ``stop``."""
    count = 0
    while True:
        note = await kwf.suspend("note")
        if note == "stop":
            return count
        count += 1
        kwf.output_json({"note": note, "n": count}, NOTIFY)


@kwf.workflow("fids")
async def fids(opts: Any) -> int:
    """Each step writes the id of a fresh auto suspend to the notify topic: the offset of the
    record that caused the step. ``"nap"`` sleeps first, so a timer's step (no record) makes
    the next one; ``"stop"`` returns the step number."""
    while True:
        ref = kwf.suspend()
        kwf.output(ref.id, NOTIFY)
        value = await ref
        if value == "stop":
            return kwf.step_id()
        if value == "nap":
            await asyncio.sleep(0.5)


ALL = [ftrip, fcart, falarm, fnotify, fids]

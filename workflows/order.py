"""An order (workflow ``order``): charge, reserve stock, ship, each a ``kwf.call`` to a service
with a timeout, retries and exponential backoff; on failure, undo what was done in reverse order.

The seed could not express this without writing the retry loop and the timers by hand on the
scheduler topic; here every wait (a reply, a backoff) is a durable timer in the thread's
journal, and a retried request keeps its idempotency key, so a service that saw the first
attempt late still acts once.

Start: ``new:order:{"amount": 42.5, "items": [{"sku": "p1", "qty": 2}], "address": "..."}``;
optional ``"orderId"`` (default: a ``kwf.uuid4()``, stable on replay), ``"timeoutS"`` (per
attempt, default 5), ``"retries"`` (default 3), ``"backoffS"`` (default 1), ``"maxBackoffS"``
(default 30).

Services (request shape in ``kwf.calls``; key ``<orderId>/<step>``): ``order-payment``,
``order-inventory``, ``order-shipping``. Each has a ``<topic>-cancel`` topic receiving
``{"key": ...}`` (plus ``"ref"`` when a call in flight is abandoned) to undo the step with that
key: a refund, a stock release, a cancelled shipment. An error reply ``"unavailable"`` (or
``{"retry": true, ...}``) is transient and retried, as is a missing reply; any other error is
final (``"card declined"``, ``"out of stock"``).

Result: ``{"orderId", "status": "shipped", "payment", "inventory", "shipping"}`` (the services'
values); on failure ``workflow-error`` holds the error, after the compensations were written.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kwf
from kwf.calls import call

PAYMENT, INVENTORY, SHIPPING = "order-payment", "order-inventory", "order-shipping"
STEPS = (("payment", PAYMENT), ("inventory", INVENTORY), ("shipping", SHIPPING))
TRANSIENT = "unavailable"

kwf.config.output_topics |= {t for _, topic in STEPS for t in (topic, f"{topic}-cancel")}


def transient(error: BaseException) -> bool:
    """Retry timeouts and errors the service marked as passing; not a refusal."""
    if isinstance(error, TimeoutError):
        return True
    if isinstance(error, kwf.RemoteError):
        payload = error.payload
        return payload == TRANSIENT or (isinstance(payload, dict) and payload.get("retry") is True)
    return False


def _requests(arg: dict[str, Any]) -> dict[str, Any]:
    return {
        "payment": {"amount": arg.get("amount", 0)},
        "inventory": {"items": arg.get("items", [])},
        "shipping": {"items": arg.get("items", []), "address": arg.get("address", "")},
    }


@kwf.workflow("order")
async def order(arg: dict[str, Any] | None) -> dict[str, Any]:
    """Pay, reserve, ship; or refund and release whatever was done."""
    arg = arg or {}
    order_id = str(arg.get("orderId") or kwf.uuid4())
    requests = _requests(arg)
    done: list[tuple[str, str]] = []  # (cancel topic, key) of the steps to undo, in order
    results: dict[str, Any] = {}
    try:
        for name, topic in STEPS:
            key = f"{order_id}/{name}"
            results[name] = await call(
                topic, {"orderId": order_id, **requests[name]}, key=key,
                timeout=float(arg.get("timeoutS", 5.0)), retries=int(arg.get("retries", 3)),
                backoff=float(arg.get("backoffS", 1.0)),
                max_backoff=float(arg.get("maxBackoffS", 30.0)),
                retry_on=transient, cancel_topic=f"{topic}-cancel")
            done.append((f"{topic}-cancel", key))
    except (Exception, asyncio.CancelledError):
        for cancel_topic, key in reversed(done):
            kwf.output_json({"key": key}, cancel_topic)
        raise
    return {"orderId": order_id, "status": "shipped", **results}

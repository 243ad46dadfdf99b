"""Line-for-line ports of kafka-workflow's trip saga and cart, for the byte-compatibility tests.

Unlike ``workflows/`` (kwf's own versions, with durable timers and fixes), these keep every
quirk of the original (``workflow-trip-booking-saga`` and ``workflow-ecommerce`` at awto/
kafka-workflow ``b2f3ce2``): timers through ``workflow-scheduler`` with hand-written keys,
``"abondoned"``, and the cart's undeclared ``checkoutError``/``getCart`` topics (declared here,
since kwf refuses undeclared topics). Each JS statement is the Python line beside its comment.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any, Callable

import kwf

TIMEOUT_MS = 1000

kwf.config.output_topics |= {"workflow-scheduler", "ecommerce-reminder", "checkoutError",
                             "getCart"}
kwf.config.output_topics |= {f"saga-{op}-{kind}" for op in ("reserve", "cancel")
                             for kind in ("car", "hotel", "flight")}


# -- workflow-trip-booking-saga/src/index.ts -------------------------------------------------

async def _trip_timeout() -> None:
    resume = kwf.suspend()
    kwf.output(f"{TIMEOUT_MS}", "workflow-scheduler",
               f'{kwf.thread_id()}|{{"ref":"{resume.id}"}}')
    try:
        await resume
    except (Exception, asyncio.CancelledError) as e:  # catch (e) {
        if isinstance(e, asyncio.CancelledError):  # if (e instanceof W.CancelToken)
            kwf.output("0", "workflow-scheduler", f'{kwf.thread_id()}|{{"ref":"{resume.id}"}}')
        return
    raise Exception("timeout")  # noqa: TRY002 - throw "timeout"


async def _reserve(kind: str) -> dict[str, str]:
    resume = kwf.suspend()
    kwf.output(resume.id, f"saga-reserve-{kind}")
    ret = {"id": resume.id}
    try:
        await resume
    except asyncio.CancelledError:  # if (... e instanceof W.CancelToken) cancel(kind, ret)
        _cancel(kind, ret)
        raise
    return {"id": resume.id}


def _cancel(kind: str, handler: dict[str, str]) -> None:
    kwf.output(handler["id"], f"saga-cancel-{kind}")


@kwf.workflow("seed-trip")
async def seed_trip(opts: Any) -> dict[str, Any]:
    opts = opts if opts is not None else {"throwAfterHotel": False}
    compensations: list[Callable[[], None]] = []

    async def car_() -> dict[str, str]:
        car = await _reserve("car")
        compensations.append(partial(_cancel, "car", car))
        return car

    async def hotel_() -> dict[str, str]:
        hotel = await _reserve("hotel")
        compensations.append(partial(_cancel, "hotel", hotel))
        if opts.get("throwAfterHotel"):
            raise Exception("something is wrong")  # noqa: TRY002 - throw "something is wrong"
        return hotel

    async def flight_() -> dict[str, str]:
        flight = await _reserve("flight")
        compensations.append(partial(_cancel, "flight", flight))
        return flight

    try:
        car, hotel, flight = await kwf.race([kwf.all([car_(), hotel_(), flight_()]),
                                             _trip_timeout()])
        return {"car": car, "hotel": hotel, "flight": flight}
    except BaseException:  # catch (e)
        for compensate in compensations:  # await Promise.all(compensations.map(i => i()))
            compensate()
        raise


# -- workflow-ecommerce/src/index.ts ---------------------------------------------------------

async def _cart_timeout(ms: int) -> dict[str, str]:
    resume = kwf.suspend()
    kwf.output(f"{ms}", "workflow-scheduler", f'{kwf.thread_id()}|{{"ref":"{resume.id}"}}')
    try:
        await resume
    except BaseException:
        kwf.output("0", "workflow-scheduler", f'{kwf.thread_id()}|{{"ref":"{resume.id}"}}')
        raise
    return {"type": "timeout"}


@kwf.workflow("seed-cart")
async def seed_cart(arg1: Any) -> Any:
    arg1 = arg1 if arg1 is not None else {"abandonedCartTimeoutMS": 10000}
    items: list[dict[str, Any]] = []
    email = ""
    abandoned = False
    while True:
        signal = await kwf.race([kwf.suspend("main"),
                                 _cart_timeout(arg1["abandonedCartTimeoutMS"])])
        item = signal.get("item")
        if abandoned and signal["type"] != "timeout":
            abandoned = False
        kind = signal["type"]
        if kind == "addToCart":
            existing = next((i for i in items if i["productId"] == item["productId"]), None)
            if existing is not None:
                existing["quantity"] += item["quantity"]
            else:
                items.append(item)
        elif kind == "removeFromCart":
            index = next((n for n, i in enumerate(items)
                          if i["productId"] == item["productId"]), -1)
            if index == -1:
                continue
            existing = items[index]
            existing["quantity"] -= item["quantity"]
            if existing["quantity"] <= 0:
                del items[index]
        elif kind == "timeout":
            if not email or abandoned:
                return "abondoned"
            abandoned = True
            kwf.output(email, "ecommerce-reminder")
        elif kind == "updateEmail":
            email = signal["email"]
        elif kind == "checkout":
            if email is None:
                kwf.output("Must have email to check out!", "checkoutError")
                continue
            if len(items) == 0:
                kwf.output("Must have items to check out!", "checkoutError")
                continue
            return {"items": items, "email": email}
        elif kind == "getCart":
            kwf.output_json({"items": items, "email": email}, "getCart")

"""The seed's trip-booking saga (workflow ``trip``): reserve a car, a hotel and a flight in
parallel within a deadline; on any failure, cancel what was asked for and undo what was booked.

It is the seed's ``workflow-trip-booking-saga`` line for line, with one deliberate change: the
deadline is a durable ``asyncio.sleep`` in the thread's own journal instead of a round trip
through ``workflow-scheduler``. The timer fires from the engine's state (Bytewax ``notify_at``,
virtual time in ``kwf.testing.Engine``), cancelling it costs no record (the seed wrote ``"0"``
to the scheduler), and it shows in the thread's status (``"timers"``). The observable saga is
the same: reservation and cancel records, ``workflow-result`` or ``workflow-error``.

Start: ``new:trip:{}`` or ``new:trip:{"throwAfterHotel": true}``; ``"timeoutMs"`` (default
1000, the seed's constant) changes the deadline. Each reservation writes its ref id (the seed's
value: a plain string, key = thread id) to ``saga-reserve-<kind>``; the service answers
``{"ref": <id>, "value": ...}`` (the value is ignored) or ``{"ref": <id>, "error": ...}``.

Outcomes (``workflow-error`` holds ``str`` of the error, as the seed's did):

- all three answered in time: result ``{"car": {"id": "0:1"}, "hotel": {...}, "flight": {...}}``;
- ``throwAfterHotel``: once the hotel is booked, error ``"something is wrong"``; pending
  reservations are cancelled and the booked ones (the hotel at least) compensated;
- a service answered with an error: that error; the rest cancelled or compensated;
- the deadline passed first: error ``"timeout"``; the same cancels and compensations.

Every reservation that was sent gets exactly one ``saga-cancel-<kind>`` record on failure:
from its own ``except CancelledError`` if it was still pending, from the compensations if it
had been booked.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any, Callable

import kwf

KINDS = ("car", "hotel", "flight")
TIMEOUT_MS = 1000
"""The seed's deadline for all three reservations."""

kwf.config.output_topics |= {f"saga-{op}-{kind}" for op in ("reserve", "cancel") for kind in KINDS}


class TripError(Exception):
    """The failure ``throwAfterHotel`` injects (the seed threw the string itself)."""


class TripTimeout(TimeoutError):
    """The reservations did not all answer before the deadline (the seed threw ``"timeout"``)."""


async def reserve(kind: str) -> dict[str, str]:
    """Ask the ``kind`` service for a reservation; on cancellation, withdraw the request."""
    ref = kwf.suspend()
    kwf.output(ref.id, f"saga-reserve-{kind}")
    try:
        await ref
    except asyncio.CancelledError:
        kwf.output(ref.id, f"saga-cancel-{kind}")
        raise
    return {"id": ref.id}


def cancel(kind: str, handle: dict[str, str]) -> None:
    """Compensate a booked reservation."""
    kwf.output(handle["id"], f"saga-cancel-{kind}")


async def deadline(ms: int) -> None:
    """Fail with ``"timeout"`` after ``ms`` milliseconds of logical time (a durable timer)."""
    await asyncio.sleep(ms / 1000)
    msg = "timeout"
    raise TripTimeout(msg)


@kwf.workflow("trip")
async def trip(opts: dict[str, Any] | None) -> dict[str, dict[str, str]]:
    """Book car, hotel and flight together, or none of them."""
    opts = opts or {}
    compensations: list[Callable[[], None]] = []

    async def book(kind: str, fail_after: bool = False) -> dict[str, str]:
        handle = await reserve(kind)
        compensations.append(partial(cancel, kind, handle))
        if fail_after:
            msg = "something is wrong"
            raise TripError(msg)
        return handle

    try:
        car, hotel, flight = await kwf.race([
            kwf.all([book("car"), book("hotel", bool(opts.get("throwAfterHotel"))),
                     book("flight")]),
            deadline(int(opts.get("timeoutMs", TIMEOUT_MS))),
        ])
    except BaseException:  # an error, the timeout, or the thread cancelled: undo, then re-raise
        for compensate in compensations:
            compensate()
        raise
    return {"car": car, "hotel": hotel, "flight": flight}

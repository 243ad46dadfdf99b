"""The seed's shopping cart (workflow ``cart``, from temporal-ecommerce): a long-lived thread
driven by signals on the named channel ``"main"``, with an abandonment timer that every signal
restarts.

Start with ``new:cart:{}`` or ``new:cart:{"abandonedCartTimeoutMS": 10000}`` (the seed's
option and default). Signals are resumes of the named suspend ``"main"``::

    {"ref": "main", "value": {"type": "addToCart", "item": {"productId": "p1", "quantity": 2}}}
    {"ref": "main", "value": {"type": "removeFromCart", "item": {"productId": "p1", "quantity": 1}}}
    {"ref": "main", "value": {"type": "updateEmail", "email": "ada@example.com"}}
    {"ref": "main", "value": {"type": "getCart"}}      -> {"items", "email"} to topic getCart
    {"ref": "main", "value": {"type": "checkout"}}     -> result {"items", "email"}

When no signal comes for the timeout: with an email, and not reminded since the last signal, it
writes the email to ``ecommerce-reminder`` and waits once more; otherwise it returns
``"abandoned"``. A checkout that cannot proceed writes the reason to ``checkoutError`` and the
cart goes on.

Deliberate differences from the seed, each fixing a slip of the port:

- the result of an abandoned cart is ``"abandoned"``, not the seed's ``"abondoned"``;
- checkout without an email is refused with ``"Must have email to check out!"``, as in
  temporal-ecommerce (the seed tested ``email === undefined``, which never holds, so it let an
  empty email through); the email is checked first, then the items, in the seed's order;
- ``checkoutError`` and ``getCart`` are declared output topics (the seed wrote to them without
  declaring them);
- the timer is a durable ``asyncio.timeout`` on the thread's own loop instead of
  ``workflow-scheduler`` records: no record per signal to schedule and cancel it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kwf

REMINDER_TOPIC = "ecommerce-reminder"
CHECKOUT_ERROR_TOPIC = "checkoutError"
GET_CART_TOPIC = "getCart"
DEFAULT_TIMEOUT_MS = 10_000
ABANDONED = "abandoned"

kwf.config.output_topics |= {REMINDER_TOPIC, CHECKOUT_ERROR_TOPIC, GET_CART_TOPIC}


class Cart:
    """The cart's state and the rules of each signal; plain data, no I/O."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.email = ""

    def view(self) -> dict[str, Any]:
        """What ``getCart`` and a checkout return."""
        return {"items": [dict(item) for item in self.items], "email": self.email}

    def add(self, item: dict[str, Any]) -> None:
        """Add to the quantity of the same product, or append the item."""
        for existing in self.items:
            if existing["productId"] == item["productId"]:
                existing["quantity"] += item["quantity"]
                return
        self.items.append(dict(item))

    def remove(self, item: dict[str, Any]) -> None:
        """Take from the product's quantity; drop it at zero or below; ignore unknown products."""
        for i, existing in enumerate(self.items):
            if existing["productId"] == item["productId"]:
                existing["quantity"] -= item["quantity"]
                if existing["quantity"] <= 0:
                    del self.items[i]
                return

    def checkout_error(self) -> str | None:
        """Why a checkout cannot proceed now, or None."""
        if not self.email:
            return "Must have email to check out!"
        if not self.items:
            return "Must have items to check out!"
        return None


@kwf.workflow("cart")
async def cart(arg: dict[str, Any] | None) -> Any:
    """Collect signals until checkout, or until the cart is abandoned."""
    timeout = float((arg or {}).get("abandonedCartTimeoutMS", DEFAULT_TIMEOUT_MS)) / 1000
    state = Cart()
    reminded = False
    while True:
        try:
            async with asyncio.timeout(timeout):
                signal = await kwf.suspend("main")
        except TimeoutError:
            if not state.email or reminded:
                return ABANDONED
            reminded = True
            kwf.output(state.email, REMINDER_TOPIC)
            continue
        reminded = False
        kind = signal.get("type") if isinstance(signal, dict) else None
        if kind == "addToCart":
            state.add(signal["item"])
        elif kind == "removeFromCart":
            state.remove(signal["item"])
        elif kind == "updateEmail":
            state.email = signal["email"]
        elif kind == "getCart":
            kwf.output_json(state.view(), GET_CART_TOPIC)
        elif kind == "checkout":
            error = state.checkout_error()
            if error is None:
                return state.view()
            kwf.output(error, CHECKOUT_ERROR_TOPIC)

"""A customer account (workflow ``account``): one thread per customer, running for ever.

The point is living long. The thread handles operations as signals on the named channel
``"ops"`` and sends a statement every 30 days on a durable timer, for as long as the customer
exists; its journal would grow without end, so every ``continueEvery`` events (default 500) it
calls ``kwf.continue_as_new`` with its state, and the thread goes on under the same id with a
fresh journal. What must survive the new run is in that state: the balance, the counters, the
next statement's due time (the timer itself is dropped with the old run and armed again).

Start: ``new:account:{"customer": "c1"}`` with optional ``"balance"`` (0) and
``"continueEvery"`` (500). An operation is ``{"ref": "ops", "value": {"op": "deposit" |
"withdraw" | "close", "amount": 10}}``.

Records written, JSON with key = thread id:

- ``account-ledger``: ``{"customer", "op", "amount", "balance", "n", "run"}`` per operation
  applied (``n`` counts operations over the account's life, ``run`` its runs), or ``{"op":
  "refused", "reason", ...}`` for a withdrawal over the balance or a malformed operation;
- ``account-statement``: ``{"customer", "balance", "n", "at"}`` every 30 days.

``close`` ends the thread with ``{"customer", "balance", "n", "runs"}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kwf

LEDGER_TOPIC = "account-ledger"
STATEMENT_TOPIC = "account-statement"
CHANNEL = "ops"
STATEMENT_EVERY_S = 30 * 24 * 3600.0

kwf.config.output_topics |= {LEDGER_TOPIC, STATEMENT_TOPIC}


async def next_op(until: float) -> Any:
    """The next operation, or None once logical time reaches ``until`` (the statement)."""
    try:
        async with asyncio.timeout_at(until):
            return await kwf.suspend(CHANNEL)
    except TimeoutError:
        return None


def apply(state: dict[str, Any], op: Any) -> str | None:
    """Apply one operation to ``state``; the reason when it is refused."""
    if not isinstance(op, dict) or op.get("op") not in ("deposit", "withdraw", "close"):
        return "unknown operation"
    if op["op"] == "close":
        return None
    amount = op.get("amount")
    if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
        return "amount must be a positive number"
    if op["op"] == "withdraw" and amount > state["balance"]:
        return "insufficient funds"
    state["balance"] += amount if op["op"] == "deposit" else -amount
    return None


@kwf.workflow("account")
async def account(arg: dict[str, Any] | None) -> dict[str, Any]:
    """Apply operations and send statements for ever, continuing as new every so many events."""
    arg = arg or {}
    state = {"customer": str(arg.get("customer", kwf.thread_id())),
             "balance": arg.get("balance", 0), "n": int(arg.get("n", 0)),
             "run": int(arg.get("run", 0)) + 1,
             "continueEvery": int(arg.get("continueEvery", 500)),
             "nextStatement": float(arg.get("nextStatement")
                                    or kwf.now().timestamp() + STATEMENT_EVERY_S)}
    while True:
        if kwf.journal_length() >= state["continueEvery"]:
            kwf.continue_as_new(state)
        op = await next_op(state["nextStatement"])
        if op is None:
            kwf.output_json({"customer": state["customer"], "balance": state["balance"],
                             "n": state["n"], "at": state["nextStatement"]}, STATEMENT_TOPIC)
            state["nextStatement"] += STATEMENT_EVERY_S
            continue
        refused = apply(state, op)
        entry = {"customer": state["customer"], "op": op.get("op") if isinstance(op, dict) else None,
                 "amount": op.get("amount") if isinstance(op, dict) else None,
                 "balance": state["balance"], "n": state["n"], "run": state["run"]}
        if refused is not None:
            kwf.output_json({**entry, "op": "refused", "reason": refused}, LEDGER_TOPIC)
            continue
        state["n"] += 1
        kwf.output_json({**entry, "n": state["n"]}, LEDGER_TOPIC)
        if op["op"] == "close":
            return {"customer": state["customer"], "balance": state["balance"],
                    "n": state["n"], "runs": state["run"]}

"""A human approval (workflow ``approval``): ask, wait days, remind, escalate, decide or expire.

The point is time: the thread waits for days on durable timers (they survive restarts, cost
nothing while waiting, and run on virtual time in ``kwf.testing.Engine``, where a test passes a
week in a millisecond), and a person's decision arrives as a signal on the named channel
``"decision"`` whenever it comes.

Start: ``new:approval:{"subject": "laptop", "approver": "alice", "escalateTo": "bob"}`` with
optional ``"remindAfterS"`` (default 2 days), ``"escalateAfterS"`` (5 days) and
``"expireAfterS"`` (14 days), all counted from the start.

Records written, each JSON with key = thread id:

- ``approval-request``: ``{"type": "request", "ref": "decision", "approver", "subject"}`` at
  the start; ``{"type": "withdrawn", ...}`` when the thread is cancelled;
- ``approval-reminder``: ``{"type": "reminder", "ref": "decision", "approver", "subject"}``;
- ``approval-escalation``: ``{"type": "request", "ref": "decision", "approver": <escalateTo>,
  ...}``; from then on either person may decide.

A decision is ``{"ref": "decision", "value": {"approved": true, "by": "alice", "comment": ...}}``;
one from anybody else (``"by"`` not yet entitled) is ignored and the wait goes on. Result:
``{"status": "approved" | "rejected" | "expired", "by", "comment", "escalated", "after"}``, where
``"after"`` is seconds since the request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kwf

REQUEST_TOPIC = "approval-request"
REMINDER_TOPIC = "approval-reminder"
ESCALATION_TOPIC = "approval-escalation"
DAY = 24 * 3600.0
CHANNEL = "decision"

kwf.config.output_topics |= {REQUEST_TOPIC, REMINDER_TOPIC, ESCALATION_TOPIC}


def _now() -> float:
    return kwf.now().timestamp()


async def next_decision(until: float) -> Any:
    """The next signal on ``"decision"``, or None once logical time reaches ``until``."""
    try:
        async with asyncio.timeout_at(until):
            return await kwf.suspend(CHANNEL)
    except TimeoutError:
        return None


@kwf.workflow("approval")
async def approval(arg: dict[str, Any] | None) -> dict[str, Any]:
    """Wait for an entitled person's decision, reminding and escalating on schedule."""
    arg = arg or {}
    subject = arg.get("subject", "")
    approver, escalate_to = str(arg.get("approver", "approver")), arg.get("escalateTo")
    entitled = {approver}
    start = _now()

    def notice(kind: str, person: str) -> dict[str, Any]:
        return {"type": kind, "ref": CHANNEL, "approver": person, "subject": subject}

    def remind() -> None:
        kwf.output_json(notice("reminder", approver), REMINDER_TOPIC)

    def escalate() -> None:
        if escalate_to:
            entitled.add(str(escalate_to))
            kwf.output_json(notice("request", str(escalate_to)), ESCALATION_TOPIC)

    # All three count from the start, so they run in time order (a stable sort: on a tie the
    # reminder comes first, the expiry last); reaching the expiry ends the wait, whatever is left.
    phases = sorted((
        (float(arg.get("remindAfterS", 2 * DAY)), remind),
        (float(arg.get("escalateAfterS", 5 * DAY)), escalate),
        (float(arg.get("expireAfterS", 14 * DAY)), None),
    ), key=lambda phase: phase[0])
    kwf.output_json(notice("request", approver), REQUEST_TOPIC)
    try:
        for after, action in phases:
            while (decision := await next_decision(start + after)) is not None:
                by = decision.get("by") if isinstance(decision, dict) else None
                if by in entitled:
                    return {"status": "approved" if decision.get("approved") else "rejected",
                            "by": by, "comment": decision.get("comment", ""),
                            "escalated": len(entitled) > 1, "after": _now() - start}
            if action is None:
                break
            action()
    except asyncio.CancelledError:
        kwf.output_json(notice("withdrawn", approver), REQUEST_TOPIC)
        raise
    return {"status": "expired", "by": None, "comment": "", "escalated": len(entitled) > 1,
            "after": _now() - start}

"""The approval example: reminder, escalation and expiry all count from the start (issue 11, item 6)."""

from __future__ import annotations

import json

from workflows import approval

DAY = approval.DAY


def start(eng, **options):
    arg = {"subject": "laptop", "approver": "alice", "escalateTo": "bob", **options}
    eng.send("a1", "new:approval:" + json.dumps(arg))


def test_an_expiry_shorter_than_the_reminder_expires_at_its_own_time(make_engine):
    eng = make_engine(approval.approval)
    start(eng, expireAfterS=DAY)
    eng.advance(30 * DAY)
    assert eng.result("a1") == {"status": "expired", "by": None, "comment": "",
                                "escalated": False, "after": DAY}
    assert eng.outputs("approval-reminder") == eng.outputs("approval-escalation") == []


def test_an_expiry_between_reminder_and_escalation_reminds_then_expires(make_engine):
    eng = make_engine(approval.approval)
    start(eng, remindAfterS=DAY, escalateAfterS=5 * DAY, expireAfterS=3 * DAY)
    eng.advance(30 * DAY)
    assert [r.json()["type"] for r in eng.outputs("approval-reminder")] == ["reminder"]
    assert eng.outputs("approval-escalation") == []
    assert eng.result("a1")["after"] == 3 * DAY


def test_an_escalation_before_the_reminder_escalates_first(make_engine):
    eng = make_engine(approval.approval)
    start(eng, remindAfterS=4 * DAY, escalateAfterS=DAY)
    eng.advance(2 * DAY)
    assert len(eng.outputs("approval-escalation")) == 1 and eng.outputs("approval-reminder") == []
    eng.send("a1", json.dumps({"ref": "decision", "value": {"approved": False, "by": "bob"}}))
    assert eng.result("a1")["status"] == "rejected"
    assert eng.outputs("approval-reminder") == []

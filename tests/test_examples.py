"""The example workflows on virtual time, answered by the demo services' own rules.

Every test runs twice (``make_engine``): with live instances, and with every thread rebuilt by
replay before each event, so the examples are also checked for determinism.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from kwf_support import values

from kwf.testing import Engine
from workflows import approval, ecommerce, order, trip_booking
from workflows._services import Behaviour, Services

DAY = approval.DAY
SILENT_ALWAYS = Behaviour(silent=1.0)


def serve(eng: Engine, services: Services, *topics: str) -> None:
    """Answer ``topics`` (all the demo services' topics if none) with the services' rules."""
    handlers = services.handlers()
    for topic in topics or handlers:
        eng.handle(topic, handlers[topic])


def cancels(eng: Engine, thread: str) -> Counter[tuple[str, str]]:
    """``(kind, ref)`` of every saga cancel record the thread wrote."""
    return Counter((r.topic.rsplit("-", 1)[1], r.value) for r in eng.outputs()
                   if r.topic.startswith("saga-cancel-") and r.key == thread)


def error_of(eng: Engine, thread: str) -> tuple[Any, str | None]:
    """The thread's ``workflow-error`` text and ``kwf-error-type``."""
    [rec] = [r for r in eng.outputs("workflow-error") if r.key == thread]
    return rec.json(), rec.header("kwf-error-type")


# -- trip-booking saga ---------------------------------------------------------------------------
ALL_THREE = Counter({("car", "0:1"): 1, ("hotel", "0:2"): 1, ("flight", "0:3"): 1})


def test_trip_all_reserved_returns_the_ids_and_cancels_nothing(make_engine):
    eng = make_engine(trip_booking.trip)
    serve(eng, Services())
    eng.send("t1", "new:{}")
    assert values(eng, "saga-reserve-car") == ["0:1"]
    assert eng.result("t1") == {"car": {"id": "0:1"}, "hotel": {"id": "0:2"},
                                "flight": {"id": "0:3"}}
    assert cancels(eng, "t1") == Counter()
    eng.advance(5)
    assert eng.outputs("workflow-error") == []


def test_trip_throw_after_hotel_cancels_every_reservation_once(make_engine):
    """The seed's throwAfterHotel: pending ones withdraw themselves, booked ones are compensated."""
    eng = make_engine(trip_booking.trip)
    serve(eng, Services())
    eng.send("t1", 'new:{"throwAfterHotel": true}')
    assert error_of(eng, "t1") == ("something is wrong", "TripError")
    assert cancels(eng, "t1") == ALL_THREE
    assert eng.status("t1")["status"] == "failed"


def test_trip_error_reply_fails_with_it_and_compensates(make_engine):
    eng = make_engine(trip_booking.trip)
    serve(eng, Services(by_topic={"saga-reserve-hotel": Behaviour(fail=1.0)}))
    eng.send("t1", "new:{}")
    assert error_of(eng, "t1") == ("no hotel available", "RemoteError")
    assert cancels(eng, "t1") == Counter({("car", "0:1"): 1, ("flight", "0:3"): 1})


def test_trip_timeout_after_one_second_cancels_and_compensates(make_engine):
    eng = make_engine(trip_booking.trip)
    serve(eng, Services(by_topic={"saga-reserve-flight": SILENT_ALWAYS}))
    eng.send("t1", "new:{}", timestamp=100.0)
    assert eng.status("t1")["timers"] == [101.0]
    assert eng.status("t1")["pending"] == ["0:3"]
    eng.advance(0.999)
    assert eng.outputs("workflow-error") == []
    eng.advance(0.001)
    assert error_of(eng, "t1") == ("timeout", "TripTimeout")
    assert cancels(eng, "t1") == ALL_THREE
    assert all(r.timestamp == 101.0 for r in eng.outputs() if r.topic.startswith("saga-cancel"))
    assert eng.send("t1", '{"ref": "0:3", "value": "late"}') == []  # the late reply is ignored


def test_trip_timeout_option_moves_the_deadline(make_engine):
    eng = make_engine(trip_booking.trip)
    eng.send("t1", 'new:{"timeoutMs": 30000}')
    assert eng.status("t1")["timers"] == [30.0]


def test_trip_cancelled_thread_withdraws_and_compensates_without_error(make_engine):
    eng = make_engine(trip_booking.trip)
    eng.send("t1", "new:{}")
    eng.send("t1", '{"ref": "0:2", "value": {}}')
    eng.send("t1", "cancel:")
    assert cancels(eng, "t1") == ALL_THREE
    assert eng.status("t1")["status"] == "cancelled"
    assert eng.outputs("workflow-error") == eng.outputs("workflow-result") == []


# -- shopping cart ----------------------------------------------------------------------------
def signal(eng: Engine, thread: str, type_: str, **fields: Any) -> None:
    eng.send(thread, json.dumps({"ref": "main", "value": {"type": type_, **fields}}))


def item(product: str, quantity: int) -> dict[str, Any]:
    return {"productId": product, "quantity": quantity}


def test_cart_signals_update_the_cart_and_checkout_returns_it(make_engine):
    eng = make_engine(ecommerce.cart)
    eng.send("c1", "new:{}")
    signal(eng, "c1", "addToCart", item=item("p1", 2))
    signal(eng, "c1", "addToCart", item=item("p2", 1))
    signal(eng, "c1", "addToCart", item=item("p1", 1))
    signal(eng, "c1", "removeFromCart", item=item("p2", 5))
    signal(eng, "c1", "removeFromCart", item=item("nope", 1))
    signal(eng, "c1", "getCart")
    assert [r.json() for r in eng.outputs("getCart")] == [{"items": [item("p1", 3)], "email": ""}]
    signal(eng, "c1", "checkout")
    assert values(eng, "checkoutError") == ["Must have email to check out!"]
    signal(eng, "c1", "updateEmail", email="ada@example.com")
    signal(eng, "c1", "checkout")
    assert eng.result("c1") == {"items": [item("p1", 3)], "email": "ada@example.com"}


def test_cart_checkout_without_items_is_refused_and_the_cart_goes_on(make_engine):
    eng = make_engine(ecommerce.cart)
    eng.send("c1", "new:{}")
    signal(eng, "c1", "updateEmail", email="ada@example.com")
    signal(eng, "c1", "checkout")
    assert values(eng, "checkoutError") == ["Must have items to check out!"]
    assert eng.status("c1")["status"] == "running"


def test_cart_reminds_once_then_is_abandoned(make_engine):
    eng = make_engine(ecommerce.cart)
    eng.send("c1", 'new:{"abandonedCartTimeoutMS": 10000}')
    signal(eng, "c1", "updateEmail", email="ada@example.com")
    eng.advance(10)
    assert values(eng, "ecommerce-reminder") == ["ada@example.com"]
    assert eng.outputs("ecommerce-reminder")[0].timestamp == 10.0
    eng.advance(9.9)
    assert eng.outputs("workflow-result") == []
    eng.advance(0.1)
    assert eng.result("c1") == "abandoned"
    assert values(eng, "ecommerce-reminder") == ["ada@example.com"]


def test_cart_without_email_is_abandoned_without_reminder(make_engine):
    eng = make_engine(ecommerce.cart)
    eng.send("c1", "new:{}")
    signal(eng, "c1", "addToCart", item=item("p1", 1))
    eng.advance(10)
    assert eng.result("c1") == "abandoned"
    assert eng.outputs("ecommerce-reminder") == []


def test_cart_every_signal_restarts_the_abandonment_clock(make_engine):
    eng = make_engine(ecommerce.cart)
    eng.send("c1", "new:{}")
    for t in (9, 18, 27, 36):
        eng.advance_to(t)
        signal(eng, "c1", "updateEmail", email=f"a{t}@example.com")
    assert eng.outputs("ecommerce-reminder") == []
    assert eng.status("c1")["timers"] == [46.0]
    eng.advance_to(46)
    signal(eng, "c1", "getCart")          # after a reminder, a signal re-arms it
    eng.advance_to(56)
    assert values(eng, "ecommerce-reminder") == ["a36@example.com"] * 2
    assert eng.status("c1")["status"] == "running"


def test_cart_reminded_shopper_comes_back_and_checks_out(make_engine):
    eng = make_engine(ecommerce.cart)
    serve(eng, Services(), "ecommerce-reminder")
    eng.send("c1", "new:{}")
    signal(eng, "c1", "addToCart", item=item("p1", 1))
    signal(eng, "c1", "updateEmail", email="ada@example.com")
    eng.advance(10)
    assert eng.result("c1") == {"items": [item("p1", 1)], "email": "ada@example.com"}


# -- order with kwf.call ------------------------------------------------------------------------
ORDER = {"orderId": "o1", "amount": 30, "items": [{"sku": "p1", "qty": 2}], "address": "Main St"}


def start_order(eng: Engine, **extra: Any) -> None:
    eng.send("o1", "new:order:" + json.dumps({**ORDER, **extra}))


def test_order_pays_reserves_ships(make_engine):
    eng = make_engine(order.order)
    serve(eng, Services())
    start_order(eng)
    result = eng.result("o1")
    assert result["status"] == "shipped"
    assert result["payment"]["amount"] == 30
    assert set(result) == {"orderId", "status", "payment", "inventory", "shipping"}
    [pay] = eng.outputs("order-payment")
    assert pay.json() == {"ref": "0:1", "key": "o1/payment", "attempt": 1,
                          "payload": {"orderId": "o1", "amount": 30}}
    assert not [r for r in eng.outputs() if r.topic.endswith("-cancel")]


def test_order_retries_with_backoff_and_keeps_the_key(make_engine):
    """An "unavailable" reply and a silence are retried, after ~1 s then ~2 s (20 % jitter)."""
    eng = make_engine(order.order)
    answers = iter([{"error": "unavailable"}, None, {"value": {"paymentId": "p"}}])

    def flaky_payment(rec: Any) -> Any:
        answer = next(answers)
        return None if answer is None else {"ref": rec.json()["ref"], **answer}

    eng.handle("order-payment", flaky_payment)
    serve(eng, Services(), "order-inventory", "order-shipping")
    start_order(eng)
    eng.advance(60)
    attempts = eng.outputs("order-payment")
    assert [r.json()["attempt"] for r in attempts] == [1, 2, 3]
    assert {r.json()["key"] for r in attempts} == {"o1/payment"}
    assert len({r.json()["ref"] for r in attempts}) == 3
    t1, t2, t3 = (r.timestamp for r in attempts)
    assert 0.8 <= t2 - t1 <= 1.0
    assert 5 + 1.6 <= t3 - t2 <= 5 + 2.0
    assert eng.result("o1")["payment"] == {"paymentId": "p"}
    stale = json.dumps({"ref": attempts[1].json()["ref"], "value": "late"})
    assert eng.send("o1", stale) == []


def test_order_refusal_is_not_retried_and_earlier_steps_are_undone(make_engine):
    eng = make_engine(order.order)
    serve(eng, Services(by_topic={"order-inventory": Behaviour(fail=1.0)}))
    start_order(eng)
    assert error_of(eng, "o1") == ("out of stock", "RemoteError")
    assert len(eng.outputs("order-inventory")) == 1
    assert [r.json() for r in eng.outputs("order-payment-cancel")] == [{"key": "o1/payment"}]
    assert eng.outputs("order-shipping") == []


def test_order_gives_up_after_retries_and_compensates_in_reverse(make_engine):
    eng = make_engine(order.order)
    serve(eng, Services(by_topic={"order-shipping": SILENT_ALWAYS}))
    start_order(eng, retries=2, timeoutS=3, backoffS=0.5)
    eng.advance(3600)
    text, kind = error_of(eng, "o1")
    assert kind == "CallTimeout"
    assert "'order-shipping'" in text and "attempt 3 of 3" in text and "o1/shipping" in text
    assert len(eng.outputs("order-shipping")) == 3
    undo = [(r.topic, r.json()) for r in eng.outputs() if r.topic.endswith("-cancel")]
    last_ref = eng.outputs("order-shipping")[-1].json()["ref"]
    assert undo == [("order-shipping-cancel", {"ref": last_ref, "key": "o1/shipping"}),
                    ("order-inventory-cancel", {"key": "o1/inventory"}),
                    ("order-payment-cancel", {"key": "o1/payment"})]


def test_order_cancelled_during_a_call_withdraws_it(make_engine):
    eng = make_engine(order.order)
    start_order(eng)
    eng.send("o1", "cancel:")
    assert [r.json() for r in eng.outputs("order-payment-cancel")] == [
        {"ref": "0:1", "key": "o1/payment"}]
    assert eng.status("o1")["status"] == "cancelled"


def test_order_outcomes_follow_the_services_draws():
    """Many orders on hashed flaky services: each ends shipped or failed with its steps undone."""
    eng = Engine(workflows=[order.order])
    serve(eng, Services(Behaviour(fail=0.05, flaky=0.3, silent=0.1)))
    for i in range(40):
        eng.send(f"o{i}", "new:order:" + json.dumps({**ORDER, "orderId": f"o{i}"}))
    eng.advance(3600)
    outcomes = Counter(eng.status(f"o{i}")["status"] for i in range(40))
    assert outcomes["running"] == 0 and outcomes["completed"] > 20
    steps = [name for name, _ in order.STEPS]
    for i in range(40):
        mine = [r for r in eng.outputs() if r.key == f"o{i}"]
        asked = [r.topic.split("-")[1] for r in mine if r.topic in dict(order.STEPS).values()]
        undone = [r.json()["key"].split("/")[1] for r in mine
                  if r.topic.endswith("-cancel") and "ref" not in r.json()]
        if eng.status(f"o{i}")["status"] == "completed":
            assert undone == []
        else:  # the steps before the one that failed, newest first
            failed_at = steps.index(asked[-1])
            assert undone == steps[:failed_at][::-1]


# -- approval ------------------------------------------------------------------------------------
APPROVAL = {"subject": "laptop", "approver": "alice", "escalateTo": "bob"}


def decide(eng: Engine, by: str, approved: bool = True, *, at: float | None = None) -> None:
    eng.send("a1", json.dumps({"ref": "decision", "value": {"approved": approved, "by": by}}),
             timestamp=at)


def test_approval_decided_before_any_reminder(make_engine):
    eng = make_engine(approval.approval)
    eng.send("a1", "new:approval:" + json.dumps(APPROVAL))
    assert [r.json() for r in eng.outputs("approval-request")] == [
        {"type": "request", "ref": "decision", "approver": "alice", "subject": "laptop"}]
    decide(eng, "alice", at=DAY)
    assert eng.result("a1") == {"status": "approved", "by": "alice", "comment": "",
                                "escalated": False, "after": DAY}
    assert eng.outputs("approval-reminder") == []


def test_approval_reminds_escalates_and_takes_the_escalated_decision(make_engine):
    eng = make_engine(approval.approval)
    eng.send("a1", "new:approval:" + json.dumps(APPROVAL))
    eng.advance(2 * DAY)
    assert [r.json()["type"] for r in eng.outputs("approval-reminder")] == ["reminder"]
    decide(eng, "bob", at=3 * DAY)                  # not entitled yet: ignored
    assert eng.status("a1")["status"] == "running"
    eng.advance_to(5 * DAY)
    assert [r.json()["approver"] for r in eng.outputs("approval-escalation")] == ["bob"]
    decide(eng, "bob", approved=False, at=6 * DAY)
    assert eng.result("a1") == {"status": "rejected", "by": "bob", "comment": "",
                                "escalated": True, "after": 6 * DAY}


def test_approval_expires_after_two_weeks(make_engine):
    eng = make_engine(approval.approval)
    eng.send("a1", "new:approval:" + json.dumps(APPROVAL))
    eng.advance(14 * DAY - 1)
    assert eng.status("a1")["timers"] == [14 * DAY]
    eng.advance(1)
    assert eng.result("a1")["status"] == "expired"
    assert len(eng.outputs("approval-reminder")) == len(eng.outputs("approval-escalation")) == 1


def test_approval_cancel_withdraws_the_request(make_engine):
    eng = make_engine(approval.approval)
    eng.send("a1", "new:approval:" + json.dumps(APPROVAL))
    eng.send("a1", "cancel:", timestamp=DAY)
    assert [r.json()["type"] for r in eng.outputs("approval-request")] == ["request", "withdrawn"]
    assert eng.status("a1")["status"] == "cancelled"


def test_approval_with_services_silent_approver_is_escalated():
    eng = Engine(workflows=[approval.approval])
    serve(eng, Services(by_topic={"approval-request": SILENT_ALWAYS,
                                  "approval-reminder": SILENT_ALWAYS}))
    eng.send("a1", "new:approval:" + json.dumps(APPROVAL))
    eng.advance(30 * DAY)
    result = eng.result("a1")
    assert (result["by"], result["escalated"], result["after"]) == ("bob", True, 5 * DAY)


@pytest.mark.parametrize("seed", ["a", "b"])
def test_demo_services_draws_are_stable_per_thread(seed):
    behaviour = Behaviour(fail=0.2, flaky=0.2, silent=0.2, seed=seed)
    first = [behaviour.outcome("svc", f"t{i}", 1) for i in range(200)]
    assert first == [behaviour.outcome("svc", f"t{i}", 1) for i in range(200)]
    counts = Counter(first)
    assert 20 <= counts["fail"] <= 60 and 50 <= counts["ok"] <= 120

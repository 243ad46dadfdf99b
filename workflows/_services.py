"""Demo services for the example workflows: car, hotel, flight, payment, inventory, shipping,
approvers and returning shoppers, as answer functions ``fn(record) -> resume | None``.

Each rule is written once, as a function of the request record, and used in two places:
``kwf.testing.Engine.handle(topic, fn)`` in tests (virtual time, no Kafka), and
``workflows._kafka_services.ServiceRunner``, which consumes the request topics and produces the
answers to ``workflow-resume`` after a latency. Outcomes are drawn by hashing (seed, service,
thread, attempt), never from a shared random generator, so every run, test or demo, gives each
thread the same fate and a test can tell in advance which threads fail.

This module is private (leading underscore) because ``kwf.registry.load_modules("workflows")``
imports every public module of the package into the engine, and services are not workflows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from kwf.protocol import Record
from workflows import approval, ecommerce, order, trip_booking

Answer = dict[str, Any]
Handler = Callable[[Record], "Answer | None"]

OK, FAIL, FLAKY, SILENT = "ok", "fail", "flaky", "silent"


@dataclass(frozen=True)
class Behaviour:
    """How a demo service answers, as rates in [0, 1] and a latency.

    ``fail`` is decided once per thread (a declined card stays declined); ``flaky``
    (a transient ``"unavailable"`` error) and ``silent`` (no answer: the caller's timeout fires)
    are drawn again for each attempt, so retries can succeed.
    """

    fail: float = 0.0
    flaky: float = 0.0
    silent: float = 0.0
    latency: float = 0.02
    """Mean seconds before answering (the Kafka runner only; spread 0.5x..1.5x per request)."""
    seed: str = "kwf-demo"

    def draw(self, *parts: object) -> float:
        """A number in [0, 1) fixed by ``parts`` and the seed."""
        digest = hashlib.sha256("\0".join(map(str, (self.seed, *parts))).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def outcome(self, service: str, thread: str, attempt: object = 1) -> str:
        """``ok``, ``fail``, ``flaky`` or ``silent`` for this request."""
        if self.draw(service, thread, "fail") < self.fail:
            return FAIL
        u = self.draw(service, thread, attempt)
        if u < self.flaky:
            return FLAKY
        if u < self.flaky + self.silent:
            return SILENT
        return OK

    def delay(self, service: str, thread: str, attempt: object = 1) -> float:
        """Seconds to wait before answering this request."""
        return self.latency * (0.5 + self.draw(service, thread, attempt, "latency"))


def thread_of(rec: Record) -> str:
    """The thread that wrote a record: header ``kwf-thread``, else the key."""
    key = rec.header("kwf-thread") or rec.key
    return key.decode() if isinstance(key, bytes) else str(key)


def _text(rec: Record) -> str:
    return rec.value.decode() if isinstance(rec.value, bytes) else str(rec.value)


def _token(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8]


def reservation_service(kind: str, behaviour: Behaviour) -> Handler:
    """The saga's ``saga-reserve-<kind>`` service: the request value is the ref id itself."""
    service = f"saga-reserve-{kind}"

    def answer(rec: Record) -> Answer | None:
        thread, ref = thread_of(rec), _text(rec)
        fate = behaviour.outcome(service, thread)  # not by ref: ids are Kafka offsets
        if fate == SILENT:
            return None
        if fate in (FAIL, FLAKY):
            return {"ref": ref, "error": f"no {kind} available"}
        return {"ref": ref, "value": {"reservation": f"{kind}-{_token(thread, ref)}"}}

    return answer


def call_service(service: str, refusal: str, value: Callable[[dict[str, Any]], Any],
                 behaviour: Behaviour) -> Handler:
    """A ``kwf.call`` service: answers ``{"ref", "key", "attempt", "payload"}`` requests.

    ``refusal`` is its final error; transient failures answer ``"unavailable"``.
    """

    def answer(rec: Record) -> Answer | None:
        request = json.loads(_text(rec))
        ref, thread = request["ref"], thread_of(rec)
        fate = behaviour.outcome(service, thread, request.get("attempt", 1))
        if fate == SILENT:
            return None
        if fate == FAIL:
            return {"ref": ref, "error": refusal}
        if fate == FLAKY:
            return {"ref": ref, "error": order.TRANSIENT}
        return {"ref": ref, "value": value(request)}

    return answer


def person_service(service: str, behaviour: Behaviour, *, yes: Answer | None = None) -> Handler:
    """A person reading notices: approves (``ok``), rejects (``fail``) or ignores (``silent``).

    With ``yes`` the answer to ``ok`` is that signal instead (a shopper who comes back after a
    reminder and checks out); ``fail`` is then ignored as well.
    """

    def answer(rec: Record) -> Answer | None:
        thread = thread_of(rec)
        try:
            notice = json.loads(_text(rec))
        except ValueError:
            notice = {}
        if isinstance(notice, dict) and notice.get("type") == "withdrawn":
            return None
        fate = behaviour.outcome(service, thread, rec.header("kwf-seq") or 1)
        if fate in (SILENT, FLAKY) or (yes is not None and fate == FAIL):
            return None
        if yes is not None:
            return yes
        by = notice.get("approver", "?") if isinstance(notice, dict) else "?"
        return {"ref": approval.CHANNEL, "value": {"approved": fate == OK, "by": by,
                                                  "comment": f"decided by the {service} service"}}

    return answer


@dataclass(frozen=True)
class Services:
    """The behaviour of every demo service; ``handlers()`` gives topic -> answer function."""

    default: Behaviour = Behaviour()
    by_topic: Mapping[str, Behaviour] = field(default_factory=dict)

    def behaviour(self, topic: str) -> Behaviour:
        return self.by_topic.get(topic, self.default)

    def delay(self, rec: Record) -> float:
        """Seconds the service of ``rec.topic`` waits before answering it (Kafka runner only)."""
        return self.behaviour(rec.topic).delay(rec.topic, thread_of(rec), rec.header("kwf-seq"))

    def handlers(self) -> dict[str, Handler]:
        """Every request topic of the example workflows and the function answering it."""
        b = self.behaviour
        handlers: dict[str, Handler] = {}
        for kind in trip_booking.KINDS:
            topic = f"saga-reserve-{kind}"
            handlers[topic] = reservation_service(kind, b(topic))
        refusals = {order.PAYMENT: "card declined", order.INVENTORY: "out of stock",
                    order.SHIPPING: "address not deliverable"}
        values: dict[str, Callable[[dict[str, Any]], Any]] = {
            order.PAYMENT: lambda r: {"paymentId": f"pay-{_token(r['key'])}",
                                      "amount": r["payload"].get("amount")},
            order.INVENTORY: lambda r: {"reservationId": f"inv-{_token(r['key'])}"},
            order.SHIPPING: lambda r: {"trackingNo": f"ship-{_token(r['key'])}"},
        }
        for topic, refusal in refusals.items():
            handlers[topic] = call_service(topic, refusal, values[topic], b(topic))
        for topic in (approval.REQUEST_TOPIC, approval.REMINDER_TOPIC, approval.ESCALATION_TOPIC):
            handlers[topic] = person_service(topic, b(topic))
        handlers[ecommerce.REMINDER_TOPIC] = person_service(
            ecommerce.REMINDER_TOPIC, b(ecommerce.REMINDER_TOPIC),
            yes={"ref": "main", "value": {"type": "checkout"}})
        return handlers


def demo_services(rate: float = 0.05, latency: float = 0.02, seed: str = "kwf-demo") -> Services:
    """Behaviours for ``kwf demo``: a few refusals, flaky answers and silences everywhere.

    Approvers ignore most first requests (so reminders and escalations happen), escalation
    approvers always answer, and half the reminded shoppers come back to check out.
    """
    common = Behaviour(fail=rate, flaky=rate, silent=rate, latency=latency, seed=seed)
    return Services(common, {
        approval.REQUEST_TOPIC: Behaviour(fail=0.2, silent=0.6, latency=latency, seed=seed),
        approval.REMINDER_TOPIC: Behaviour(fail=0.2, silent=0.5, latency=latency, seed=seed),
        approval.ESCALATION_TOPIC: Behaviour(fail=0.3, latency=latency, seed=seed),
        ecommerce.REMINDER_TOPIC: Behaviour(silent=0.5, latency=latency, seed=seed),
    })


def main(argv: list[str] | None = None) -> None:
    """Serve the demo services until interrupted: ``python -m workflows._services``.

    For ``kwf demo --external-services`` (services in another process or machine); the
    broker and topic names come from ``KWF_*`` as for the engine.
    """
    import argparse
    import time

    import structlog

    from kwf.config import Settings
    from kwf.service import ServiceRunner

    parser = argparse.ArgumentParser(prog="python -m workflows._services", description=main.__doc__)
    parser.add_argument("--fail-rate", type=float, default=0.05)
    parser.add_argument("--latency", type=float, default=0.02)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    services = demo_services(args.fail_rate, args.latency)
    log = structlog.get_logger("workflows.services")
    with ServiceRunner(settings.kafka_config(), services.handlers(), settings.resume_topic,
                       delay=services.delay) as runner:
        try:
            while True:
                time.sleep(10)
                log.info("services", seen=runner.seen, answered=runner.answered)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

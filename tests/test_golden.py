"""Golden journals: threads of the example workflows, recorded mid-flight, must still replay.

A journal written by yesterday's code is what a running engine holds for every thread in
flight. If a change to ``workflows/`` makes one of these fail, threads in production would be
parked as failed on their next event: deploy the change under a new workflow name instead, or,
if no thread of the old version can be in flight, record new goldens with
``python tests/test_golden.py`` (and say why in the commit).
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from kwf.config import Settings
from kwf.instance import Instance
from kwf.journal import FORMAT, Journal
from kwf.registry import get, load_modules

GOLDEN = Path(__file__).parent / "golden"
load_modules(["workflows"])  # at import, as the engine does: their topics are declared then
SCRIPTS: dict[str, list[tuple[str, Any]]] = {
    # thread: [("send" | "other", value) | ("advance", seconds)], stopping while the thread is
    # in flight; "other" sends to another thread, shifting this thread's offsets
    "golden-trip": [("send", 'new:trip:{"timeoutMs": 5000}'), ("send", '{"ref": "0:2", "value": 1}'),
                    ("send", '{"ref": "0:1", "value": 2}')],
    # another thread's record first: this thread's records sit at offsets 1 and 2
    "golden-trip-failing": [("other", 'new:trip:{}'), ("send", 'new:trip:{"throwAfterHotel": true}'),
                            ("send", '{"ref": "1:1", "value": 1}'), ("advance", 0.5)],
    "golden-cart": [("send", 'new:cart:{"abandonedCartTimeoutMS": 2000}'),
                    ("send", '{"ref": "main", "value": {"type": "addToCart", "item": '
                             '{"productId": "p1", "quantity": 2}}}'),
                    ("send", '{"ref": "main", "value": {"type": "updateEmail", "email": "a@b.c"}}'),
                    ("advance", 2.5)],
    "golden-order": [("send", 'new:order:{"orderId": "o1", "amount": 30, "timeoutS": 1, '
                              '"retries": 3, "backoffS": 0.2}'),
                     ("advance", 1.1), ("advance", 0.5)],
    "golden-approval": [("send", 'new:approval:{"subject": "laptop", "approver": "alice", '
                                 '"escalateTo": "bob", "remindAfterS": 1, "escalateAfterS": 2}'),
                        ("advance", 1.5), ("send", '{"ref": "decision", "value": '
                                                   '{"approved": true, "by": "mallory"}}')],
    # continued as new after 3 operations: the journal is the second run's, one event long
    "golden-account": [("send", 'new:account:{"customer": "c1", "continueEvery": 3}')]
                      + [("send", '{"ref": "ops", "value": {"op": "deposit", "amount": 5}}')] * 4,
}


def to_json(journal: Journal) -> str:
    fields_ = {f.name: getattr(journal, f.name) for f in fields(Journal)}
    return json.dumps({"format": FORMAT, **fields_}, indent=1)


def from_json(text: str) -> Journal:
    data: dict[str, Any] = json.loads(text)
    assert data.pop("format", 1) == FORMAT, "a golden of an older journal format: record again"
    data["events"] = [tuple(e) for e in data["events"]]
    data["checks"] = [(n, crc, tuple(pending)) for n, crc, pending in data["checks"]]
    data["timers"] = tuple(data["timers"])
    return Journal(**data)


def record() -> None:
    """Run each script in Engine and write the thread's journal, which must be in flight."""
    from kwf.testing import Engine

    load_modules(["workflows"])
    for thread, script in SCRIPTS.items():
        with Engine() as eng:
            for action, arg in script:
                if action == "advance":
                    eng.advance(arg)
                else:
                    eng.send(thread if action == "send" else "golden-other", arg)
            journal = eng.journal(thread)
            assert journal is not None and not journal.finished and journal.events, thread
            (GOLDEN / f"{thread}.json").write_text(to_json(journal) + "\n")


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.stem)
def test_golden_journal_replays_against_today_s_workflows(path: Path) -> None:
    load_modules(["workflows"])
    journal = from_json(path.read_text())
    workflow = get(journal.workflow)
    assert workflow is not None, f"workflow {journal.workflow!r} is gone"
    assert journal.events, "a golden must hold events to replay"
    Instance.rebuild(workflow, journal, Settings()).dispose()  # NonDeterminismError fails it


def test_every_example_has_goldens() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(SCRIPTS)
    kinds = {json.loads(p.read_text())["workflow"] for p in GOLDEN.glob("*.json")}
    assert kinds == {"trip", "cart", "order", "approval", "account"}


def test_a_changed_workflow_fails_its_golden(monkeypatch: pytest.MonkeyPatch) -> None:
    """The goldens can fail: a trip that reserves in another order diverges from its journal."""
    load_modules(["workflows"])
    from workflows import trip_booking

    monkeypatch.setattr(trip_booking, "KINDS", ("hotel", "car", "flight"))
    swapped = trip_booking.reserve

    async def reserve_swapped(kind: str) -> dict[str, str]:
        return await swapped({"car": "hotel", "hotel": "car"}.get(kind, kind))

    monkeypatch.setattr(trip_booking, "reserve", reserve_swapped)
    from kwf.errors import NonDeterminismError

    journal = from_json((GOLDEN / "golden-trip.json").read_text())
    with pytest.raises(NonDeterminismError, match="diverged"):
        Instance.rebuild(get("trip"), journal, Settings())  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent.parent))
    record()

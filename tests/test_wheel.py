"""The timer wheel (``kwf.wheel``): wakeups held by slots, firings applied by threads (issue 13)."""

from __future__ import annotations

import asyncio
import json
import zlib

import pytest

import kwf
from kwf.protocol import Fire, ProtocolError, parse_command, timer_value
from kwf.testing import Engine
from kwf.thread import ThreadState
from kwf.wheel import SLOTS, Arm, WheelState, slot_of


@kwf.workflow("wheel-nap")
async def nap(arg: dict[str, float]) -> str:
    await asyncio.sleep(arg["s"])
    return "rested"


@kwf.workflow("wheel-wait")
async def wait(arg: object) -> object:
    """Waits for a signal, at most 100 s."""
    try:
        return await asyncio.wait_for(kwf.suspend("go"), 100)
    except TimeoutError:
        return "timeout"


def test_a_slot_fires_due_entries_in_order_and_forgets_them() -> None:
    slot = WheelState("s")
    for thread, due in (("a", 30.0), ("b", 10.0), ("c", 20.0)):
        slot.on_arm(Arm(thread, due))
    slot.on_arm(Arm("c", 25.0))  # moved: the old heap item is skipped, not fired
    slot.on_arm(Arm("a", None))  # removed
    assert slot.wakeup() == 10.0
    fired = slot.on_timer(26.0, "resume")
    assert [(r.key, r.value, r.timestamp) for r in fired] == [
        ("b", timer_value(10.0), 26.0), ("c", timer_value(25.0), 26.0)]
    assert slot.entries == {} and slot.wakeup() is None and slot.on_timer(99.0, "resume") == []


def test_a_slot_heap_stays_bounded_under_rearming() -> None:
    slot = WheelState("s")
    for i in range(10_000):
        slot.on_arm(Arm("t", float(i)))
    assert slot.entries == {"t": 9999.0} and len(slot._heap) <= 2 * 1 + 65  # noqa: SLF001
    assert [r.value for r in slot.on_timer(1e9, "resume")] == [timer_value(9999.0)]


def test_slots_are_few_and_stable() -> None:
    keys = {slot_of(f"thread-{i}") for i in range(5000)}
    assert len(keys) == SLOTS
    # not hash(): the slot must be the same in every process, whatever PYTHONHASHSEED
    assert slot_of("order-42") == f"slot-{zlib.crc32(b'order-42') % SLOTS}"


@pytest.mark.parametrize("text", ["timer:", "timer:soon", "timer:nan", "timer:1e999"])
def test_a_malformed_firing_is_refused_with_a_stable_code(text: str) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_command(text)
    assert e.value.code == "bad-timer"


def test_a_firing_parses_to_its_due_time() -> None:
    assert parse_command(timer_value(1733112345.25)) == Fire(1733112345.25)


def test_engine_dead_letters_a_malformed_firing_and_keeps_going() -> None:
    eng = Engine(workflows=[nap])
    eng.send("t1", 'new:{"s": 5}')
    dlq = eng.send("t1", "timer:soon")
    assert [r.header("kwf-error").split(":")[0] for r in dlq] == ["bad-timer"]
    eng.advance(5)
    assert eng.result("t1") == "rested"


def test_engine_fires_timers_through_firing_records_it_does_not_list() -> None:
    eng = Engine(workflows=[nap])
    eng.send("t1", 'new:{"s": 60}')
    assert eng.wheel.entries == {"t1": 60.0}
    out = eng.advance(60)
    assert eng.result("t1") == "rested"
    assert not any(r.value and str(r.value).startswith("timer:") for r in eng.outputs())
    assert out and all(r.topic != eng.settings.resume_topic for r in out)
    # the finished thread's tombstone expiry is the next wheel entry, and expires through it
    expires = eng.journal("t1").expires
    assert eng.wheel.entries == {"t1": expires}
    eng.advance_to(expires)
    assert eng.journal("t1") is None and eng.wheel.entries == {}
    assert eng.outputs(eng.settings.events_topic)[-1].value is None  # deleted from the compacted topic


def test_a_stale_or_duplicate_firing_changes_nothing() -> None:
    eng = Engine(workflows=[wait])
    eng.send("t1", "new:null")
    assert eng.wheel.entries == {"t1": 100.0}
    eng.send("t1", json.dumps({"ref": "go", "value": 7}))  # finished before its timeout
    assert eng.result("t1") == 7
    before = len(eng.outputs())
    assert eng.send("t1", timer_value(100.0)) == []  # the timeout's firing, late and stale
    assert eng.send("nobody", timer_value(100.0)) == []  # no thread: no dead letter either
    assert len(eng.outputs()) == before and eng.journal("t1") is not None


def test_a_firing_sent_by_anyone_fires_only_what_is_due_by_its_time() -> None:
    eng = Engine(workflows=[nap])
    eng.send("t1", 'new:{"s": 60}')
    assert eng.send("t1", timer_value(30.0)) == []
    assert eng.journal("t1").next_timer() == 60.0 and eng.wheel.entries == {"t1": 60.0}


def test_arming_follows_the_wakeup_and_a_firing_clears_what_it_fired() -> None:
    eng = Engine(workflows=[nap])
    eng.send("t1", 'new:{"s": 60}')
    state = eng.threads["t1"]
    assert state.armed == 60.0 and state.arm() is None
    state.on_fire(Fire(59.0))  # not what the slot held: still armed
    assert state.armed == 60.0
    state.on_fire(Fire(60.0))  # the slot fired and forgot it: the next wakeup is armed again
    assert state.journal.finished and state.arm() == Arm("t1", state.journal.expires)


def test_a_thread_restored_without_its_slot_is_armed_again() -> None:
    """A journal handed over by hand (or an older snapshot) is armed at the next advance."""
    first = Engine(workflows=[nap])
    first.send("t1", 'new:{"s": 60}')
    journal = first.journal("t1")
    from kwf.journal import encode

    eng = Engine(workflows=[nap])
    eng.threads["t1"] = ThreadState.restore(encode(journal), eng.ctx)
    eng.advance(60)
    assert eng.result("t1") == "rested"

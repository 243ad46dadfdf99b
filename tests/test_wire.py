"""Byte compatibility with kafka-workflow's consumers (issue 8), in ``kwf.testing.Engine``.

The expected outputs are those of the original's own tests (``EngineTest.java`` at awto/
kafka-workflow ``b2f3ce2``), written out byte for byte and compared as strings, run against
line-for-line ports of its trip saga and cart (``seed_workflows``). Ids are the original's:
``<offset of the record in workflow-resume>:<n>``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest
import seed_workflows as seed

import kwf
from kwf.config import Settings
from kwf.journal import FAILED, RUNNING, decode
from kwf.registry import Registry, load_modules
from kwf.protocol import Command, Incoming, Record, parse_command
from kwf.testing import Engine
from kwf.thread import Context, ThreadState

GOLDEN_V1 = Path(__file__).parent / "golden" / "format-1" / "golden-trip.journal"


def only(eng: Engine, topic: str) -> list[tuple[str | bytes | None, str | bytes | None]]:
    return [(r.key, r.value) for r in eng.outputs(topic)]


def trip() -> Engine:
    return Engine(workflows=[seed.seed_trip])


def ref(eng: Engine, kind: str, thread: str = "thread1") -> str:
    """The id the saga wrote to ``saga-reserve-<kind>`` for ``thread`` (its last one)."""
    return str([r.value for r in eng.outputs(f"saga-reserve-{kind}") if r.key == thread][-1])


# -- EngineTest.java, byte for byte ------------------------------------------------------------

def test_trip_booking_saga_all_resolved() -> None:
    eng = trip()
    eng.send("thread1", "new:{}")
    for kind in ("flight", "hotel", "car"):
        eng.send("thread1", f'{{"ref":"{ref(eng, kind)}"}}')
    assert only(eng, "workflow-result") == [
        ("thread1", '{"car":{"id":"0:1"},"hotel":{"id":"0:2"},"flight":{"id":"0:3"}}')]
    assert not any(eng.outputs(f"saga-cancel-{kind}") for kind in ("car", "hotel", "flight"))
    assert only(eng, "workflow-scheduler") == [('thread1|{"ref":"0:4"}', "1000"),
                                               ('thread1|{"ref":"0:4"}', "0")]


def test_trip_booking_saga_error_in_code() -> None:
    eng = trip()
    eng.send("thread1", 'new:{"throwAfterHotel":true}')
    for kind in ("flight", "car", "hotel"):
        eng.send("thread1", f'{{"ref":"{ref(eng, kind)}"}}')
    assert only(eng, "saga-cancel-car") == [("thread1", "0:1")]
    assert only(eng, "saga-cancel-hotel") == [("thread1", "0:2")]
    assert only(eng, "saga-cancel-flight") == [("thread1", "0:3")]
    assert only(eng, "workflow-error") == [("thread1", '"something is wrong"')]
    assert eng.outputs("workflow-result") == []


def test_trip_booking_saga_one_errored() -> None:
    eng = trip()
    eng.send("thread1", "new:{}")
    eng.send("thread1", f'{{"ref":"{ref(eng, "flight")}"}}')
    eng.send("thread1", f'{{"ref":"{ref(eng, "car")}"}}')
    eng.send("thread1", f'{{"error": "hotel is not available", "ref":"{ref(eng, "hotel")}"}}')
    assert only(eng, "workflow-error") == [("thread1", '"hotel is not available"')]
    assert only(eng, "saga-cancel-car") == [("thread1", "0:1")]
    assert only(eng, "saga-cancel-flight") == [("thread1", "0:3")]
    assert eng.outputs("saga-cancel-hotel") == eng.outputs("workflow-result") == []


def test_trip_booking_saga_timeout() -> None:
    eng = trip()
    eng.send("thread1", "new:{}")
    eng.send("thread1", f'{{"ref":"{ref(eng, "flight")}"}}')
    eng.send("thread1", f'{{"ref":"{ref(eng, "car")}"}}')
    key = str(eng.outputs("workflow-scheduler")[0].key)
    eng.send("thread1", key.split("|")[1])
    assert only(eng, "workflow-error") == [("thread1", '"timeout"')]
    assert only(eng, "saga-cancel-car") == [("thread1", "0:1")]
    assert only(eng, "saga-cancel-hotel") == [("thread1", "0:2")]
    assert only(eng, "saga-cancel-flight") == [("thread1", "0:3")]
    assert eng.outputs("workflow-result") == []


ECOMMERCE = [
    ("thread1", 'new:{"abandonedCartTimeoutMS":2000}'),
    ("thread1", '{"value":{"type":"updateEmail","email":"someone@example.com"}, "ref":"main"}'),
    ("thread1", '{"value":{"type":"addToCart","item":{"quantity":10,"productId":"teapot"}}, '
                '"ref":"main"}'),
    ("thread2", 'new:{"abandonedCartTimeoutMS":1000}'),
    ("thread2", '{"value":{"type":"updateEmail","email":"vitaliy.akimov@gmail.com"}, '
                '"ref":"main"}'),
    ("thread1", '{"value":{"type":"addToCart","item":{"quantity":11,"productId":"sigar"}}, '
                '"ref":"main"}'),
    ("thread1", '{"value":{"type":"addToCart","item":{"quantity":20,"productId":"teapot"}}, '
                '"ref":"main"}'),
    ("thread1", '{"value":{"type":"updateEmail","email":"vitaliy.akimov@gmail.com"}, '
                '"ref":"main"}'),
    ("thread1", '{"value":{"type":"removeFromCart", "item":{"quantity":11,"productId":"sigar"}}, '
                '"ref":"main"}'),
    ("thread1", '{"value":{"type":"addToCart","item":{"quantity":2,"productId":"sugar"}}, '
                '"ref":"main"}'),
    ("thread1", '{"value":{"type":"checkout"}, "ref":"main"}'),
]


def test_ecommerce_two_interleaved_carts() -> None:
    """testECommerce; and the scheduler keys carry the ids of each thread's own offsets."""
    eng = Engine(workflows=[seed.seed_cart])
    for key, value in ECOMMERCE:
        eng.send(key, value)
    assert only(eng, "workflow-result") == [(
        "thread1", '{"items":[{"quantity":30,"productId":"teapot"},{"quantity":2,'
                   '"productId":"sugar"}],"email":"vitaliy.akimov@gmail.com"}')]
    assert eng.outputs("workflow-error") == []
    # thread2's records sit at offsets 3 and 4: each step's timeout is <offset>:1
    thread2 = [(r.key, r.value) for r in eng.outputs("workflow-scheduler")
               if r.key.startswith("thread2")]
    assert thread2 == [('thread2|{"ref":"3:1"}', "1000"), ('thread2|{"ref":"3:1"}', "0"),
                       ('thread2|{"ref":"4:1"}', "1000")]
    thread1 = [r.key for r in eng.outputs("workflow-scheduler")
               if r.key.startswith("thread1") and r.value != "0"]
    assert thread1 == [f'thread1|{{"ref":"{n}:1"}}' for n in (0, 1, 2, 5, 6, 7, 8, 9)]


def test_a_second_thread_s_ids_are_its_own_offsets() -> None:
    """Two sagas interleaved: the second's start is at offset 1, so its ids are 1:<n>."""
    eng = trip()
    eng.send("t-ok", "new:{}")
    eng.send("t-fail", 'new:{"throwAfterHotel":true}')
    assert only(eng, "saga-reserve-car") == [("t-ok", "0:1"), ("t-fail", "1:1")]
    for kind in ("car", "hotel", "flight"):
        eng.send("t-ok", f'{{"ref":"{ref(eng, kind, "t-ok")}"}}')
    eng.send("t-fail", '{"ref":"1:2"}')
    assert only(eng, "workflow-result") == [
        ("t-ok", '{"car":{"id":"0:1"},"hotel":{"id":"0:2"},"flight":{"id":"0:3"}}')]
    assert only(eng, "workflow-error") == [("t-fail", '"something is wrong"')]
    assert sorted(only(eng, "saga-cancel-hotel") + only(eng, "saga-cancel-car")) == [
        ("t-fail", "1:1"), ("t-fail", "1:2")]
    assert [(r.key, r.offset) for r in eng.inputs("workflow-resume")][:2] == [("t-ok", 0),
                                                                              ("t-fail", 1)]


# -- offsets in Engine ---------------------------------------------------------------------------

def test_engine_numbers_records_per_topic_and_loopbacks_take_the_next_offset() -> None:
    """A firing of workflow-scheduler comes back through workflow-resume with the next offset,
    and the step it causes makes ids from that offset."""
    eng = Engine(workflows=[seed.seed_cart], start_time=100.0)
    eng.send("c1", 'new:{"abandonedCartTimeoutMS":1000}')
    eng.send("c1", '{"ref":"main","value":{"type":"updateEmail","email":"a@b.c"}}')
    assert [(r.topic, r.offset) for r in eng.inputs()] == [
        ("workflow-resume", 0), ("workflow-scheduler", 0), ("workflow-resume", 1),
        ("workflow-scheduler", 1), ("workflow-scheduler", 2)]
    eng.advance(1)  # the scheduler fires {"ref":"1:1"} into workflow-resume at offset 2
    fired = eng.inputs("workflow-resume")[-1]
    assert (fired.value, fired.offset, fired.source) == ('{"ref":"1:1"}', 2, "workflow-resume/0/2")
    assert only(eng, "ecommerce-reminder") == [("c1", "a@b.c")]
    assert eng.status("c1")["pending"] == ["main", "2:1"]


@kwf.workflow("wire-naps")
async def naps(arg: object) -> list[str]:
    ids = []
    for _ in range(2):
        await asyncio.sleep(1)
        ids.append(kwf.suspend().id)
        ids.append(kwf.suspend().id)
    done = kwf.suspend()
    ids.append(done.id)
    await done
    return ids


def test_steps_without_a_record_count_from_the_last_record() -> None:
    """Built-in timers fire with no record: <last record's offset>.<k>:<n>, unique, replayable."""
    with Engine(workflows=[naps], max_live=0) as eng:  # every step replays the journal first
        eng.send("other", "cancel:")
        eng.send("n1", "new:{}")
        eng.advance(2)
        pending = eng.status("n1")["pending"]
        assert pending == ["1.1:1", "1.1:2", "1.2:1", "1.2:2", "1.2:3"]
        eng.send("n1", '{"ref":"1.2:3"}')
        assert eng.result("n1") == pending


def test_step_id_stays_the_thread_s_step_number() -> None:
    @kwf.workflow("wire-steps")
    async def steps(arg: object) -> list[int]:
        seen = [kwf.step_id()]
        await kwf.suspend("go")
        seen.append(kwf.step_id())
        return seen

    eng = Engine(workflows=[steps])
    eng.send("x", "cancel:")
    eng.send("x", "cancel:")
    eng.send("s", "new:{}")
    eng.send("s", '{"ref":"go"}')
    assert eng.result("s") == [0, 1]


# -- new: without JSON ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["new:", "new:  ", "init:", "new:seed-trip:", "init:seed-trip:"])
def test_a_start_without_json_is_dead_lettered_and_the_live_thread_kept(value: str) -> None:
    eng = trip()
    eng.send("t1", "new:{}")
    before = eng.status("t1")
    (dead,) = eng.send("t1", value)
    assert dead.topic == "workflow-dlq"
    assert dead.header("kwf-error").startswith("no-json: ")
    assert "<json>" in dead.header("kwf-error") and "null" in dead.header("kwf-error")
    assert eng.status("t1") == before
    eng.send("t1", '{"ref":"0:1"}')
    eng.send("t1", '{"ref":"0:2"}')
    eng.send("t1", '{"ref":"0:3"}')
    assert eng.result("t1")["car"] == {"id": "0:1"}


# -- compact JSON --------------------------------------------------------------------------------

kwf.config.output_topics.add("wire-out")


@kwf.workflow("wire-json")
async def writes_json(arg: dict[str, object]) -> object:
    kwf.output_json({"zeta": 1, "émoji": "☕", "list": [1, None, "\ud800"]}, "wire-out")
    got = await kwf.suspend("in")
    if got == "fail":
        raise ValueError("café fermé")
    if got == "remote":
        await kwf.suspend("remote")
    return {"b": arg, "a": "ü"}


def test_json_is_written_as_json_stringify_writes_it() -> None:
    eng = Engine(workflows=[writes_json])
    eng.send("t1", 'new:{"y": 2, "x": [1, 2]}')
    assert only(eng, "wire-out") == [("t1", '{"zeta":1,"émoji":"☕","list":[1,null,"\\ud800"]}')]
    (status,) = [r.value for r in eng.outputs("workflow-events")]
    assert status.startswith('{"thread":"t1","workflow":"wire-json","status":"running","step":0,'
                             '"pending":["in"],"timers":[],"updated":')
    eng.send("t1", '{"ref": "in", "value": 1}')
    assert only(eng, "workflow-result") == [("t1", '{"b":{"y":2,"x":[1,2]},"a":"ü"}')]
    for r in eng.outputs():
        assert isinstance(r.value, str) and r.value.encode()  # valid UTF-8, lone surrogate escaped


def test_error_texts_are_compact_and_keep_non_ascii() -> None:
    eng = Engine(workflows=[writes_json])
    eng.send("t1", "new:null")
    eng.send("t1", '{"ref": "in", "value": "fail"}')
    eng.send("t2", "new:null")
    eng.send("t2", '{"ref": "in", "value": "remote"}')
    eng.send("t2", '{"ref": "remote", "error": {"z": "é", "a": [1, 2]}}')
    assert only(eng, "workflow-error") == [("t1", '"café fermé"'),
                                           ("t2", '"{\\"z\\":\\"é\\",\\"a\\":[1,2]}"')]


# -- journals of the old format ------------------------------------------------------------------

def test_a_format_1_journal_is_parked_with_a_message_never_replayed() -> None:
    """A snapshot written before offset ids (a real format-1 journal, kept as a fixture) is
    restored without error, then parked as failed at once, saying what to do."""
    load_modules(["workflows"])  # the golden's workflow, "trip"
    data = GOLDEN_V1.read_bytes()
    journal = decode(data)
    assert journal.status == RUNNING and journal.refused is not None
    state = ThreadState.restore(data, Context(Registry(None, None), Settings()))
    wake = state.wakeup()
    assert wake is not None
    out = state.on_timer(wake)
    error, status = out
    assert (error.topic, error.key, error.header("kwf-error-type")) == (
        "workflow-error", "golden-trip", "JournalFormatError")
    text = json.loads(str(error.value))
    assert "journal format 1" in text and "finish such threads under the old version" in text
    assert "new:" in text
    assert json.loads(str(status.value))["status"] == FAILED
    assert state.journal is not None and state.journal.finished
    # a late reply is ignored (a finished thread); new: starts it again
    assert state.on_command(_incoming('{"ref":"0:3"}'), _parse('{"ref":"0:3"}')) == []
    started = state.on_command(_incoming("new:trip:{}", 9), _parse("new:trip:{}"))
    assert [r.value for r in started if r.topic == "saga-reserve-car"] == ["9:1"]
    state.evict()


def _incoming(value: str, offset: int = 5) -> Incoming:
    return Incoming("workflow-resume", "golden-trip", value, 10.0, 0, offset)


def _parse(value: str) -> Command:
    return parse_command(value)


def test_a_format_1_tombstone_stays_a_tombstone() -> None:
    import cloudpickle

    from kwf.journal import COMPLETED, Journal, encode

    finished = Journal("t9", "trip", "f", None, 0.0, 0, 0, step=3, seq=7, time=5.0,
                       status=COMPLETED, result='{"a":1}', expires=99.0)
    values = tuple(getattr(finished, f) for f in ("thread", "workflow", "fingerprint", "arg",
                   "started", "base_step", "base_seq", "events", "checks", "step", "seq",
                   "time", "status", "timers", "result", "expires"))
    restored = decode(cloudpickle.dumps((1, values)))
    assert restored.refused is None and restored.finished and restored.expires == 99.0
    assert decode(encode(finished)) == finished
    with pytest.raises(ValueError, match="newer than this kwf"):
        decode(cloudpickle.dumps((3, values)))


def test_records_carry_their_offset_to_dead_letters() -> None:
    eng = trip()
    eng.send("a", "new:{}")
    (dead,) = eng.send("b", "garbage")
    assert dead.header("kwf-source") == "workflow-resume/0/1"
    assert isinstance(dead, Record)


def test_kwf_send_refuses_a_start_without_json_before_any_broker() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "KWF_BROKERS": "127.0.0.1:21099"}  # nothing listens: never reached
    done = subprocess.run([sys.executable, "-m", "kwf.cli", "send", "t1", "init:approval:"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "not sent: no-json" in done.stderr  # errors go to stderr (kwf.cli.main)


def test_the_engine_restores_a_format_1_snapshot_and_parks_its_thread(tmp_path: Path) -> None:
    """The real dataflow, restarted on a recovery store holding a format-1 journal: the
    builder does not fail (it would at every restart), the thread is parked with the reason,
    and other threads run on."""
    import pickle
    import sqlite3
    import time

    from kwf.testing import run_flow
    from workflows.trip_booking import trip as trip_workflow

    now = time.time()
    records: list[object] = [("workflow-resume", "golden-trip", "new:trip:{}", now)]
    run_flow(records, workflows=[trip_workflow], recovery_dir=tmp_path,
             epoch_interval=timedelta(0))
    with sqlite3.connect(tmp_path / "part-0.sqlite3") as db:  # as an older kwf wrote it
        changed = db.execute("UPDATE snaps SET ser_change = ? WHERE state_key = 'golden-trip' "
                             "AND step_id = 'kwf.thread.stateful_batch' AND ser_change IS NOT NULL",
                             (pickle.dumps(GOLDEN_V1.read_bytes()),)).rowcount
    assert changed >= 1
    records += [("workflow-resume", "golden-trip", '{"ref":"0:1"}', now),
                ("workflow-resume", "other", "new:trip:{}", now)]
    out = run_flow(records, workflows=[trip_workflow], recovery_dir=tmp_path,
                   epoch_interval=timedelta(0))
    (error,) = [r for r in out if r.topic == "workflow-error"]
    assert (error.key, error.header("kwf-error-type")) == ("golden-trip", "JournalFormatError")
    assert "journal format 1" in json.loads(str(error.value))
    assert [r.value for r in out if r.topic == "saga-reserve-car"] == ["2:1"]  # "other", offset 2

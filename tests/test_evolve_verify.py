"""``kwf verify``: the deploy gate over a real recovery store (issue 11, item 5)."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from kwf.cli import main
from kwf.cli._store import read_journals
from kwf.config import Settings
from kwf.engine.flow import run_flow
from kwf.registry import Registry, load_modules

load_modules(["workflows"])
import evolve_workflows as ew  # noqa: E402  (at import: modules declare their topics then)
from workflows import trip_booking  # noqa: E402  (registered by load_modules above)

RESUME = Settings().resume_topic
T0 = float(int(time.time()))
"""Records are stamped now: with timestamps in the past, their timers (10 minutes) would be due
by the wall clock as soon as the engine has read its input, and fire."""


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """``kwf.cli.main`` points structlog at this test's captured stderr: undo it afterwards."""
    yield
    structlog.reset_defaults()


def _bench() -> object:
    spec = importlib.util.spec_from_file_location(
        "bench_verify", Path(__file__).parent.parent / "bench" / "verify.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def engine_store(tmp_path: Path) -> Path:
    """A store written by a real engine run: three trips in flight, one finished, one cart."""
    store = tmp_path / "recovery"
    records = [(RESUME, f"trip-{i}", 'new:trip:{"timeoutMs": 600000}', T0) for i in range(3)]
    records += [(RESUME, "trip-0", json.dumps({"ref": "0:1", "value": 1}), T0 + 1),
                (RESUME, "cart-1", 'new:cart:{"abandonedCartTimeoutMS": 600000}', T0 + 1),
                (RESUME, "done", "new:trip:{}", T0), (RESUME, "done", "cancel:", T0 + 2)]
    run_flow(records, workflows=Registry().workflows.values(), recovery_dir=store,
             start_time=T0)
    return store


def verify(store: Path, *extra: str) -> int:
    return main(["verify", "--recovery", str(store), "--workflows", "workflows", *extra])


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_verify_passes_a_store_the_engine_wrote(tmp_path, capsys, jobs):
    store = engine_store(tmp_path)
    assert verify(store, "-j", jobs) == 0
    out = capsys.readouterr().out
    assert "4 live threads checked (1 finished, skipped)" in out and "all replay" in out


def test_verify_fails_an_incompatible_edit_naming_thread_workflow_and_step(tmp_path, capsys,
                                                                          monkeypatch):
    store = engine_store(tmp_path)
    reserve = trip_booking.reserve

    async def reserve_swapped(kind: str) -> dict[str, str]:  # hotel and car asked the other way
        return await reserve({"car": "hotel", "hotel": "car"}.get(kind, kind))

    monkeypatch.setattr(trip_booking, "reserve", reserve_swapped)
    assert verify(store, "-j", "2") == 8
    out = capsys.readouterr().out
    lines = sorted(line for line in out.splitlines() if line.startswith("DIVERGED"))
    assert [line.split(":")[0] for line in lines] == [
        f"DIVERGED thread='trip-{i}' workflow=trip step=0" for i in range(3)]
    assert "saga-reserve-hotel" in lines[0] and "do not deploy" in out


def test_verify_reports_a_workflow_no_longer_served(tmp_path, capsys):
    store = engine_store(tmp_path)
    assert main(["verify", "--recovery", str(store), "--workflows", "workflows.ecommerce"]) == 8
    out = capsys.readouterr().out
    assert "workflow 'trip' is not served by this code" in out and "3 diverged" in out


def test_verify_cannot_verify_a_missing_store_or_modules(tmp_path, capsys):
    assert verify(tmp_path / "nope") == 1
    assert "no recovery directory" in capsys.readouterr().out
    store = engine_store(tmp_path)
    assert main(["verify", "--recovery", str(store), "--workflows", "no_such_module"]) == 2
    assert "do not import" in capsys.readouterr().out


def test_the_benchmark_store_is_one_a_real_engine_resumes(tmp_path, capsys):
    """bench/verify.py writes journals in Bytewax's own layout: an engine continues them."""
    store = tmp_path / "recovery"
    _bench().build_store(store, 8, partitions=1, jobs=1)  # type: ignore[attr-defined]
    assert {j.thread for j in read_journals(store)} == {f"bench-{i}" for i in range(8)}
    assert verify(store) == 0
    # bench-0 and bench-4 are trips with two of three reservations answered, made on a virtual
    # clock at 0 s: the engine rebuilds them from the store, their 5 s deadline has long passed,
    # and they undo the three reservations of their journal at step 3.
    # The store's seed run consumed one input record, so the resumed input skips the first one.
    records = [(RESUME, "bench-seed", "cancel:", T0)]
    records += [(RESUME, f"bench-{i}", json.dumps({"ref": "0:3", "value": 3}), T0) for i in (0, 4)]
    out = run_flow(records, workflows=Registry().workflows.values(), recovery_dir=store)
    errors = {r.key: (r.value, r.header("kwf-step")) for r in out  # others' timers may fire too
              if r.topic == Settings().error_topic and r.key in ("bench-0", "bench-4")}
    assert errors == {"bench-0": ('"timeout"', "3"), "bench-4": ('"timeout"', "3")}
    assert sorted(r.topic for r in out if r.key == "bench-0" and "cancel" in r.topic) == [
        "saga-cancel-car", "saga-cancel-flight", "saga-cancel-hotel"]
    assert not [r for r in out if r.topic == Settings().dlq_topic]


# -- the same edit, unpatched and patched ----------------------------------------------------------
def greet_store(tmp_path: Path, *versions: object) -> Path:
    """A store by a real engine: one thread in flight per version, each started by that version."""
    store = tmp_path / "greet-recovery"
    for i, fn in enumerate(versions):
        run_flow([(RESUME, "pad", "cancel:", T0)] * i  # a resumed input skips what runs consumed
                 + [(RESUME, f"greet-{i}", f'new:{ew.NAME}:"x"', T0)],
                 workflows=[fn], recovery_dir=store)  # type: ignore[list-item]
    return store


@pytest.mark.parametrize("today,code", [("v2_unsafe", 8), ("v2", 0), ("v4", 8)])
def test_verify_fails_an_unpatched_edit_and_passes_it_made_with_patched(tmp_path, capsys,
                                                                       monkeypatch, today, code):
    from kwf import registry

    store = greet_store(tmp_path, ew.v1, ew.v1)
    monkeypatch.setitem(registry._REGISTERED, ew.NAME, getattr(ew, today).__kwf_workflow__)
    assert main(["verify", "--recovery", str(store), "--workflows", "evolve_workflows",
                 "-j", "2"]) == code
    out = capsys.readouterr().out
    assert "2 live threads checked" in out
    assert out.count("DIVERGED") == (2 if code else 0)
    if today == "v4":
        assert "took the old path at step 0" in out


def test_verify_passes_a_deprecated_patch_once_every_live_thread_has_its_marker(
        tmp_path, capsys, monkeypatch):
    from kwf import registry

    store = greet_store(tmp_path, ew.v2, ew.v2)
    monkeypatch.setitem(registry._REGISTERED, ew.NAME, ew.v4.__kwf_workflow__)
    assert main(["verify", "--recovery", str(store), "--workflows", "evolve_workflows"]) == 0
    assert "2 live threads checked" in capsys.readouterr().out


def test_verify_reports_a_thread_journaled_in_an_older_format(tmp_path, capsys):
    """A format-1 journal (ids from step numbers) in flight is one the engine would park."""
    import pickle
    import sqlite3

    import cloudpickle

    from kwf.cli._store import THREAD_STEP
    from kwf.journal import encode

    store = engine_store(tmp_path)
    [journal] = [j for j in read_journals(store) if j.thread == "trip-1"]
    old = pickle.loads(encode(journal))[1][:16]  # format 1: the fields before origin
    old_events = [e[:4] for e in old[7]]
    data = cloudpickle.dumps((1, (*old[:7], old_events, *old[8:])))
    db = sqlite3.connect(store / "part-0.sqlite3")
    db.execute("UPDATE snaps SET ser_change = ? WHERE step_id = ? AND state_key = ?",
               (pickle.dumps(data), THREAD_STEP, "trip-1"))
    db.commit()
    db.close()
    assert verify(store) == 8
    out = capsys.readouterr().out
    assert "DIVERGED thread='trip-1' workflow=trip" in out and "journal format 1" in out


def test_a_first_deploy_passes_the_gate_only_when_asked(tmp_path):
    """The StatefulSet's init container runs ``verify --missing-ok``: a fresh volume has no
    partitions yet, which is not an error there; without the flag it is (exit 1)."""
    fresh = tmp_path / "recovery"
    assert main(["verify", "--recovery", str(fresh), "--missing-ok"]) == 0
    assert main(["verify", "--recovery", str(fresh)]) == 1

"""``kwf verify``: the deploy gate over a real recovery store (issue 11, item 5)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kwf.cli import main
from kwf.cli._store import read_journals
from kwf.config import Settings
from kwf.engine.flow import run_flow
from kwf.registry import Registry, load_modules

load_modules(["workflows"])
from workflows import trip_booking  # noqa: E402  (registered by load_modules above)

RESUME = Settings().resume_topic
T0 = 1_700_000_000.0


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
    assert verify(store, "-j", "2") == 1
    out = capsys.readouterr().out
    lines = sorted(line for line in out.splitlines() if line.startswith("DIVERGED"))
    assert [line.split(":")[0] for line in lines] == [
        f"DIVERGED thread='trip-{i}' workflow=trip step=0" for i in range(3)]
    assert "saga-reserve-hotel" in lines[0] and "do not deploy" in out


def test_verify_reports_a_workflow_no_longer_served(tmp_path, capsys):
    store = engine_store(tmp_path)
    assert main(["verify", "--recovery", str(store), "--workflows", "workflows.ecommerce"]) == 1
    out = capsys.readouterr().out
    assert "workflow 'trip' is not served by this code" in out and "3 diverged" in out


def test_verify_cannot_verify_a_missing_store_or_modules(tmp_path, capsys):
    assert verify(tmp_path / "nope") == 2
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
    errors = {r.key: (r.value, r.header("kwf-step")) for r in out
              if r.topic == Settings().error_topic}
    assert errors == {"bench-0": ('"timeout"', "3"), "bench-4": ('"timeout"', "3")}
    assert sorted(r.topic for r in out if r.key == "bench-0" and "cancel" in r.topic) == [
        "saga-cancel-car", "saga-cancel-flight", "saga-cancel-hotel"]
    assert not [r for r in out if r.topic == Settings().dlq_topic]

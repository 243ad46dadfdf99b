"""``kwf.cli.demo``: what it sends is valid and finishes in Engine; outcomes, percentiles, rendering."""

from __future__ import annotations

from collections import Counter


from kwf.cli.demo import (KINDS, DemoReport, Thread, percentile, render_progress, render_summary,
                      start_records)
from kwf.protocol import Start, parse_command
from kwf.testing import Engine
from workflows._services import demo_services


def test_every_demo_thread_finishes_in_engine_with_the_demo_services():
    """The demo's start records and signals, answered by the demo services, end every thread."""
    eng = Engine()
    for topic, handler in demo_services().handlers().items():
        eng.handle(topic, handler)
    threads = {}
    for kind in KINDS:
        for i in range(30):
            thread = f"d-{kind}-{i}"
            records = start_records(kind, thread, i)
            assert isinstance(parse_command(records[0]), Start)
            threads[thread] = kind
            for value in records:
                eng.send(thread, value)
    eng.advance(60)
    statuses = Counter((kind, eng.status(t)["status"]) for t, kind in threads.items())
    assert not [k for k in statuses if k[1] == "running"], statuses
    assert statuses[("cart", "completed")] == statuses[("approval", "completed")] == 30


def test_outcome_classification():
    assert Thread("trip", 0, "completed", result={}).outcome == "completed"
    assert Thread("cart", 0, "completed", result="abandoned").outcome == "abandoned"
    assert Thread("approval", 0, "completed", result={"status": "expired"}).outcome == "abandoned"
    assert Thread("trip", 0, "failed", error="timeout", compensated=True).outcome == "timed out"
    assert Thread("order", 0, "failed", error_type="CallTimeout").outcome == "timed out"
    assert Thread("order", 0, "failed", error="out of stock", compensated=True).outcome \
        == "compensated"
    assert Thread("order", 0, "failed", error="card declined").outcome == "failed"
    assert Thread("trip", 0, "cancelled").outcome == "cancelled"
    assert Thread("trip", 0).outcome == "running"


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, p) for p in (50, 95, 99, 100)] == [50.0, 95.0, 99.0, 100.0]
    assert percentile([3.0], 99) == 3.0


def test_rendering_shows_counts_throughput_and_latency():
    threads = {f"t{i}": Thread("trip", 0.0, "completed", finished=float(i), result={})
               for i in range(1, 11)}
    threads["x"] = Thread("order", 0.0)
    report = DemoReport(threads, started=0.0, elapsed=10.0)
    progress = render_progress(report, width=11)
    assert progress.splitlines()[0].startswith("[##########.] 10/11 finished")
    assert "1.0/s" in progress
    summary = render_summary(report)
    assert "10 of 11 threads finished in 10.0 s: 1.0 workflows/s" in summary
    trip = next(line for line in summary.splitlines() if line.startswith("trip") and "." in line)
    assert trip.split()[1:] == ["5.00", "10.00", "10.00", "10.00"]

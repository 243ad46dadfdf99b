"""Journal size and rebuild time of a long-running thread, without and with ``continue_as_new``.

The ``account`` example handles N deposits (default 10,000) in ``kwf.testing.Engine``, once with
``continueEvery`` past N (one run, one journal for everything) and once with the default 500.
For each it prints the journal's events and encoded bytes (what every snapshot of the thread
writes), the time to rebuild the thread from its journal (after an eviction or a restart), and
the time per event of the whole run with live instances.

Run: ``.venv/bin/python bench/continue_as_new.py [--events 10000]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time

import structlog


def measure(events: int, every: int) -> dict[str, float]:
    from kwf.config import Settings
    from kwf.instance import Instance
    from kwf.journal import encode
    from kwf.registry import get, load_modules
    from kwf.testing import Engine

    load_modules(["workflows.account"])
    deposit = json.dumps({"ref": "ops", "value": {"op": "deposit", "amount": 1}})
    with Engine(workflows=[get("account")]) as eng:  # type: ignore[list-item]
        eng.send("c1", "new:account:" + json.dumps({"customer": "c1", "continueEvery": every}))
        began = time.perf_counter()
        for _ in range(events - 1):  # with continue every 500: the journal is at its longest
            eng.send("c1", deposit)
        run_s = time.perf_counter() - began
        events -= 1
        journal = eng.journal("c1")
        assert journal is not None and not journal.finished
        rebuilds = []
        for _ in range(3):
            began = time.perf_counter()
            Instance.rebuild(get("account"), journal, Settings()).dispose()  # type: ignore[arg-type]
            rebuilds.append(time.perf_counter() - began)
        return {"every": every, "journal_events": len(journal.events),
                "journal_bytes": len(encode(journal)), "rebuild_ms": min(rebuilds) * 1000,
                "live_us_per_event": run_s / events * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for every in (args.events + 1, 500):
        row = measure(args.events, every)
        label = "one run (no continue_as_new)" if every > args.events else f"continue every {every}"
        print(f"{label:32} journal {row['journal_events']:6.0f} events {row['journal_bytes'] / 1024:8.1f} KiB"
              f"  rebuild {row['rebuild_ms']:8.1f} ms  live {row['live_us_per_event']:6.0f} us/event")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

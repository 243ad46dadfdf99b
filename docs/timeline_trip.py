"""Draw docs/timeline-trip.svg, the README's picture: a trip saga whose flight never answers.

Run from the checkout: ``.venv/bin/python docs/timeline_trip.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kwf.testing import Engine
from workflows.trip_booking import trip


def main(target: Path = Path(__file__).with_name("timeline-trip.svg")) -> None:
    with Engine(workflows=[trip], start_time=1_800_000_000) as eng:
        eng.send("trip-7", 'new:trip:{"timeoutMs": 1000}')
        for kind in ("car", "hotel"):  # the flight service never answers
            eng.advance(0.25)
            [asked] = eng.outputs(f"saga-reserve-{kind}")
            eng.send("trip-7", json.dumps({"ref": asked.value, "value": {"booked": kind}}))
        eng.advance(1)  # the deadline fires: cancel the flight, compensate car and hotel
        eng.timeline("trip-7").save(target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:2]))

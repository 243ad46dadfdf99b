"""``kwf run``: the engine alone, with its recovery directory made once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def test_kwf_run_makes_recovery_once_and_refuses_unreachable_brokers(tmp_path: Path):
    env = {**os.environ, "KWF_BROKERS": "127.0.0.1:1"}
    kwf = [sys.executable, "-m", "kwf.cli", "run", "--state", str(tmp_path)]
    for _ in range(2):  # the second run must not initialise the directory again
        started = time.monotonic()
        done = subprocess.run(kwf, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert time.monotonic() - started < 15
        assert "kwf engine not started" in done.stderr and "127.0.0.1:1" in done.stderr
    assert sorted(p.name for p in (tmp_path / "recovery").glob("part-*.sqlite3")) == [
        "part-0.sqlite3"]

"""Many waiting threads on one node: starts, memory, recovery size, restarts, rates (issue 13).

For each size N it runs the real engine (``python -m bytewax.run dataflow -r DIR -s 5 -b 0``,
one worker) on a real broker and measures, writing one JSON document (``--out``):

1. **starts**: N/2 threads waiting on a named channel, N/2 on a one-day durable timer, and N
   that finish at once (tombstones within retention): starts applied per second, the engine's
   RSS, the recovery store's bytes and rows.
2. **restart**: ``kill -9``, then a resume for one waiting thread is already in Kafka when the
   engine starts again: seconds from spawn to that thread's result (restart to first new
   output), and the RSS once restored (every thread journal-only).
3. **probe**: with all of them waiting or finished, ``--probe`` fresh threads start and are
   resumed: records applied per second, and the engine's CPU per record (its own and its
   settler's: comparable on a shared machine, where rates are not), right after the restart
   (Bytewax's ``snaps`` still holds every restored row) and again once the settler has moved
   them out (``restart_to_settled_s``; sizes that log no settling pass skip it). Compare across
   N; the goal is >= 80% of the 10k rate.
4. **completions**: every channel-waiting thread is resumed: results per second after a restart.

``--loader ROWS:PARTITIONS,...`` times Bytewax's restart query alone, with and without an
extra index. ``--memory`` adds an in-process measure (no Kafka): RSS per live thread and per journal-only
thread, and RSS after evicting them all.

Run: ``.venv/bin/python bench/scale.py --brokers 127.0.0.1:19492 --sizes 10000,100000
[--partitions auto|P] [--out bench-scale.json]``. Each size uses fresh topics. This module is
also the engine's workflow module (``KWF_WORKFLOWS=scale``): the benchmark runs only under
__main__.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

import kwf

ROOT = Path(__file__).resolve().parent.parent


@kwf.workflow("scale-wait")
async def wait(arg: Any) -> Any:
    """Wait on one named channel, then finish with what it got."""
    return await kwf.suspend("go")


@kwf.workflow("scale-nap")
async def nap(arg: Any) -> str:
    """Wait on a durable timer a day away."""
    await asyncio.sleep(86_400)
    return "rested"


@kwf.workflow("scale-done")
async def done(arg: Any) -> str:
    """Finish at once: the thread becomes a tombstone kept for the retention period."""
    return "done"


# -- measuring -----------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its children alive now (the settler)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid, *(int(c) for c in children.read_text().split())] if children.exists() else [pid]
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def store_size(recovery: Path) -> tuple[int, int]:
    """Bytes on disk (WAL included) and rows in ``snaps`` over all partitions."""
    size = sum(p.stat().st_size for p in recovery.iterdir() if p.is_file())
    rows = 0
    for part in recovery.glob("part-*.sqlite3"):
        db = sqlite3.connect(f"file:{part}?mode=ro", uri=True, timeout=30)
        rows += db.execute("SELECT COUNT(*) FROM snaps").fetchone()[0]
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'kwf_snaps'").fetchone():
            rows += db.execute("SELECT COUNT(*) FROM kwf_snaps").fetchone()[0]
        db.close()
    return size, rows


class Watcher:
    """Consumes topics from the beginning in a thread; arrival time per key, counts by prefix."""

    def __init__(self, conf: dict[str, str], topics: list[str], partitions: int) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.consumer = Consumer({**conf, "group.id": uuid.uuid4().hex,
                                  "enable.auto.commit": "false", "fetch.max.bytes": "52428800"})
        self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                              for t in topics for p in range(partitions)])
        self.seen: dict[tuple[str, str], float] = {}  # (topic, key) -> first arrival
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            msgs = self.consumer.consume(10_000, 0.02)
            now = time.time()
            with self.lock:
                for m in msgs:
                    if m.error() is None and m.key() is not None:
                        self.seen.setdefault((m.topic(), m.key().decode()), now)

    def count(self, topic: str, prefix: str) -> int:
        with self.lock:
            return sum(1 for t, k in self.seen if t == topic and k.startswith(prefix))

    def wait_for(self, topic: str, keys: list[str], timeout: float) -> list[float]:
        """Arrival times of ``keys`` on ``topic`` once all are seen (``TimeoutError`` if not).

        Only keys not seen yet are looked up again (2M keys polled whole would eat a core),
        and progress goes to stderr every 30 s."""
        deadline = time.monotonic() + timeout
        pending = set(keys)
        report = time.monotonic() + 30
        while True:
            with self.lock:
                pending = {k for k in pending if (topic, k) not in self.seen}
            if not pending:
                with self.lock:
                    return [self.seen[(topic, k)] for k in keys]
            now = time.monotonic()
            if now > deadline:
                msg = f"{len(pending)} of {len(keys)} keys never reached {topic}"
                raise TimeoutError(msg)
            if now > report:
                report = now + 30
                print(f"{time.strftime('%H:%M:%S')} {topic}: {len(keys) - len(pending)} of "
                      f"{len(keys)}", file=sys.stderr, flush=True)
            time.sleep(0.01 if len(pending) < 1000 else 0.5)

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.consumer.close()


class Bench:
    """One size: topics, a recovery directory, the engine subprocess."""

    def __init__(self, brokers: str, n: int, partitions: int, topic_partitions: int,
                 workdir: Path) -> None:
        from kwf.config import Settings
        from kwf.engine.admin import create_topics

        self.n, self.partitions = n, partitions
        prefix = f"scale-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "KWF_BROKERS": brokers, "KWF_WORKFLOWS": "scale",
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)]),
                    **{f"KWF_{t.upper()}_TOPIC": f"{prefix}-{t}"
                       for t in ("resume", "scheduler", "result", "error", "events", "dlq")}}
        self.settings = Settings.from_env(self.env)
        self.conf = {"bootstrap.servers": brokers}
        self.tp = topic_partitions
        create_topics(self.conf, list(self.settings.engine_topics), topic_partitions, 1)
        self.recovery = workdir / f"recovery-{n}"
        self.recovery.mkdir()
        subprocess.run([sys.executable, "-m", "bytewax.recovery", str(self.recovery),
                        str(partitions)], check=True, env=self.env)
        self.log_path = workdir / f"engine-{n}.log"
        self.log = self.log_path.open("ab")
        self.engine: subprocess.Popen[bytes] | None = None

    def produce(self, items: list[tuple[str, str]]) -> None:
        from confluent_kafka import Producer

        producer = Producer({**self.conf, "linger.ms": "50", "batch.size": "1000000",
                             "queue.buffering.max.messages": "1000000"})
        for key, value in items:
            while True:
                try:
                    producer.produce(self.settings.resume_topic, key=key, value=value)
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush()

    def start(self) -> float:
        self.engine = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "dataflow", "-r", str(self.recovery),
             "-s", "5", "-b", "0"], cwd=ROOT, env=self.env, stdout=self.log, stderr=self.log)
        return time.time()

    def kill(self) -> None:
        if self.engine is not None and self.engine.poll() is None:
            self.engine.send_signal(signal.SIGKILL)
            self.engine.wait()

    def compacted_s(self) -> float | None:
        """Seconds of the last start's ``compact`` (moving settled rows back, dropping dead
        ones), from the engine's log."""
        seconds = None
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"recovery_compacted"' in line:
                with contextlib.suppress(ValueError):
                    seconds = json.loads(line).get("seconds")
        return seconds

    def settled_since(self, since: float, timeout: float) -> float | None:
        """Seconds from ``since`` to the settler's first pass that moved the restored rows
        out of Bytewax's ``snaps`` (its ``recovery_settled`` line, logged from 10,000 rows);
        None if it logged none within ``timeout`` (a store too small to log)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if '"recovery_settled"' in line:
                    with contextlib.suppress(ValueError, KeyError):
                        stamp = json.loads(line)["timestamp"].rstrip("Z")
                        at = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
                        if at >= since - 1:
                            return at + float("0." + (stamp[20:] or "0")) - since
            if self.n * 2 < 10_000:
                return None
            time.sleep(1)
        return None

    def rss(self) -> int:
        assert self.engine is not None
        return rss_bytes(self.engine.pid)


def run_size(brokers: str, n: int, partitions: int, probe: int, workdir: Path,
             completions: int | None = None,
             save: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """One size; ``save`` gets the figures so far after each phase (a 1M run takes an hour),
    ``completions`` caps how many waiting threads phase 4 resumes."""
    b = Bench(brokers, n, partitions, 3, workdir)
    s = b.settings
    half = n // 2
    waiting = [f"w{i}" for i in range(half)]
    napping = [f"n{i}" for i in range(n - half)]
    finished = [f"d{i}" for i in range(n)]
    out: dict[str, Any] = {"n": n, "recovery_partitions": partitions}

    def phase(name: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} n={n}: {name}", file=sys.stderr, flush=True)
        save(out)

    b.produce([(k, "new:scale-wait:null") for k in waiting]
              + [(k, "new:scale-nap:null") for k in napping]
              + [(k, "new:scale-done:null") for k in finished])
    watch = Watcher(b.conf, [s.events_topic, s.result_topic], b.tp)
    try:
        t0 = b.start()
        every = watch.wait_for(s.events_topic, waiting + napping + finished, timeout=7200)
        out["starts_per_s"] = round(2 * n / (max(every) - min(every)), 1)
        out["engine_up_to_first_start_s"] = round(min(every) - t0, 2)
        time.sleep(12)  # two epochs: every thread is in the store
        out["rss_after_starts_mb"] = round(b.rss() / 2**20, 1)
        size, rows = store_size(b.recovery)
        out.update(recovery_bytes=size, recovery_rows=rows)
        phase("started")
        b.kill()

        b.produce([(waiting[0], json.dumps({"ref": "go", "value": 1}))])
        t1 = b.start()
        (first,) = watch.wait_for(s.result_topic, [waiting[0]], timeout=7200)
        out["restart_to_first_result_s"] = round(first - t1, 2)
        out["restart_compact_s"] = b.compacted_s()
        time.sleep(1)
        out["rss_restored_mb"] = round(b.rss() / 2**20, 1)
        phase("restarted")

        def probe_with(prefix: str, key: str) -> None:
            """``probe`` fresh threads started and resumed, all the others waiting."""
            probes = [f"{prefix}{i}" for i in range(probe)]
            assert b.engine is not None
            cpu = cpu_seconds(b.engine.pid)
            tp = time.time()
            b.produce([(k, "new:scale-wait:null") for k in probes]
                      + [(k, json.dumps({"ref": "go", "value": 1})) for k in probes])
            got = watch.wait_for(s.result_topic, probes, timeout=3600)
            out[f"{key}_records_per_s"] = round(2 * probe / (max(got) - tp), 1)
            out[f"{key}_cpu_us_per_record"] = round(
                (cpu_seconds(b.engine.pid) - cpu) / (2 * probe) * 1e6, 1)

        probe_with("p", "probe")  # right after the restart: snaps still holds every row
        phase("probed")
        settled_s = b.settled_since(t1, timeout=1800)
        if settled_s is not None:  # the settler moved the restored rows out of snaps
            out["restart_to_settled_s"] = round(settled_s, 1)
            probe_with("q", "probe_settled")
            phase("probed once settled")

        rest = waiting[1:completions]
        tc = time.time()
        b.produce([(k, json.dumps({"ref": "go", "value": 1})) for k in rest])
        got = watch.wait_for(s.result_topic, rest, timeout=7200)
        out["completions_per_s"] = round(len(rest) / (max(got) - tc), 1)
        out["rss_after_completions_mb"] = round(b.rss() / 2**20, 1)
        phase("completed")
    finally:
        b.kill()
        watch.close()
    return out


def memory(n: int) -> dict[str, Any]:
    """In-process, RSS per thread: as a restart holds them (``_ThreadLogic`` keeping the
    snapshot's bytes), journal-only once decoded (``ThreadState.restore``, no instance), live, after evicting them all, and after
    ``malloc_trim``. Each measure adds objects while the earlier ones stay alive."""
    import ctypes
    import gc

    from kwf.journal import encode
    from kwf.testing import Engine
    from kwf.thread import ThreadState

    from kwf.config import Settings
    from kwf.engine.flow import _ThreadLogic, _Workers
    from kwf.registry import Registry

    one = Engine(workflows=[wait])
    one.send("m", "new:null")
    journal = one.journal("m")
    assert journal is not None
    blob = encode(journal)
    worker = _Workers(Registry([wait]), Settings()).get()
    gc.collect()
    start = base = rss_bytes(os.getpid())
    snaps = []
    for i in range(n):  # each thread's own bytes, as Bytewax unpickles them
        journal.thread = f"h{i:07d}"
        snaps.append((encode(journal), None, False))
    held = [_ThreadLogic(worker, snap) for snap in snaps]
    del snaps
    gc.collect()
    held_rss = rss_bytes(os.getpid())
    base = held_rss
    restored = [ThreadState.restore(blob, one.ctx) for _ in range(n)]
    for i, state in enumerate(restored):
        state.key = state.journal.thread = f"r{i:07d}"  # type: ignore[union-attr]
    journal_only = rss_bytes(os.getpid())
    eng = Engine(workflows=[wait], max_live=n + 1)
    for i in range(n):
        eng.send(f"m{i}", "new:null")
    eng._outputs.clear()  # noqa: SLF001 - the outputs and inputs lists are not thread state
    eng._inputs.clear()  # noqa: SLF001
    gc.collect()
    live = rss_bytes(os.getpid())
    eng.evict()
    gc.collect()
    evicted = rss_bytes(os.getpid())
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = rss_bytes(os.getpid())
    return {"threads": n, "restored_held_bytes_per_thread": round((held_rss - start) / n),
            "journal_only_bytes_per_thread": round((journal_only - base) / n),
            "live_bytes_per_thread": round((live - journal_only) / n),
            "after_evict_bytes_per_thread": round((evicted - journal_only) / n),
            "after_evict_and_trim_bytes_per_thread": round((trimmed - journal_only) / n)}


LOADER_SQL = """WITH max_epoch_snaps AS (
 SELECT step_id, state_key, MAX(snap_epoch) AS snap_epoch FROM snaps WHERE snap_epoch < ?1
 GROUP BY step_id, state_key)
 SELECT step_id, state_key, snap_epoch, ser_change FROM snaps
 JOIN max_epoch_snaps USING (step_id, state_key, snap_epoch)
 WHERE ?2 IS NULL OR ?3 IS NULL OR (step_id, state_key) > (?2, ?3)
 ORDER BY step_id, state_key LIMIT ?4"""
"""Bytewax 0.21.1's snapshot loader (``src/recovery.rs``, ``SerializedSnapshotLoader::select``)."""


def loader(rows: int, partitions: int, workdir: Path, index: bool = False) -> dict[str, Any]:
    """Bytewax's restart read, outside the engine: ``rows`` snapshots of 300 bytes spread over
    ``partitions`` tables, paged 1,000 rows at a time with its exact query (Python's SQLite,
    not the one bundled in Bytewax). ``index`` adds the best extra index we found."""
    total = pages = 0.0
    per = rows // partitions
    for p in range(partitions):
        db = sqlite3.connect(workdir / f"loader-{rows}-{partitions}-{p}-{index}.db")
        db.execute("CREATE TABLE snaps (step_id TEXT NOT NULL, state_key TEXT NOT NULL, "
                   "snap_epoch INTEGER NOT NULL, ser_change BLOB, "
                   "PRIMARY KEY (step_id, state_key, snap_epoch)) STRICT")
        db.executemany("INSERT INTO snaps VALUES (?, ?, ?, ?)",
                       (("kwf.thread.stateful_batch", f"t{p}-{i:08d}", 5, b"x" * 300)
                        for i in range(per)))
        if index:
            db.execute("CREATE INDEX snaps_by_epoch ON snaps (snap_epoch, step_id, state_key)")
            db.execute("ANALYZE")
        db.commit()
        cursor: tuple[str | None, str | None] = (None, None)
        start = time.perf_counter()
        while True:
            batch = db.execute(LOADER_SQL, (100, *cursor, 1000)).fetchall()
            pages += 1
            if not batch:
                break
            cursor = (batch[-1][0], batch[-1][1])
        total += time.perf_counter() - start
        db.close()
    return {"rows": rows, "partitions": partitions, "extra_index": index,
            "load_s": round(total, 2), "pages": int(pages)}


def main() -> None:
    from kwf.engine.recovery import partitions_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default=os.environ.get("KWF_BROKERS", "127.0.0.1:9092"))
    parser.add_argument("--sizes", default="10000,100000,1000000", help="'' for none")
    parser.add_argument("--partitions", default="auto",
                        help="recovery partitions: a number, or auto (from the thread count)")
    parser.add_argument("--probe", type=int, default=10_000)
    parser.add_argument("--memory", type=int, default=0, help="threads for the in-process measure")
    parser.add_argument("--loader", default="",
                        help="rows:partitions[,...]: time Bytewax's restart query alone")
    parser.add_argument("--completions", type=int, default=0,
                        help="resume at most this many waiting threads in phase 4 (0: all)")
    parser.add_argument("--workdir", default=None,
                        help="keep stores and engine logs here (default: a temporary directory)")
    parser.add_argument("--out", default="bench-scale.json")
    args = parser.parse_args()
    result: dict[str, Any] = {"uptime": subprocess.run(["uptime"], capture_output=True,
                                                        text=True).stdout.strip(), "sizes": []}
    if args.memory:
        result["memory"] = memory(args.memory)
        print(json.dumps(result["memory"]), flush=True)
    kept = args.workdir and contextlib.nullcontext(tempfile.mkdtemp(prefix="kwf-scale-",
                                                                    dir=args.workdir))
    with kept or tempfile.TemporaryDirectory(prefix="kwf-scale-") as tmp:
        for spec in filter(None, args.loader.split(",")):
            rows, parts = (int(x) for x in spec.split(":"))
            for index in (False, True):
                one = loader(rows, parts, Path(tmp), index)
                print(json.dumps(one), flush=True)
                result.setdefault("loader", []).append(one)
        for n in (int(x) for x in args.sizes.split(",") if x):
            parts = partitions_for(2 * n) if args.partitions == "auto" else int(args.partitions)
            def save(partial: dict[str, Any]) -> None:
                Path(args.out).write_text(json.dumps(
                    {**result, "sizes": [*result["sizes"], partial]}, indent=2))

            one = run_size(args.brokers, n, parts, args.probe, Path(tmp),
                           args.completions or None, save)
            one["uptime_after"] = subprocess.run(["uptime"], capture_output=True,
                                                 text=True).stdout.strip()
            print(json.dumps(one), flush=True)
            result["sizes"].append(one)
            Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""``kwf verify`` on a large recovery store: how long the deploy gate takes for N live threads.

The store is built quickly but for real: each thread is run by the core (``kwf.testing.Engine``,
the same ``ThreadState`` the engine uses) through a script of the example workflows that leaves
it in flight, and its journal is written into a recovery directory made by Bytewax's
``init_db_dir``, in Bytewax's own table (``snaps``: step ``kwf.thread.stateful_batch``, the key,
epoch 1, the pickled snapshot bytes), after one real engine run has written the execution and
frontier rows. ``tests/test_evolve_verify.py`` checks that a real engine resumes such a store.

Run: ``.venv/bin/python bench/verify.py [--threads 100000] [--jobs 2] [--store DIR]``
(an existing ``--store`` is verified again without being rebuilt).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

SCRIPTS: list[list[tuple[str, str | float]]] = [
    # [("send", value) | ("advance", seconds)], each leaving the thread in flight
    [("send", 'new:trip:{"timeoutMs": 5000}'), ("send", '{"ref": "0:2", "value": 1}'),
     ("send", '{"ref": "0:1", "value": 2}')],
    [("send", 'new:cart:{"abandonedCartTimeoutMS": 2000}'),
     ("send", '{"ref": "main", "value": {"type": "addToCart", "item": {"productId": "p1", '
              '"quantity": 2}}}'),
     ("send", '{"ref": "main", "value": {"type": "updateEmail", "email": "a@b.c"}}'),
     ("advance", 2.5)],
    [("send", 'new:order:{"orderId": "o1", "amount": 30, "timeoutS": 1, "retries": 3, '
              '"backoffS": 0.2}'), ("advance", 1.1), ("advance", 0.5)],
    [("send", 'new:approval:{"subject": "laptop", "approver": "alice", "escalateTo": "bob", '
              '"remindAfterS": 1, "escalateAfterS": 2}'),
     ("advance", 1.5), ("send", '{"ref": "decision", "value": {"approved": true, "by": "mallory"}}')],
]
THREAD_STEP = "kwf.thread.stateful_batch"


def journals(first: int, count: int) -> list[tuple[str, bytes]]:
    """Threads ``bench-<first>`` ... run through the scripts in turn: (key, snapshot bytes)."""
    from kwf.journal import encode
    from kwf.registry import load_modules
    from kwf.testing import Engine

    load_modules(["workflows"])
    out: list[tuple[str, bytes]] = []
    for i in range(first, first + count):
        key = f"bench-{i}"
        with Engine(max_live=0) as eng:  # one clock per thread: the scripts advance time
            for action, arg in SCRIPTS[i % len(SCRIPTS)]:
                if action == "send":
                    eng.send(key, str(arg))
                else:
                    eng.advance(float(arg))
            journal = eng.journal(key)
            assert journal is not None and not journal.finished, key
            out.append((key, encode(journal)))
    return out


def _build_shard(args: tuple[str, int, int, int]) -> int:
    store, shard, shards, threads = args
    per = -(-threads // shards)
    rows = journals(shard * per, max(0, min(per, threads - shard * per)))
    parts = sorted(Path(store).glob("part-*.sqlite3"))
    dbs = [sqlite3.connect(p, timeout=60) for p in parts]
    for key, data in rows:
        db = dbs[zlib.crc32(key.encode()) % len(dbs)]
        db.execute("INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) "
                   "VALUES (?, ?, 1, ?)", (THREAD_STEP, key, pickle.dumps(data)))
    for db in dbs:
        db.commit()
        db.close()
    return len(rows)


def build_store(store: Path, threads: int, partitions: int = 2, jobs: int = 2) -> None:
    """A recovery store holding ``threads`` in-flight example threads, as an engine would leave it."""
    from bytewax.recovery import init_db_dir

    from kwf.config import Settings
    from kwf.registry import Registry, load_modules
    from kwf.engine.flow import run_flow

    store.mkdir(parents=True, exist_ok=True)
    init_db_dir(store, partitions)
    load_modules(["workflows"])
    settings = Settings()
    # One real run: Bytewax writes its execution, frontier and commit rows, which a resume needs.
    run_flow([(settings.resume_topic, "bench-seed", "cancel:")], workflows=Registry().workflows.values(),
             recovery_dir=store)
    shards = [(str(store), shard, jobs, threads) for shard in range(jobs)]
    if jobs == 1:
        _build_shard(shards[0])
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        pool.map(_build_shard, shards)


def main() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--store", type=Path, help="reuse (or create) this recovery directory")
    args = parser.parse_args()
    store = args.store or Path(tempfile.mkdtemp(prefix="kwf-bench-verify-")) / "recovery"
    if not (store / "part-0.sqlite3").exists():
        began = time.perf_counter()
        build_store(store, args.threads, jobs=args.jobs)
        print(f"built {args.threads} threads in {store} in {time.perf_counter() - began:.1f} s")
    size = sum(p.stat().st_size for p in store.glob("part-*"))
    print(f"store: {size / 1e6:.1f} MB")
    kwf = [str(Path(sys.executable).with_name("kwf"))]
    began, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([*kwf, "verify", "--recovery", str(store), "--jobs", str(args.jobs)],
                          env={**os.environ, "KWF_WORKFLOWS": "workflows"}, check=False)
    took, after = time.perf_counter() - began, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(f"kwf verify: exit {done.returncode}, {took:.1f} s wall for the store "
          f"({args.jobs} processes), {cpu_s:.1f} s of CPU: {cpu_s / args.jobs:.1f} s on "
          f"{args.jobs} idle cores")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(json.dumps({"threads": args.threads, "jobs": args.jobs, "verify_s": round(took, 2),
                      "cpu_s": round(cpu_s, 2), "exit": done.returncode}))


if __name__ == "__main__":
    main()

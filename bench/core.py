"""Benchmark of the workflow core on one core: steps per second and bytes per suspended workflow.

Run: ``.venv/bin/python bench/core.py [--threads N]``. It drives ``ThreadState`` through
``protocol.parse`` exactly as the dataflow does per record (no Kafka, no Bytewax), live and with
the instance rebuilt by replay before every event, and prints one line per measurement: steps
per wall-clock second, then per second of this process's CPU (``time.process_time``), which a
machine shared with other work disturbs less, and the ``uptime`` load.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
import tracemalloc
from dataclasses import replace

import kwf
from kwf.config import ENGINE_GC_THRESHOLDS, Settings
from kwf.journal import encode
from kwf.protocol import Incoming, parse
from kwf.registry import Registry
from kwf.thread import Context, ThreadState

kwf.config.output_topics |= {"bench-reserve", "bench-cancel", "bench-out"}


async def _reserve(kind: str) -> dict:
    ref = kwf.suspend()
    kwf.output(ref.id, "bench-reserve")
    try:
        await ref
    except asyncio.CancelledError:
        kwf.output(ref.id, "bench-cancel")
        raise
    return {"id": ref.id}


@kwf.workflow("bench-saga")
async def saga(arg: dict) -> dict:
    async def timeout() -> None:
        await asyncio.sleep(3600)
        raise TimeoutError("timeout")

    car, hotel, flight = await kwf.race([
        kwf.all([_reserve("car"), _reserve("hotel"), _reserve("flight")]), timeout()])
    return {"car": car, "hotel": hotel, "flight": flight}


@kwf.workflow("bench-seq")
async def sequential(arg: dict) -> int:
    total = 0
    for _ in range(10):
        ref = kwf.suspend()
        kwf.output(ref.id, "bench-out")
        total += await ref
    return total


def _offset(round_: int, thread: int, n_threads: int) -> int:
    """The offset of a thread's record in a round, the threads interleaved in one partition."""
    return round_ * n_threads + thread


def _records(workflow: str, n_threads: int) -> list[tuple[str, list[str]]]:
    """Per thread: the start record and the resumes that drive it to the end (suspend ids are
    ``<offset of the record that made them>:<n>``)."""
    plan = []
    for t in range(n_threads):
        if workflow == "bench-saga":
            refs = [f"{_offset(0, t, n_threads)}:{i}" for i in (1, 2, 3)]
        else:
            refs = [f"{_offset(r, t, n_threads)}:1" for r in range(10)]
        resumes = [json.dumps({"ref": ref, "value": 1}) for ref in refs]
        plan.append((f"{workflow}-{t}", [f"new:{workflow}:{{}}", *resumes]))
    return plan


def steps_per_second(workflow: str, n_threads: int, max_live: int) -> float:
    """Steps per wall-clock second (``steps_per_cpu_second`` gives both)."""
    return steps_per_cpu_second(workflow, n_threads, max_live)[0]


def steps_per_cpu_second(workflow: str, n_threads: int, max_live: int) -> tuple[float, float]:
    """(steps per wall-clock second, steps per second of this process's CPU)."""
    settings = replace(Settings(), max_live=max_live)
    registry = Registry([saga, sequential])
    ctx = Context(registry, settings)
    threads: dict[str, ThreadState] = {}
    plan = _records(workflow, n_threads)
    steps = 0
    started, cpu = time.perf_counter(), time.process_time()
    for round_ in range(len(plan[0][1])):  # interleave threads, as a topic would
        for t, (key, values) in enumerate(plan):
            rec = Incoming("workflow-resume", key, values[round_], 1000.0 + round_, 0,
                           _offset(round_, t, n_threads))
            key, command = parse(rec, settings, registry)
            state = threads.get(key) or threads.setdefault(key, ThreadState(key, ctx))
            state.on_command(rec, command)
            steps += 1
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if not all(s.journal is not None and s.journal.finished for s in threads.values()):
        msg = "a thread did not finish: its records do not match its suspend ids"
        raise AssertionError(msg)
    for state in threads.values():
        state.evict()
    return steps / elapsed, steps / cpu


def bytes_per_suspended(workflow: str, n_threads: int) -> tuple[float, float]:
    """(journal bytes, live bytes) per thread suspended after its first resume."""
    settings, registry = Settings(max_live=n_threads), Registry([saga, sequential])
    ctx = Context(registry, settings)
    plan = _records(workflow, n_threads)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    threads = []
    for t, (key, values) in enumerate(plan):
        state = ThreadState(key, ctx)
        for round_, value in enumerate(values[:2]):
            rec = Incoming("workflow-resume", key, value, 1000.0, 0, _offset(round_, t, n_threads))
            state.on_command(rec, parse(rec, settings, registry)[1])
        threads.append(state)
    gc.collect()
    live = (tracemalloc.get_traced_memory()[0] - base) / n_threads
    tracemalloc.stop()
    journal = sum(len(encode(s.journal)) for s in threads) / n_threads
    for state in threads:
        state.evict()
    return journal, live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2000)
    parser.add_argument("--gc", choices=["default", "engine"], default="engine",
                        help="'engine': the GC thresholds the dataflow sets (ENGINE_GC_THRESHOLDS)")
    parser.add_argument("--metrics", action="store_true",
                        help="count into kwf's Prometheus metrics, as the engine does")
    args = parser.parse_args()
    if args.metrics:
        from kwf.engine import metrics

        metrics.install()
    if args.gc == "engine":
        gc.set_threshold(*ENGINE_GC_THRESHOLDS)
    print(f"gc thresholds {gc.get_threshold()}, {args.threads} threads interleaved, "
          f"metrics {'on' if args.metrics else 'off'}, load {os.getloadavg()[0]:.2f}")
    for workflow in ("bench-saga", "bench-seq"):
        live, live_cpu = steps_per_cpu_second(workflow, args.threads, max_live=args.threads)
        replay, replay_cpu = steps_per_cpu_second(workflow, max(args.threads // 10, 50),
                                                  max_live=0)
        journal, resident = bytes_per_suspended(workflow, args.threads)
        print(f"{workflow:11} live: {live:7,.0f} steps/s ({live_cpu:7,.0f}/CPU s)   replay "
              f"every event: {replay:6,.0f} steps/s ({replay_cpu:6,.0f}/CPU s)   journal: "
              f"{journal:4,.0f} B   live: {resident:6,.0f} B per suspended thread")


if __name__ == "__main__":
    main()

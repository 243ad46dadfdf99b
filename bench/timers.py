"""Timer lateness under load, per Kafka input batch size: the number behind ``KWF_BATCH_SIZE``.

Bytewax checks due timers only between activations, so a timer is late by about the time the
engine takes to process one input batch. This runs the real engine (``python -m bytewax.run
dataflow``, recovery on, ``-s 1`` unless ``--snapshot-interval``) on a real broker, for each batch size: a backlog of signal
records keeps it busy (each step writes a user record and a status record), while sleeper
threads' timers fall due during the backlog and after it. It prints, per batch size, the
throughput and how late the sleepers' results arrived (arrival at a consumer minus due time,
so a few ms of produce/consume latency are included).

Run: ``kwf kafka start`` then ``.venv/bin/python bench/timers.py [--brokers 127.0.0.1:9092]
[--batch-sizes 1,10,100,1000] [--records 200000]``. This module is also the engine's workflow
module in the subprocess (``KWF_WORKFLOWS=timers``), so the benchmark runs only under __main__.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import kwf

WORK_TOPIC = os.environ.get("KWF_BENCH_WORK_TOPIC", "bench-work-out")
kwf.config.output_topics |= {WORK_TOPIC}


@kwf.workflow("bench-sleep")
async def sleep_until(arg: dict[str, Any]) -> float:
    """Sleep until the absolute time ``arg["at"]`` (a durable timer), then return it."""
    await asyncio.sleep(max(0.0, float(arg["at"]) - kwf.now().timestamp()))
    return float(arg["at"])


@kwf.workflow("bench-work")
async def work(arg: Any) -> int:
    """One step per signal, each writing a record, until ``stop``."""
    n = 0
    while True:
        if await kwf.suspend("w") == "stop":
            return n
        n += 1
        kwf.output_json({"n": n}, WORK_TOPIC)


def _quantiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return (f"p50 {statistics.median(values) * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms  "
            f"max {values[-1] * 1000:7.1f} ms  (n={len(values)})")


def run_once(brokers: str, batch_size: int, records: int, threads: int, sleepers: int,
             partitions: int, snapshot_s: int = 1) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    from kwf.config import Settings
    from kwf.engine.admin import create_topics

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "KWF_BROKERS": brokers, "KWF_WORKFLOWS": "timers",
           "KWF_BATCH_SIZE": str(batch_size), "KWF_BENCH_WORK_TOPIC": f"{prefix}-work",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          str(Path(__file__).parent.parent)]),
           **{f"KWF_{n.upper()}_TOPIC": f"{prefix}-{n}"
              for n in ("resume", "scheduler", "result", "error", "events", "dlq")}}
    settings = Settings.from_env(env)
    conf = {"bootstrap.servers": brokers}
    create_topics(conf, [*settings.engine_topics, f"{prefix}-work"], partitions, 1)
    producer = Producer({**conf, "linger.ms": "20", "partitioner": "murmur2_random"})

    rounds = max(1, records // threads)
    t0 = time.time()
    # Sleepers due from 12 s on, every 0.1 s: most during the backlog, the last ones after it.
    dues = {f"sleep-{i}": t0 + 12 + i * 0.1 for i in range(sleepers)}
    for key, at in dues.items():
        producer.produce(settings.resume_topic, key=key, value=f"new:bench-sleep:{json.dumps({'at': at})}")
    for i in range(threads):
        producer.produce(settings.resume_topic, key=f"work-{i}", value="new:bench-work:{}")
    for r in range(rounds + 1):
        value = json.dumps({"ref": "w", "value": "stop" if r == rounds else r})
        for i in range(threads):
            while True:
                try:
                    producer.produce(settings.resume_topic, key=f"work-{i}", value=value)
                    break
                except BufferError:  # the local queue is full: wait for deliveries
                    producer.poll(0.05)
    producer.flush()
    total = sleepers + threads * (rounds + 2)

    consumer = Consumer({**conf, "group.id": prefix, "enable.auto.commit": "false"})
    consumer.assign([TopicPartition(settings.result_topic, p, OFFSET_BEGINNING)
                     for p in range(partitions)])
    with tempfile.TemporaryDirectory() as rec:
        subprocess.run([sys.executable, "-m", "bytewax.recovery", rec, "1"], check=True, env=env)
        engine = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "dataflow", "-r", rec, "-s", str(snapshot_s), "-b", "0"],
            cwd=Path(__file__).parent.parent, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        late: dict[str, float] = {}
        work_done: list[float] = []
        deadline = time.monotonic() + 600
        try:
            while (len(late) < sleepers or len(work_done) < threads) and time.monotonic() < deadline:
                msg = consumer.poll(0.05)  # returns on the first record: no added latency
                if msg is None or msg.error():
                    continue
                arrived, key = time.time(), msg.key().decode()
                if key in dues:
                    late[key] = arrived - dues[key]
                else:
                    work_done.append(arrived)
        finally:
            engine.kill()
            engine.wait()
            consumer.close()
    if not work_done:
        print(f"batch_size={batch_size}: no result within the deadline")
        return
    busy_until = max(work_done)
    busy = [v for k, v in late.items() if dues[k] < busy_until]
    idle = [v for k, v in late.items() if dues[k] >= busy_until]
    print(f"batch_size={batch_size:5d} -s {snapshot_s}  {total} records in {busy_until - t0:5.1f} s "
          f"({total / (busy_until - t0 - 0):6.0f}/s incl. startup)\n"
          f"    timers due under load: {_quantiles(busy)}\n"
          f"    timers due when idle:  {_quantiles(idle)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default=os.environ.get("KWF_BROKERS", "127.0.0.1:9092"))
    parser.add_argument("--batch-sizes", default="1,10,100,1000")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=2000)
    parser.add_argument("--sleepers", type=int, default=250)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--snapshot-interval", type=int, default=1, help="bytewax.run -s")
    args = parser.parse_args()
    for size in (int(s) for s in args.batch_sizes.split(",")):
        run_once(args.brokers, size, args.records, args.threads, args.sleepers, args.partitions,
                 args.snapshot_interval)


if __name__ == "__main__":
    main()

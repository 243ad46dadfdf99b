"""Timer lateness under load: how late durable timers fire while the engine works.

Bytewax checks due timers only between activations, so a timer is late by about the time the
engine takes to process one input batch, plus the input clock's look at Kafka (a timer fires
once every input partition has been read up to its due time). This runs the real engine
(``python -m bytewax.run dataflow``, recovery on, ``-s 1`` unless ``--snapshot-interval``; ``-w``
workers, in one process or ``--processes`` of a local cluster) on a real broker, for each
batch size: signal records keep it busy (each step writes a user record and a status record),
either as a backlog written up front or, with ``--rate``, paced at that many records/s (the
engine keeping up), while sleeper threads' timers fall due. It prints, per batch size, the
throughput and how late the sleepers' results arrived (arrival at a consumer minus due time,
so the firing's trip through ``workflow-resume`` and the result's to the consumer, two Kafka
hops, are included), p50/p95/p99/max.

Run: ``kwf kafka start`` then ``.venv/bin/python bench/timers.py [--brokers 127.0.0.1:9092]
[--batch-sizes 1,10,100,1000] [--records 200000] [--rate 2000] [--workers 2] [--processes 2
--cluster-port 21100]``. This module is also the engine's workflow module in the subprocess
(``KWF_WORKFLOWS=timers``), so the benchmark runs only under __main__.
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
import threading
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

    def q(x: float) -> float:
        return values[min(len(values) - 1, int(len(values) * x))] * 1000

    return (f"p50 {statistics.median(values) * 1000:7.1f} ms  p95 {q(0.95):7.1f} ms  "
            f"p99 {q(0.99):7.1f} ms  max {values[-1] * 1000:7.1f} ms  (n={len(values)})")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _engines(env: dict[str, str], rec: Path, snapshot_s: int, workers: int, processes: int,
             port: int) -> list[subprocess.Popen[bytes]]:
    """The engine: one process, or ``processes`` forming a local cluster on ``port``+i, each
    with its own recovery partitions (as one volume per pod)."""
    parts = workers * processes
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(rec), str(parts)], check=True,
                   env=env)
    addresses = ";".join(f"127.0.0.1:{port + i}" for i in range(processes))
    procs = []
    for i in range(processes):
        own = rec / f"proc-{i}"
        own.mkdir()
        for j in range(i * workers, (i + 1) * workers):
            for f in rec.glob(f"part-{j}.sqlite3*"):
                f.rename(own / f.name)
        cluster = ["-i", str(i), "-a", addresses] if processes > 1 else []
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "dataflow", "-r", str(own), "-s",
             str(snapshot_s), "-b", "0", "-w", str(workers), *cluster],
            cwd=Path(__file__).parent.parent, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
    return procs


def run_once(brokers: str, batch_size: int, records: int, threads: int, sleepers: int,
             partitions: int, snapshot_s: int = 1, rate: float = 0.0, workers: int = 1,
             processes: int = 1, port: int = 21100) -> None:
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
    # Sleepers due from 12 s on, every 0.1 s: most during the work, the last ones after it.
    dues = {f"sleep-{i}": t0 + 12 + i * 0.1 for i in range(sleepers)}
    for key, at in dues.items():
        producer.produce(settings.resume_topic, key=key, value=f"new:bench-sleep:{json.dumps({'at': at})}")
    for i in range(threads):
        producer.produce(settings.resume_topic, key=f"work-{i}", value="new:bench-work:{}")
    producer.flush()
    total = sleepers + threads * (rounds + 2)

    def signals() -> None:
        """The work: as a backlog at once, or paced at ``rate`` records/s from now."""
        started, sent = time.monotonic(), 0
        for r in range(rounds + 1):
            value = json.dumps({"ref": "w", "value": "stop" if r == rounds else r})
            for i in range(threads):
                if rate > 0 and sent % 10 == 0:  # evenly, not in bursts of a round
                    time.sleep(max(0.0, started + sent / rate - time.monotonic()))
                sent += 1
                while True:
                    try:
                        producer.produce(settings.resume_topic, key=f"work-{i}", value=value)
                        break
                    except BufferError:  # the local queue is full: wait for deliveries
                        producer.poll(0.05)
            producer.poll(0)
        producer.flush()

    if rate <= 0:
        signals()
    consumer = Consumer({**conf, "group.id": prefix, "enable.auto.commit": "false"})
    consumer.assign([TopicPartition(settings.result_topic, p, OFFSET_BEGINNING)
                     for p in range(partitions)])
    with tempfile.TemporaryDirectory() as rec:
        engines = _engines(env, Path(rec), snapshot_s, workers, processes, port)
        pacer = threading.Thread(target=signals, daemon=True) if rate > 0 else None
        if pacer is not None:
            pacer.start()
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
            for engine in engines:
                engine.kill()
                engine.wait()
            consumer.close()
    if not work_done:
        print(f"batch_size={batch_size}: no result within the deadline")
        return
    busy_until = max(work_done)
    busy = [v for k, v in late.items() if dues[k] < busy_until]
    idle = [v for k, v in late.items() if dues[k] >= busy_until]
    how = f"-w {workers}" + (f" x {processes} processes" if processes > 1 else "")
    print(f"batch_size={batch_size:5d} -s {snapshot_s} {how} "
          f"{'rate ' + str(rate) + '/s' if rate > 0 else 'backlog'}  {total} records in "
          f"{busy_until - t0:5.1f} s "
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
    parser.add_argument("--rate", type=float, default=0.0,
                        help="signal records/s (0: all at once, a backlog)")
    parser.add_argument("--workers", type=int, default=1, help="bytewax.run -w")
    parser.add_argument("--processes", type=int, default=1, help="a local cluster of this many")
    parser.add_argument("--cluster-port", type=int, default=21100,
                        help="the cluster's first port (-a 127.0.0.1:P;127.0.0.1:P+1...)")
    args = parser.parse_args()
    print(_uptime(), flush=True)
    for size in (int(s) for s in args.batch_sizes.split(",")):
        run_once(args.brokers, size, args.records, args.threads, args.sleepers, args.partitions,
                 args.snapshot_interval, args.rate, args.workers, args.processes,
                 args.cluster_port)
        print(_uptime(), flush=True)


if __name__ == "__main__":
    main()

"""End-to-end benchmark on Kafka: the engine as documented, a replier service, a plain driver.

Shapes (the same as ``/work/shared/peers/restate``'s, for a side-by-side table):

- ``seq10``: 10 sequential request/replies; each step is a Kafka round trip to a replier
  process (request record -> replier -> ``workflow-resume``), N workflows started at once.
- ``saga``: 3 external replies; the workflow writes an output, the driver answers it, and the
  time from the reply's send to the workflow's next output (or result) is measured.

For each shape and N it prints wf/s, steps/s, start -> result p50/p99, reply -> next output
p50/p99 (saga), and the CPU the engine and the broker used (and engine CPU per applied record:
records read from ``workflow-resume``), with ``uptime``; ``--json`` writes all of it. First it
measures the *Kafka floor* in the same sitting: one record produced and read by another plain
client, one at a time (p50/p99 of that hop), so that the table says what the engine adds over
Kafka itself: seq10 start -> result is 22 such hops (start, two per step through the replier,
result), a saga's reply -> next output two (driver -> engine -> driver).

The replier and the driver are the user's clients: they produce with ``linger.ms=0`` (send at
once; librdkafka's 5 ms default would add 5 ms to every hop, and even 1 ms costs about 1.5 ms).

Run: ``.venv/bin/python bench/e2e.py [--brokers 127.0.0.1:19392] [--broker-home DIR]
[--ns 1,500,2000] [--shapes seq10,saga] [--json result.json]``. With ``--broker-home`` a
``kwf.kafka.LocalBroker`` there is started if needed and its CPU measured. The engine runs as
the README documents it: ``python -m bytewax.run dataflow -r DIR -s 1 -b 0``, 1 worker,
default batch size, 3 partitions. This module is also the engine's workflow module
(``KWF_WORKFLOWS=e2e``) and the replier (``--replier``).
"""

from __future__ import annotations

import argparse
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

REQ = os.environ.get("KWF_E2E_REQ", "e2e-req")
OUT = os.environ.get("KWF_E2E_OUT", "e2e-out")
kwf.config.output_topics |= {REQ, OUT}
STEPS = {"seq10": 10, "saga": 3}
HOPS = {"seq10": 22, "saga": 2}
"""Kafka hops in what is timed: seq10 start -> result (start, 10 round trips to the replier,
result), a saga's reply -> next output."""
CLIENT_PRODUCER = {"linger.ms": "0", "partitioner": "murmur2_random"}
"""The replier's and the driver's producers (and the floor's): send each record at once."""


@kwf.workflow("e2e-seq10")
async def seq10(arg: Any) -> int:
    """Ten request/replies in sequence through the replier service."""
    for _ in range(10):
        ref = kwf.suspend()
        kwf.output(ref.id, REQ)
        await ref
    return 10


@kwf.workflow("e2e-saga")
async def saga(arg: Any) -> int:
    """Three external replies on the channel ``r``; an output before each wait."""
    for i in range(3):
        kwf.output(str(i), OUT)
        await kwf.suspend("r")
    return 3


# -- the replier service -------------------------------------------------------------------------

def replier(brokers: str, req: str, resume: str) -> None:
    """Answer every request record at once: ``{"ref": <request value>, "value": 1}``."""
    from confluent_kafka import Consumer, Producer

    from kwf.service import assign_at_end

    conf = {"bootstrap.servers": brokers}
    consumer = Consumer({**conf, "group.id": f"e2e-replier-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": "false"})
    assign_at_end(consumer, [req])
    producer = Producer({**conf, **CLIENT_PRODUCER})
    print("ready", flush=True)
    while True:
        first = consumer.poll(0.05)  # returns at the first record (consume waits for all 1000)
        for msg in [first, *consumer.consume(1000, 0)] if first is not None else []:
            if msg.error() is None:
                ref = msg.value().decode()
                producer.produce(resume, key=msg.key(), value=f'{{"ref": "{ref}", "value": 1}}')
        producer.poll(0)


# -- measuring -----------------------------------------------------------------------------------

def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` (and its threads) so far, from /proc."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] * 1000


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


class Bench:
    def __init__(self, brokers: str, prefix: str, partitions: int) -> None:
        from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

        from kwf.config import Settings
        from kwf.engine.admin import create_topics

        self.brokers, self.prefix = brokers, prefix
        self.env = {**os.environ, "KWF_BROKERS": brokers, "KWF_WORKFLOWS": "e2e",
                    "KWF_E2E_REQ": f"{prefix}-req", "KWF_E2E_OUT": f"{prefix}-out",
                    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                   str(Path(__file__).parent.parent)]),
                    **{f"KWF_{n.upper()}_TOPIC": f"{prefix}-{n}"
                       for n in ("resume", "scheduler", "result", "error", "events", "dlq")}}
        self.settings = Settings.from_env(self.env)
        conf = {"bootstrap.servers": brokers}
        self.ping_topic = f"{prefix}-ping"
        create_topics(conf, [*self.settings.engine_topics, f"{prefix}-req", f"{prefix}-out",
                             self.ping_topic], partitions, 1,
                      compacted={self.settings.events_topic})
        self.producer = Producer({**conf, **CLIENT_PRODUCER})
        self.consumer = Consumer({**conf, "group.id": f"{prefix}-driver",
                                  "enable.auto.commit": "false"})
        self.consumer.assign([TopicPartition(t, p, OFFSET_END)
                              for t in (self.settings.result_topic, f"{prefix}-out")
                              for p in range(partitions)])

    def floor(self, pings: int) -> dict[str, Any]:
        """One Kafka hop with plain clients: produce one record, read it with another client,
        ``pings`` times one after the other (keys spread over the partitions)."""
        from confluent_kafka import Consumer

        from kwf.service import assign_at_end

        consumer = Consumer({"bootstrap.servers": self.brokers, "group.id": f"{self.prefix}-ping",
                             "enable.auto.commit": "false"})
        assign_at_end(consumer, [self.ping_topic])
        hops: list[float] = []
        try:
            for i in range(pings + 10):  # the first 10 warm up the connections
                sent = time.perf_counter()
                self.producer.produce(self.ping_topic, key=str(i), value=b"ping")
                self.producer.poll(0)
                while (msg := consumer.poll(5.0)) is not None and msg.error() is not None:
                    pass
                if msg is None:
                    msg = f"the floor's ping {i} did not come back within 5 s"
                    raise RuntimeError(msg)
                if i >= 10:
                    hops.append(time.perf_counter() - sent)
                time.sleep(0.002)
        finally:
            consumer.close()
        return {"pings": len(hops), "hop_p50_ms": round(_q(hops, 0.5), 2),
                "hop_p99_ms": round(_q(hops, 0.99), 2), "uptime": _uptime()}

    def send(self, key: str, value: str) -> None:
        while True:
            try:
                self.producer.produce(self.settings.resume_topic, key=key, value=value)
                self.producer.poll(0)
                return
            except BufferError:
                self.producer.poll(0.01)

    def run(self, shape: str, n: int, run_id: str, engine: int | None,
            broker: int | None, timeout: float) -> dict[str, Any]:
        keys = [f"{run_id}-{i}" for i in range(n)]
        started: dict[str, float] = {}
        done: dict[str, float] = {}
        replied: dict[str, float] = {}
        reply_lat: list[float] = []
        cpu0, bcpu0, t0 = _cpu_s(engine), _cpu_s(broker), time.time()
        for key in keys:
            started[key] = time.time()
            self.send(key, f"new:e2e-{shape}:{{}}")
        self.producer.flush(30)
        result_topic, out_topic = self.settings.result_topic, f"{self.prefix}-out"
        deadline = time.monotonic() + timeout
        while len(done) < n and time.monotonic() < deadline:
            first = self.consumer.poll(0.05)
            for msg in [first, *self.consumer.consume(1000, 0)] if first is not None else []:
                if msg.error() is not None:
                    continue
                now, key = time.time(), msg.key().decode()
                if key not in started:
                    continue
                if key in replied:
                    reply_lat.append(now - replied.pop(key))
                if msg.topic() == result_topic:
                    done[key] = now
                elif msg.topic() == out_topic:
                    replied[key] = time.time()
                    self.send(key, '{"ref": "r", "value": 1}')
        cpu, bcpu, wall = _cpu_s(engine) - cpu0, _cpu_s(broker) - bcpu0, time.time() - t0
        span = (max(done.values()) - min(started.values())) if done else float("nan")
        lat = [done[k] - started[k] for k in done]
        applied = len(done) * (1 + STEPS[shape])  # records read from workflow-resume
        return {
            "shape": shape, "n": n, "completed": len(done), "seconds": round(span, 3),
            "wf_per_s": round(len(done) / span, 1) if done else 0.0,
            "steps_per_s": round(len(done) * STEPS[shape] / span, 1) if done else 0.0,
            "start_result_p50_ms": round(_q(lat, 0.5), 1),
            "start_result_p99_ms": round(_q(lat, 0.99), 1),
            "reply_next_p50_ms": round(_q(reply_lat, 0.5), 2),
            "reply_next_p99_ms": round(_q(reply_lat, 0.99), 2),
            "engine_cpu_s": round(cpu, 2), "engine_cores": round(cpu / wall, 2),
            "engine_us_per_record": round(cpu / applied * 1e6, 1) if applied else None,
            "broker_cpu_s": round(bcpu, 2), "broker_cores": round(bcpu / wall, 2),
            "uptime": _uptime(),
        }

    def single(self, shape: str, reps: int, run_id: str, engine: int | None,
               broker: int | None) -> dict[str, Any]:
        """One workflow at a time, ``reps`` times: latency alone."""
        rows = [self.run(shape, 1, f"{run_id}-{i}", engine, broker, 30) for i in range(reps)]
        lat = [r["start_result_p50_ms"] for r in rows]
        reply = [r["reply_next_p50_ms"] for r in rows if r["reply_next_p50_ms"] == r["reply_next_p50_ms"]]
        return {"shape": shape, "n": 1, "reps": reps, "completed": sum(r["completed"] for r in rows),
                "start_result_p50_ms": round(statistics.median(lat), 1),
                "start_result_p99_ms": round(max(lat), 1),
                "reply_next_p50_ms": round(statistics.median(reply), 2) if reply else None,
                "reply_next_p99_ms": round(max(reply), 2) if reply else None,
                "uptime": _uptime()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--brokers", default="127.0.0.1:19392")
    ap.add_argument("--broker-home", help="a kwf.kafka.LocalBroker home: started if needed")
    ap.add_argument("--ns", default="1,500,2000")
    ap.add_argument("--shapes", default="seq10,saga")
    ap.add_argument("--reps", type=int, default=20, help="runs of one workflow alone")
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--snapshot-interval", default="1")
    ap.add_argument("--idle-s", type=float, default=5.0, help="idle CPU measured this long")
    ap.add_argument("--pings", type=int, default=300, help="Kafka floor: hops measured")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", help="py-spy the engine during the loaded runs: collapsed "
                                      "stacks to this file, top functions printed (on-CPU "
                                      "samples; with --profile-idle waits too)")
    ap.add_argument("--profile-idle", action="store_true",
                    help="--profile also samples the engine while it waits")
    ap.add_argument("--profile-native", action="store_true",
                    help="--profile also samples native frames (Bytewax's Rust, SQLite, "
                         "librdkafka calls)")
    ap.add_argument("--replier", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prefix = os.environ.get("KWF_E2E_PREFIX", f"e2e-{uuid.uuid4().hex[:8]}")
    if args.replier:
        replier(args.brokers, f"{prefix}-req", f"{prefix}-resume")
        return

    broker_pid = None
    if args.broker_home:
        from kwf.kafka import LocalBroker

        port = int(args.brokers.rsplit(":", 1)[1])
        status = LocalBroker(home=Path(args.broker_home), port=port,
                             controller_port=port + 1).start()
        broker_pid = status.pid
    bench = Bench(args.brokers, prefix, args.partitions)
    env = {**bench.env, "KWF_E2E_PREFIX": prefix}
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": f"{os.cpu_count()} cores, {os.uname().machine}",
                               "uptime_before": _uptime(), "workers": args.workers,
                               "batch_size": bench.settings.batch_size,
                               "partitions": args.partitions, "runs": []}
    log = Path(tempfile.gettempdir()) / f"{prefix}-engine.log"
    print(f"engine log: {log}", flush=True)
    with tempfile.TemporaryDirectory() as rec, log.open("wb") as out:
        subprocess.run([sys.executable, "-m", "bytewax.recovery", rec, "1"], check=True, env=env)
        engine = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "dataflow", "-r", rec, "-s",
             args.snapshot_interval, "-b", "0", "-w", str(args.workers)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
        rep = subprocess.Popen([sys.executable, __file__, "--replier", "--brokers", args.brokers],
                               env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert rep.stdout is not None and rep.stdout.readline().strip() == "ready"
            warm = bench.run("seq10", 1, "warm", engine.pid, broker_pid, 120)
            assert warm["completed"] == 1, "the engine did not answer within 120 s"
            time.sleep(1)
            c0, t0 = _cpu_s(engine.pid), time.time()
            time.sleep(args.idle_s)
            idle = (_cpu_s(engine.pid) - c0) / (time.time() - t0)
            results["idle_engine_cores"] = round(idle, 3)
            print(f"idle engine: {idle * 100:.1f}% of a core   ({_uptime()})", flush=True)
            results["kafka_floor"] = floor = bench.floor(args.pings)
            print(f"Kafka floor: one hop p50 {floor['hop_p50_ms']} ms, p99 {floor['hop_p99_ms']} "
                  f"ms   ({floor['uptime']})", flush=True)
            spy = None
            if args.profile:
                spy_cmd = ["py-spy", "record", "--pid", str(engine.pid), "-r", "250", "--format",
                           "raw", "-o", args.profile, *(["--idle"] if args.profile_idle else []),
                           *(["--native"] if args.profile_native else [])]
                spy = subprocess.Popen(spy_cmd,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for shape in args.shapes.split(","):
                for n in (int(x) for x in args.ns.split(",")):
                    if n == 1:
                        row = bench.single(shape, args.reps, f"{shape}-1", engine.pid, broker_pid)
                    else:
                        row = bench.run(shape, n, f"{shape}-{n}", engine.pid, broker_pid, 600)
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    time.sleep(2)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
                results["profile_top"] = _top(Path(args.profile))
        finally:
            rep.kill()
            engine.terminate()
            engine.wait(30)
    results["uptime_after"] = _uptime()
    _table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _top(collapsed: Path, n: int = 15) -> list[tuple[str, float]]:
    """The functions the engine spent most samples in (self time), from py-spy's raw output."""
    self_: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        self_[leaf] = self_.get(leaf, 0) + int(count)
        total += int(count)
    top = sorted(self_.items(), key=lambda kv: -kv[1])[:n]
    print(f"\nengine profile: {total} samples; top self time")
    for name, count in top:
        print(f"  {count / total * 100:5.1f}%  {name}")
    return [(name, round(count / total * 100, 1)) for name, count in top]


def _table(results: dict[str, Any]) -> None:
    print(f"\n{results['date']}  {results['machine']}  workers={results['workers']} "
          f"batch={results['batch_size']} partitions={results['partitions']}")
    print(f"idle engine {results.get('idle_engine_cores', 0) * 100:.1f}% of a core")
    floor = results.get("kafka_floor")
    if floor:
        hop = floor["hop_p50_ms"]
        print(f"Kafka floor (plain clients, same sitting): one hop p50 {hop} / p99 "
              f"{floor['hop_p99_ms']} ms; seq10 start -> result is {HOPS['seq10']} hops "
              f"(p50 floor {hop * HOPS['seq10']:.0f} ms), saga reply -> next {HOPS['saga']} hops "
              f"({hop * HOPS['saga']:.1f} ms)")
    print(f"{'shape':6} {'N':>5} {'wf/s':>8} {'steps/s':>9} {'start->result p50/p99 ms':>26} "
          f"{'reply->next p50/p99 ms':>24} {'engine cores':>12} {'us/rec':>7} {'broker cores':>12}")
    for r in results["runs"]:
        print(f"{r['shape']:6} {r['n']:>5} {r.get('wf_per_s', ''):>8} {r.get('steps_per_s', ''):>9} "
              f"{r['start_result_p50_ms']:>12} / {r['start_result_p99_ms']:<11} "
              f"{r['reply_next_p50_ms']!s:>10} / {r['reply_next_p99_ms']!s:<11} "
              f"{r.get('engine_cores', ''):>12} {r.get('engine_us_per_record', '')!s:>7} "
              f"{r.get('broker_cores', ''):>12}")
    print(results["uptime_after"])


if __name__ == "__main__":
    main()

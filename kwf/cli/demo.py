"""``kwf demo``: run many example workflows against a running engine and measure them.

It starts N threads of each example workflow (``new:<name>:<json>`` records, carts followed
by their shoppers' signals), answers their requests with the demo services of
``workflows._services`` in background threads (unless they run elsewhere), follows every
thread on ``workflow-events``, ``workflow-result``, ``workflow-error`` and the compensation
topics, and ends with a summary: outcomes per workflow, throughput and latency percentiles.

The library part (``run_demo``, the ``render_*`` functions) logs and returns data; only the
command's handler at the bottom prints. The engine itself is not started here: run the
engine (``kwf run``) first; a demo that sees no progress says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import structlog
from confluent_kafka import Consumer, Producer

from kwf.config import Settings
from kwf.service import ServiceRunner, assign_at_end

if TYPE_CHECKING:
    from workflows._services import Services

__all__ = ["DemoReport", "Thread", "register_demo", "render_progress", "render_summary",
           "run_demo", "start_records"]

log = structlog.get_logger("kwf.cli.demo")

KINDS = ("trip", "cart", "order", "approval")
OUTCOMES = ("completed", "compensated", "timed out", "failed", "abandoned", "cancelled",
            "running")
COMPENSATION_TOPICS = (*(f"saga-cancel-{k}" for k in ("car", "hotel", "flight")),
                       "order-payment-cancel", "order-inventory-cancel", "order-shipping-cancel")


# -- what the demo sends ---------------------------------------------------------------------
def start_records(kind: str, thread: str, i: int, pace: float = 1.0) -> list[str]:
    """The ``workflow-resume`` values that start thread ``i`` of ``kind`` (then drive it).

    Time scales are shrunk to seconds so a demo ends quickly: carts are abandoned after 2 s
    without a signal; approvals remind after 1 s, escalate after 2 s and expire after 4 s;
    orders wait 1 s per attempt. Trips get 5 s instead of the seed's 1 s: a burst of
    thousands of starts queues their replies for longer than a second, and the demo should
    time out on silent services, not on its own burst. ``pace`` multiplies every one of these
    times: a test on a busy machine slows the workflows' clocks, not its services.
    """
    if kind == "trip":
        return ["new:trip:" + json.dumps({"throwAfterHotel": i % 20 == 7,
                                          "timeoutMs": 5000 * pace})]
    if kind == "order":
        return ["new:order:" + json.dumps({
            "orderId": thread, "amount": 10 + i % 90, "items": [{"sku": f"p{i % 7}", "qty": 1}],
            "address": f"{i} Main St", "timeoutS": 1 * pace, "retries": 3,
            "backoffS": 0.2 * pace, "maxBackoffS": 2 * pace})]
    if kind == "approval":
        return ["new:approval:" + json.dumps({
            "subject": f"request {i}", "approver": "alice", "escalateTo": "bob",
            "remindAfterS": 1 * pace, "escalateAfterS": 2 * pace, "expireAfterS": 4 * pace})]
    if kind == "cart":
        def signal(value: dict[str, Any]) -> str:
            return json.dumps({"ref": "main", "value": value})
        records = ["new:cart:" + json.dumps({"abandonedCartTimeoutMS": 2000 * pace})]
        records += [signal({"type": "addToCart", "item": {"productId": f"p{n}", "quantity": 1}})
                    for n in range(1 + i % 3)]
        if i % 10 != 0:  # one in ten never gives an email: abandoned without a reminder
            records.append(signal({"type": "updateEmail", "email": f"shopper{i}@example.com"}))
        if i % 3 != 0:  # a third leave; the reminder brings some of them back
            records.append(signal({"type": "checkout"}))
        return records
    msg = f"unknown demo workflow {kind!r}; choose from {', '.join(KINDS)}"
    raise ValueError(msg)


# -- what the demo sees ------------------------------------------------------------------------
@dataclass
class Thread:
    """One demo thread as seen on the engine's output topics."""

    kind: str
    sent: float
    status: str = "running"
    finished: float | None = None
    result: Any = None
    error: Any = None
    error_type: str | None = None
    compensated: bool = False

    @property
    def outcome(self) -> str:
        """One of ``OUTCOMES``; a timeout counts before compensation, which it also runs."""
        if self.status == "completed":
            gave_up = self.result == "abandoned" or (
                isinstance(self.result, dict) and self.result.get("status") == "expired")
            return "abandoned" if gave_up else "completed"
        if self.status == "failed":
            if "Timeout" in (self.error_type or "") or self.error == "timeout":
                return "timed out"
            return "compensated" if self.compensated else "failed"
        return self.status if self.status in OUTCOMES else "running"


@dataclass
class DemoReport:
    """Where a demo run stands (live) or ended (returned by ``run_demo``)."""

    threads: dict[str, Thread]
    started: float
    elapsed: float = 0.0
    last_progress: float = 0.0
    stalled: bool = False
    services: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """kind -> outcome -> count, plus ``"all"``."""
        table: dict[str, dict[str, int]] = {}
        for t in self.threads.values():
            for kind in (t.kind, "all"):
                row = table.setdefault(kind, dict.fromkeys(OUTCOMES, 0))
                row[t.outcome] += 1
        return table

    @property
    def finished(self) -> int:
        return sum(t.finished is not None for t in self.threads.values())

    def latencies(self, kind: str | None = None) -> list[float]:
        """Seconds from the start record to the final status, sorted."""
        return sorted(t.finished - t.sent for t in self.threads.values()
                      if t.finished is not None and kind in (None, t.kind))

    def throughput(self) -> float:
        """Finished threads per second of the run."""
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of sorted values; NaN for none.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99)
    (2.0, 4.0)
    """
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


class _Tracker:
    """Reads the engine's outputs for the run's threads and updates their ``Thread``s."""

    def __init__(self, settings: Settings, threads: dict[str, Thread]) -> None:
        self.settings = settings
        self.threads = threads
        self.consumer = Consumer({**settings.kafka_config(), "group.id": "kwf-demo",
                                  "enable.auto.commit": False})
        topics = [settings.events_topic, settings.result_topic, settings.error_topic,
                  *COMPENSATION_TOPICS]
        assign_at_end(self.consumer, topics)

    def poll(self, timeout: float) -> int:
        """Apply what arrived within ``timeout`` seconds; returns how many records were ours."""
        s, seen = self.settings, 0
        messages = self.consumer.consume(1000, timeout=timeout)
        now = time.time()
        for msg in messages:
            key, value = msg.key(), msg.value()
            thread = (self.threads.get(key.decode(errors="replace"))
                      if msg.error() is None and key else None)
            if thread is None:
                continue
            seen += 1
            topic = msg.topic()
            if value is None:  # a tombstone of the compacted events topic
                continue
            if topic == s.events_topic:
                status = json.loads(value).get("status", "running")
                thread.status = status
                if status != "running" and thread.finished is None:
                    thread.finished = now
            elif topic == s.result_topic:
                thread.result = json.loads(value)
            elif topic == s.error_topic:
                thread.error = json.loads(value)
                raw = dict(msg.headers() or ()).get("kwf-error-type")
                thread.error_type = raw.decode() if isinstance(raw, bytes) else raw
            else:
                thread.compensated = True
        return seen

    def close(self) -> None:
        self.consumer.close()


# -- the run -------------------------------------------------------------------------------------
def run_demo(settings: Settings, n_per_kind: int = 250, *, kinds: Sequence[str] = KINDS,
             services: Services | None = None, run_services: bool = True,
             timeout: float = 300.0, stall: float = 30.0,
             on_progress: Callable[[DemoReport], None] | None = None,
             progress_every: float = 0.5, pace: float = 1.0) -> DemoReport:
    """Start ``n_per_kind`` threads of each workflow in ``kinds`` and follow them to the end.

    Args:
        settings: brokers and topic names (``Settings.from_env()``).
        n_per_kind: threads per workflow.
        kinds: which example workflows (``trip``, ``cart``, ``order``, ``approval``).
        services: the demo services' behaviour (``demo_services()`` if None).
        run_services: answer requests in this process; False when they run elsewhere.
        timeout: give up after this many seconds; unfinished threads count as running.
        stall: give up when nothing arrived for this long (is the engine running?).
        on_progress: called with the report every ``progress_every`` seconds and at the end.
        pace: multiplies the workflows' timeouts and delays (``start_records``).

    Returns:
        The final report (``stalled`` is True if it gave up waiting).
    """
    from workflows._services import demo_services

    for kind in kinds:
        start_records(kind, "check", 0)  # an unknown kind fails before anything is sent
    services = services or demo_services()
    run = uuid.uuid4().hex[:6]
    prefix = f"demo-{run}-"
    threads: dict[str, Thread] = {}
    report = DemoReport(threads, time.time())
    tracker = _Tracker(settings, threads)
    runner = None
    if run_services:
        runner = ServiceRunner(settings.kafka_config(), services.handlers(),
                               settings.resume_topic, delay=services.delay,
                               accept=lambda t: t.startswith(prefix)).start()
    try:
        _send_starts(settings, prefix, n_per_kind, kinds, threads, pace)
        report.started = report.last_progress = min(t.sent for t in threads.values())
        log.info("demo_started", run=run, threads=len(threads), kinds=list(kinds))
        _follow(report, tracker, runner, timeout, stall, on_progress, progress_every)
    finally:
        tracker.close()
        if runner is not None:
            runner.stop()
    log.info("demo_finished", run=run, finished=report.finished, elapsed=report.elapsed,
             stalled=report.stalled)
    return report


def _send_starts(settings: Settings, prefix: str, n: int, kinds: Sequence[str],
                 threads: dict[str, Thread], pace: float) -> None:
    producer = Producer({**settings.kafka_config(), "linger.ms": 10})
    for i in range(n):
        for kind in kinds:
            thread = f"{prefix}{kind}-{i:05d}"
            threads[thread] = Thread(kind, time.time())
            for value in start_records(kind, thread, i, pace):
                _produce(producer, settings.resume_topic, thread, value)
    producer.flush(30)


def _produce(producer: Producer, topic: str, key: str, value: str) -> None:
    while True:
        try:
            producer.produce(topic, key=key.encode(), value=value.encode())
            producer.poll(0)
            return
        except BufferError:  # the local queue is full: let it drain
            producer.poll(0.1)


def _follow(report: DemoReport, tracker: _Tracker, runner: ServiceRunner | None,
            timeout: float, stall: float, on_progress: Callable[[DemoReport], None] | None,
            every: float) -> None:
    total = len(report.threads)
    next_report = 0.0
    while True:
        now = time.time()
        if tracker.poll(0.1):
            report.last_progress = now
        report.elapsed = now - report.started
        if runner is not None:
            report.services = {"seen": runner.seen, "answered": runner.answered}
        done = report.finished == total
        if done or now - report.started > timeout or now - report.last_progress > stall:
            if done:  # results and errors may trail the final status on other topics
                deadline = time.time() + 1.0
                while time.time() < deadline:
                    tracker.poll(0.1)
            report.stalled = not done
            last = max(t.finished or now for t in report.threads.values())
            report.elapsed = last - report.started
            break
        if on_progress is not None and now >= next_report:
            on_progress(report)
            next_report = now + every
    if on_progress is not None:
        on_progress(report)


# -- rendering (pure: strings for the command to print) ---------------------------------------
def render_progress(report: DemoReport, width: int = 40) -> str:
    """A progress bar and a table of outcomes per workflow, as text lines."""
    total = len(report.threads) or 1
    filled = int(width * report.finished / total)
    lines = [f"[{'#' * filled}{'.' * (width - filled)}] {report.finished}/{total} finished  "
             f"{report.elapsed:6.1f} s  {report.throughput():7.1f}/s"]
    lines += _table(report)
    return "\n".join(lines)


def _table(report: DemoReport) -> list[str]:
    counts = report.counts()
    head = f"{'workflow':<10}" + "".join(f"{o:>12}" for o in OUTCOMES)
    rows = [f"{kind:<10}" + "".join(f"{counts[kind][o]:>12}" for o in OUTCOMES)
            for kind in [*(k for k in KINDS if k in counts), "all"] if kind in counts]
    return [head, *rows]


def render_summary(report: DemoReport, table: bool = True) -> str:
    """Throughput and latency percentiles per workflow, after the outcome table if ``table``."""
    lines = [*_table(report), ""] if table else []
    lines.append(f"{report.finished} of {len(report.threads)} threads finished in "
                 f"{report.elapsed:.1f} s: {report.throughput():.1f} workflows/s"
                 + ("  (stopped waiting: see above)" if report.stalled else ""))
    lines.append(f"{'latency s':<10}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}")
    for kind in [*KINDS, None]:
        values = report.latencies(kind)
        if values:
            cells = "".join(f"{percentile(values, p):>10.2f}" for p in (50, 95, 99, 100))
            lines.append(f"{kind or 'all':<10}{cells}")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------
def register_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kwf demo`` to the ``kwf`` command (append to ``kwf.cli.COMMANDS``)."""
    demo = commands.add_parser(
        "demo", help="run N example workflows of each kind against the running engine")
    add_demo_arguments(demo, n=250)
    demo.set_defaults(handler=demo_command)


def add_demo_arguments(demo: argparse.ArgumentParser, n: int) -> None:
    """The options of ``kwf demo`` (``kwf up`` takes them too)."""
    demo.add_argument("-n", type=int, default=n, help="threads per workflow (%(default)s)")
    demo.add_argument("--kinds", default=",".join(KINDS), help="workflows (%(default)s)")
    demo.add_argument("--brokers", help="bootstrap servers (default: KWF_BROKERS)")
    demo.add_argument("--external-services", action="store_true",
                      help="the demo services run elsewhere (python -m workflows._services)")
    demo.add_argument("--fail-rate", type=float, default=0.05,
                      help="each service's rate of refusals, flaky answers and silences")
    demo.add_argument("--latency", type=float, default=0.02, help="services' mean latency, s")
    demo.add_argument("--timeout", type=float, default=300.0, help="give up after (s)")


EXAMPLES = Path(__file__).resolve().parents[2] / "workflows"
"""The example workflows of a kwf checkout (they are not installed with kwf)."""


def use_examples() -> None:
    """Serve and drive the checkout's examples: ``KWF_WORKFLOWS=workflows`` unless set, and the
    checkout importable (here and in the engine subprocess); ``KafkaSetupError`` outside one."""
    from kwf.engine.admin import KafkaSetupError

    if not (EXAMPLES / "__init__.py").exists():
        msg = (f"the example workflows come with a kwf checkout (none at {EXAMPLES}); clone the "
               "repository, or run your own workflows with `KWF_WORKFLOWS=... kwf run`")
        raise KafkaSetupError(msg)
    root = str(EXAMPLES.parent)
    os.environ.setdefault("KWF_WORKFLOWS", "workflows")
    path = os.environ.get("PYTHONPATH", "")
    if root not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, path) if p)
    if root not in sys.path:
        sys.path.insert(0, root)


def demo_command(args: argparse.Namespace) -> int:
    from kwf.engine.admin import check_brokers, required_topics

    use_examples()
    from workflows._services import demo_services

    settings = Settings.from_env()
    if args.brokers:
        settings = dataclasses.replace(settings, brokers=args.brokers)
    check_brokers(settings.kafka_config(), required_topics(settings))  # KafkaSetupError: advice
    tty = sys.stdout.isatty()
    shown = [0]

    def show(report: DemoReport) -> None:
        text = render_progress(report)
        if tty:
            sys.stdout.write(f"\x1b[{shown[0]}F\x1b[J" if shown[0] else "")
            shown[0] = text.count("\n") + 1
        print(text, flush=True)

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    report = run_demo(settings, args.n, kinds=kinds,
                      services=demo_services(args.fail_rate, args.latency),
                      run_services=not args.external_services, timeout=args.timeout,
                      on_progress=show, progress_every=0.5 if tty else 5.0)
    print()
    print(render_summary(report, table=False))
    if report.stalled:
        print("kwf demo: stopped waiting; is the engine running? "
              "(python -m bytewax.run dataflow -r DIR -s 1 -b 0)", file=sys.stderr)
        return 1
    return 0

"""A local single-node Apache Kafka (KRaft, broker and controller in one JVM) for dev, tests and CI.

Why not Docker or a Kafka tarball: the machines kwf is developed and tested on have Java and
Maven but no Docker and no network beyond package registries. Maven resolves Kafka's jars from
Maven Central (``pom.xml`` next to this file) into a cache shared by every state directory; the
broker then runs as a detached ``java kafka.Kafka`` with its pid, log and data in a state directory
(``.kwf/kafka`` under the current directory, or ``$KWF_KAFKA_HOME``).

Every operation is idempotent and survives a ``kill -9`` of the broker: liveness is decided by
the process itself (pid file checked against ``/proc``, zombies count as dead), not by the file.
"""

from __future__ import annotations

import base64
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from kwf.config import read_properties
from kwf.engine.admin import KafkaSetupError, _Admin

log = structlog.get_logger(__name__)

POM = Path(__file__).with_name("pom.xml")
KAFKA_VERSION = re.findall(r"<kafka\.version>([^<]+)<", POM.read_text())[0]
DEFAULT_PORT = 9092

LOG4J2 = """\
# Written by kwf: the broker's logs go to stdout, which kwf redirects to kafka.log.
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.quiet.name = org.apache.kafka.common.config.AbstractConfig
logger.quiet.level = warn
"""


class BrokerError(KafkaSetupError):
    """The local broker cannot be set up, started or stopped; the message says what to do."""


@dataclass(frozen=True)
class BrokerStatus:
    """What ``kwf kafka status`` reports."""

    running: bool
    pid: int | None
    bootstrap: str
    home: Path
    log_file: Path


def default_home() -> Path:
    """``$KWF_KAFKA_HOME``, else ``.kwf/kafka`` under the current directory (one per checkout)."""
    return Path(os.environ.get("KWF_KAFKA_HOME") or Path.cwd() / ".kwf" / "kafka").absolute()


def default_cache() -> Path:
    """``$KWF_KAFKA_CACHE``, else ``$XDG_CACHE_HOME/kwf`` or ``~/.cache/kwf`` (shared by homes)."""
    if os.environ.get("KWF_KAFKA_CACHE"):
        return Path(os.environ["KWF_KAFKA_CACHE"]).absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).absolute() / "kwf"


class LocalBroker:
    """One broker instance, identified by its state directory ``home``."""

    def __init__(
        self,
        home: Path | str | None = None,
        port: int = DEFAULT_PORT,
        controller_port: int | None = None,
        cache: Path | str | None = None,
        heap: str = "512m",
    ) -> None:
        self.home = Path(home).absolute() if home else default_home()
        self.port = port
        self.controller_port = controller_port or port + 1
        self.libs = Path(cache or default_cache()) / f"kafka-{KAFKA_VERSION}" / "libs"
        self.heap = heap
        self.properties = self.home / "server.properties"
        self.pid_file = self.home / "kafka.pid"
        self.log_file = self.home / "kafka.log"
        self.data = self.home / "data"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- state ---------------------------------------------------------------------------------

    def status(self) -> BrokerStatus:
        """Whether this home's broker process is alive (it may still be starting up)."""
        pid = self._live_pid()
        port = self._configured_port() if pid else self.port
        return BrokerStatus(pid is not None, pid, f"127.0.0.1:{port}", self.home, self.log_file)

    def jars_cached(self) -> bool:
        """True when starting needs no Maven run (the CLI warns about the download otherwise)."""
        return (self.libs / ".complete").exists()

    # -- start / stop --------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> BrokerStatus:
        """Start the broker unless it runs already, and return once it answers clients."""
        with self._exclusive():
            pid = self._live_pid()
            if pid is not None:
                running = self._configured_port()
                if running != self.port:
                    msg = (
                        f"the kwf broker in {self.home} already runs on port {running}, not "
                        f"{self.port}; use port {running}, or `kwf kafka stop` it first"
                    )
                    raise BrokerError(msg)
                log.info("kafka.already_running", pid=pid, bootstrap=self.bootstrap)
                return self.status()
            java = _java()
            for port in (self.port, self.controller_port):
                if not _port_free(port):
                    msg = (
                        f"port {port} on 127.0.0.1 is taken by another process (not the kwf "
                        f"broker in {self.home}); stop that process or choose other ports "
                        "(`kwf kafka start --port N`)"
                    )
                    raise BrokerError(msg)
            classpath = str(self.resolve_jars() / "*")
            self._write_config()
            self._format(java, classpath)
            pid = self._launch(java, classpath)
            self._wait_ready(pid, timeout)
            return self.status()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker: SIGTERM (clean shutdown), then SIGKILL after ``timeout`` s.

        Returns False when it was not running.
        """
        if not self.home.exists():
            return False
        with self._exclusive():
            pid = self._live_pid()
            if pid is None:
                self.pid_file.unlink(missing_ok=True)
                return False
            log.info("kafka.stopping", pid=pid)
            os.kill(pid, signal.SIGTERM)
            if not _wait_dead(pid, timeout):
                log.warning("kafka.killing", pid=pid, after_s=timeout)
                os.kill(pid, signal.SIGKILL)
                _wait_dead(pid, 10.0)
            self.pid_file.unlink(missing_ok=True)
            log.info("kafka.stopped", pid=pid)
            return True

    def reset(self) -> None:
        """Delete the broker's data (topics, offsets, cluster id); it must be stopped."""
        with self._exclusive():
            if self._live_pid() is not None:
                msg = f"the kwf broker in {self.home} is running: `kwf kafka stop` it first"
                raise BrokerError(msg)
            shutil.rmtree(self.data, ignore_errors=True)
        log.info("kafka.reset", home=str(self.home))

    # -- jars ----------------------------------------------------------------------------------

    def resolve_jars(self) -> Path:
        """The directory of Kafka's runtime jars, copied there by Maven on first use."""
        if self.jars_cached():
            return self.libs
        mvn = shutil.which("mvn")
        if mvn is None:
            msg = (
                f"Maven (`mvn`) is not on PATH; it is needed once to fetch the Kafka "
                f"{KAFKA_VERSION} jars from Maven Central. Install it (`apt-get install maven`)"
            )
            raise BrokerError(msg)
        staging = self.libs.with_name(f"libs.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            "-DincludeScope=runtime", f"-DoutputDirectory={staging}",
        ]  # fmt: skip
        log.info("kafka.resolving_jars", version=KAFKA_VERSION, into=str(self.libs))
        started = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            msg = (
                f"Maven could not fetch the Kafka {KAFKA_VERSION} jars (exit {done.returncode}); "
                "check that Maven Central is reachable (proxy: ~/.m2/settings.xml). Maven said:\n"
                + _tail(done.stdout + done.stderr)
            )
            raise BrokerError(msg)
        (staging / ".complete").touch()
        shutil.rmtree(self.libs, ignore_errors=True)
        try:
            staging.rename(self.libs)
        except OSError:  # a concurrent resolver won the race; its copy is as good
            shutil.rmtree(staging, ignore_errors=True)
        log.info("kafka.jars_resolved", seconds=round(time.monotonic() - started, 1))
        return self.libs

    # -- internals -----------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise start/stop of one home across processes (two test runs, two terminals)."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _live_pid(self) -> int | None:
        """The broker's pid if that process is alive and is this home's Kafka (not a reused pid)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and _is_our_broker(pid, self.properties):
            return pid
        orphan = _find_broker(self.properties)  # pid file lost: it would hold the data dir lock
        if orphan is not None:
            log.warning("kafka.adopted", pid=orphan, pid_file=str(self.pid_file))
            self.pid_file.write_text(f"{orphan}\n")
        return orphan

    def _configured_port(self) -> int:
        listeners = read_properties(self.properties).get("listeners", "")
        found = re.search(r"PLAINTEXT://[^,]*:(\d+)", listeners)
        return int(found.group(1)) if found else self.port

    def _write_config(self) -> None:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "log.dirs": str(self.data),
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "5",  # 50 by default: slow first consumer group
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "5",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),  # 128 MB by default
            # After a kill -9 the restarted broker waits for its old session to expire.
            "broker.heartbeat.interval.ms": "1000",
            "broker.session.timeout.ms": "4000",
        }
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.home / "log4j2.properties").write_text(LOG4J2)

    def _java_cmd(self, java: str, classpath: str, main: str, *args: str) -> list[str]:
        return [
            java, f"-Xmx{self.heap}", "-Xms64m", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp", classpath, main, *args,
        ]  # fmt: skip

    def _format(self, java: str, classpath: str) -> None:
        """Format the KRaft storage once; a formatted directory keeps its topics across runs."""
        if (self.data / "meta.properties").exists():
            return
        shutil.rmtree(self.data, ignore_errors=True)  # a half-formatted leftover
        cluster_id = _kafka_uuid()
        cmd = self._java_cmd(
            java, classpath, "kafka.tools.StorageTool",
            "format", "-t", cluster_id, "-c", str(self.properties), "--standalone",
        )  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            msg = f"formatting Kafka storage in {self.data} failed:\n"
            msg += _tail(done.stdout + done.stderr)
            raise BrokerError(msg)
        log.info("kafka.formatted", data=str(self.data), cluster_id=cluster_id)

    def _launch(self, java: str, classpath: str) -> int:
        """Start ``kafka.Kafka`` detached: a new session, reparented away from us by ``sh &``.

        Detaching through the shell means no caller process (a CLI that exits, a pytest session)
        ends up as the broker's parent, which would leave a zombie after a kill.
        """
        if self.log_file.exists():
            self.log_file.replace(self.log_file.with_suffix(".log.1"))
        cmd = self._java_cmd(java, classpath, "kafka.Kafka", str(self.properties))
        shell = 'log="$1"; shift; "$@" >>"$log" 2>&1 </dev/null & echo $!'
        done = subprocess.run(
            ["/bin/sh", "-c", shell, "sh", str(self.log_file), *cmd],
            capture_output=True, text=True, check=True, start_new_session=True,
        )  # fmt: skip
        pid = int(done.stdout.strip())
        self.pid_file.write_text(f"{pid}\n")
        log.info("kafka.launched", pid=pid, bootstrap=self.bootstrap, log=str(self.log_file))
        return pid

    def _wait_ready(self, pid: int, timeout: float) -> None:
        """Wait until the broker serves metadata; on failure kill it and report its log."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                self.pid_file.unlink(missing_ok=True)
                msg = (
                    f"Kafka exited during startup (if its data is damaged, `kwf kafka reset` "
                    f"deletes it); the end of {self.log_file}:\n{_tail(self._log())}"
                )
                raise BrokerError(msg)
            if _answers(self.bootstrap):
                log.info("kafka.ready", pid=pid, seconds=round(time.monotonic() - started, 1))
                return
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid, 10.0)
        self.pid_file.unlink(missing_ok=True)
        msg = (
            f"Kafka did not answer on {self.bootstrap} within {timeout:g} s (killed it); "
            f"the end of {self.log_file}:\n{_tail(self._log())}"
        )
        raise BrokerError(msg)

    def _log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"


def _java() -> str:
    """The ``java`` to run (``$JAVA_HOME/bin/java`` first), checked to be version 17 or newer."""
    home_java = Path(os.environ.get("JAVA_HOME") or "/nonexistent") / "bin" / "java"
    java = str(home_java) if home_java.exists() else shutil.which("java")
    advice = "install Java 17+ (e.g. `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME"
    if java is None:
        raise BrokerError(f"Java is not installed (no `java` on PATH or in JAVA_HOME): {advice}")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    found = re.search(r'version "(?:1\.)?(\d+)', out)  # "17.0.15", "21", "1.8.0_392"
    if found is None or int(found.group(1)) < 17:
        first = out.strip().splitlines()[0] if out.strip() else "unknown"
        raise BrokerError(f"Kafka {KAFKA_VERSION} needs Java 17+, {java} is {first!r}: {advice}")
    return java


def _kafka_uuid() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (``random-uuid``)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids these: they read as command-line options
            return text


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Java sets it: a port in TIME_WAIT after the last broker stopped is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(bootstrap: str) -> bool:
    """True once the broker accepts connections and lists itself in the cluster metadata."""
    host, port = bootstrap.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
        return bool(_Admin({"bootstrap.servers": bootstrap}).metadata(2.0).brokers)
    except (OSError, KafkaSetupError):
        return False


def _alive(pid: int) -> bool:
    """Alive and not a zombie (a killed child of ours that nobody has reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not Path("/proc/self").exists()  # no /proc (macOS): trust kill(0)
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _is_our_broker(pid: int, properties: Path) -> bool:
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return not Path("/proc/self").exists()  # no /proc (macOS): the pid file is all we have
    return b"kafka.Kafka" in cmdline and str(properties).encode() in cmdline


def _find_broker(properties: Path) -> int | None:
    """A live broker started with these properties, from /proc (Linux): for a lost pid file."""
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid != os.getpid() and _is_our_broker(pid, properties):
            return pid
    return None


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])

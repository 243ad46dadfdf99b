"""The deployment on the real broker: pods of k8s/ run as local processes, the recovery lock,
the cluster check, credentials errors.

A pod here is the container's command, environment and volume as the rendered manifest gives
them (``pod_process``); the kubelet's part (the downward API, mounting the volume) is done the
same way, and only the network and Kafka are the test's: loopback addresses in my port range,
the test broker and per-test topics (``World`` of test_flow_kafka).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_deploy import K8S, kind, needs_kubectl, render
from test_flow_kafka import World

from kwf.engine.admin import KafkaSetupError, check_brokers, create_topics, workflow_output_topics

pytestmark = pytest.mark.kafka

MOUNT = "/var/lib/kwf"
BASE_PORT = 22000
"""Timely addresses 127.0.0.1:22000, 22002, ... (the startup check takes the odd ports)."""
API_PORT = 22060


class Pod:
    """One pod of the rendered StatefulSet as a local process, its volume a directory."""

    def __init__(self, sts: dict[str, Any], config: dict[str, str], ordinal: int,
                 volumes: Path, overrides: dict[str, str], log: Path) -> None:
        spec = sts["spec"]["template"]["spec"]
        (self.container,) = spec["containers"]
        name = f"{sts['metadata']['name']}-{ordinal}"
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        self.volume = volumes / f"{claim['metadata']['name']}-{name}"  # as the PVC is named
        self.volume.mkdir(parents=True, exist_ok=True)
        mount = {m["name"]: m["mountPath"] for m in self.container["volumeMounts"]}
        assert mount[claim["metadata"]["name"]] == MOUNT
        self.env = {**config, **self._downward(name, sts), **overrides,
                    "BYTEWAX_DATAFLOW_API_PORT": str(API_PORT + ordinal)}
        self.command = [sys.executable if a == "python" else a.replace(MOUNT, str(self.volume))
                        for a in self.container["command"]]
        self.inits = [[sys.executable if a == "python" else a.replace(MOUNT, str(self.volume))
                       for a in init["command"]] for init in spec.get("initContainers", [])]
        self.log, self.proc = log, None
        self.api = API_PORT + ordinal

    def _downward(self, name: str, sts: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for var in self.container["env"]:
            source = var.get("valueFrom", {})
            if "value" in var:
                env[var["name"]] = var["value"]
            elif "fieldRef" in source:
                field = source["fieldRef"]["fieldPath"]
                env[var["name"]] = {"metadata.name": name,
                                    "metadata.namespace": "default"}[field]
            elif "resourceFieldRef" in source:
                ref = source["resourceFieldRef"]
                resource, _, what = ref["resource"].partition(".")
                cpu = str(self.container["resources"][resource][what])
                cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
                env[var["name"]] = str(math.ceil(cores / float(ref.get("divisor", 1))))
        return env

    def start(self) -> Pod:
        for init in self.inits:  # the deploy gate (kwf verify) must pass before the engine
            done = subprocess.run(init, env=self.env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def probe(self, which: str) -> int:
        (command,) = [self.container[which]["exec"]["command"]]
        command = [sys.executable if a == "python" else a.replace(MOUNT, str(self.volume))
                   for a in command]
        return subprocess.run(command, env=self.env, capture_output=True, timeout=30).returncode


class Cluster:
    """The StatefulSet as rendered for ``replicas`` pods, with their volumes under ``tmp``."""

    def __init__(self, world: World, replicas: int, tmp: Path) -> None:
        overlay = tmp / f"replicas-{replicas}"
        overlay.mkdir(exist_ok=True)
        (overlay / "kustomization.yaml").write_text(json.dumps({
            "resources": [os.path.relpath(K8S / "base", overlay)],
            "replicas": [{"name": "kwf", "count": replicas}],
            "replacements": [{"source": {"kind": "StatefulSet", "name": "kwf",
                                         "fieldPath": "spec.replicas"},
                              "targets": [{"select": {"kind": "StatefulSet", "name": "kwf"},
                                           "fieldPaths": [
                                               "spec.template.spec.containers.[name=engine]"
                                               ".env.[name=KWF_PROCESSES].value"]}]}]}))
        docs = render(overlay)
        sts, config = kind(docs, "StatefulSet"), kind(docs, "ConfigMap")["data"]
        addresses = ";".join(f"127.0.0.1:{BASE_PORT + 2 * i}" for i in range(replicas))
        overrides = {k: v for k, v in world.env.items()
                     if k.startswith(("KWF_", "PYTHON", "PATH", "HOME"))}
        overrides |= {"BYTEWAX_ADDRESSES": addresses, "PYTHONUNBUFFERED": "1"}
        self.pods = [Pod(sts, config, i, tmp / "volumes", overrides, tmp / f"pod-{i}.log")
                     for i in range(replicas)]

    def start(self) -> Cluster:
        for pod in self.pods:
            pod.start()
        return self

    def kill(self) -> None:
        for pod in self.pods:
            pod.kill()

    def logs(self) -> str:
        return "\n".join(p.log.read_text(errors="replace")[-2000:] for p in self.pods)


@pytest.fixture
def world(kafka_brokers: str, unique: Any, tmp_path: Path) -> Iterator[World]:
    w = World(kafka_brokers, unique("deploy"), tmp_path)
    w.create_topics()
    yield w
    w.close()


@needs_kubectl
def test_pods_from_the_manifests_survive_a_kill_and_resume_on_three_pods(
        world: World, tmp_path: Path) -> None:
    """2 pods x 2 workers; kill -9 one (its peer stops too), restart both; then 3 pods resume
    from the volumes the 2 left. Every workflow completes with the right result."""
    cluster = Cluster(world, 2, tmp_path).start()
    clusters = [cluster]
    starts: dict[str, int] = {}  # thread -> the offset of its start: its suspend ids
    try:
        for i in range(6):
            starts[f"trip-{i}"] = world.send(f"trip-{i}", 'new:ftrip:{"rest": 1}')
        world.pump(lambda: len(world.results()) >= 2, 60)
        assert cluster.pods[0].env["BYTEWAX_WORKERS_PER_PROCESS"] == "2"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{cluster.pods[0].api}/metrics",
                                         timeout=5).read().decode()
        assert "item_inp_count" in metrics and "# HELP kwf_threads_started_total" in metrics
        parts = [sorted(p.name for p in (pod.volume / "recovery").glob("part-*.sqlite3"))
                 for pod in cluster.pods]
        assert parts == [[f"part-{i}.sqlite3" for i in (0, 2, 4)],
                         [f"part-{i}.sqlite3" for i in (1, 3, 5)]]
        cluster.pods[1].kill()
        assert cluster.pods[0].proc is not None and cluster.pods[0].proc.wait(30) != 0
        for i in range(6, 10):
            starts[f"trip-{i}"] = world.send(f"trip-{i}", 'new:ftrip:{"rest": 1}')
        cluster.start()  # the kubelet restarts both containers
        world.pump(lambda: len(world.results()) == 10, 90)
        assert all(pod.probe("readinessProbe") == 0 for pod in cluster.pods), cluster.logs()
        cluster.kill()

        three = Cluster(world, 3, tmp_path)
        clusters.append(three)
        for i in range(10, 16):
            starts[f"trip-{i}"] = world.send(f"trip-{i}", 'new:ftrip:{"rest": 1}')
        three.start()
        world.pump(lambda: len(world.results()) == 16, 90)
    except BaseException:
        print(clusters[-1].logs())
        raise
    finally:
        for c in clusters:
            c.kill()
    assert world.results() == {key: {"car": {"id": f"{offset}:1"}, "hotel": {"id": f"{offset}:2"}}
                               for key, offset in starts.items()}
    assert len(starts) == 16
    new = three.pods[2].volume / "recovery"  # the new pod holds no partition, and knows why
    assert (new / "kwf-recovery.json").exists() and not list(new.glob("part-*"))


def _engine(world: World, tmp: Path, name: str, extra: dict[str, str],
            args: list[str]) -> subprocess.Popen[bytes]:
    log = (tmp / f"{name}.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "bytewax.run", "kwf.engine:engine_flow",
                             *args], env={**world.env, **extra}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_a_second_engine_on_a_locked_directory_refuses_and_the_first_keeps_running(
        world: World, tmp_path: Path) -> None:
    recovery = tmp_path / "recovery"
    flags = ["-r", str(recovery), "-s", "1", "-b", "0"]
    first = _engine(world, tmp_path, "first", {"KWF_RECOVERY_PARTITIONS": "1"}, flags)
    try:
        world.send("trip-1", 'new:ftrip:{"rest": 0}')
        world.pump(lambda: "trip-1" in world.results(), 60)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "bytewax.run", "kwf.engine:engine_flow",
                                 *flags], env=world.env, capture_output=True, text=True,
                                timeout=60)
        assert time.monotonic() - started < 10
        assert second.returncode != 0
        assert (f"recovery directory {recovery} is in use by another engine (pid {first.pid} "
                in second.stderr), second.stderr[-2000:]
        world.send("trip-2", 'new:ftrip:{"rest": 0}')
        world.pump(lambda: "trip-2" in world.results(), 60)
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_processes_serving_different_workflows_refuse_to_form_a_cluster(
        world: World, tmp_path: Path) -> None:
    addresses = "127.0.0.1:22010;127.0.0.1:22012"
    common = {"BYTEWAX_ADDRESSES": addresses, "BYTEWAX_WORKERS_PER_PROCESS": "1"}
    # Process 1 serves the examples too: without their topics it would refuse to start before
    # the cluster check (and process 0 wait for it), whatever tests ran before this one.
    examples = dataclasses.replace(world.settings, workflows=("workflows",))
    create_topics(world.settings.kafka_config(), sorted(workflow_output_topics(examples)), 1, 1)
    procs = [
        _engine(world, tmp_path, "p0", {**common, "BYTEWAX_PROCESS_ID": "0"}, []),
        _engine(world, tmp_path, "p1", {**common, "BYTEWAX_PROCESS_ID": "1",
                                        "KWF_WORKFLOWS": "flow_workflows,workflows"}, []),
    ]
    try:
        codes = [p.wait(60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes[0] != 0 and codes[1] != 0, logs
    for log in logs:
        assert "the processes of this cluster differ" in log
        assert "workflow 'trip': not served in process 0 (127.0.0.1:22010)" in log
        assert "in process 1 (127.0.0.1:22012)" in log


def test_a_refused_sasl_login_is_not_reported_as_an_unreachable_broker(kafka_brokers: str) -> None:
    conf = {"bootstrap.servers": kafka_brokers, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "p"}
    with pytest.raises(KafkaSetupError) as info:
        check_brokers(conf, [], timeout=3)
    assert "refused the SASL login" in str(info.value)
    assert "kwf kafka start" not in str(info.value)
    with pytest.raises(KafkaSetupError) as info:  # TLS client, plaintext listener
        check_brokers({"bootstrap.servers": kafka_brokers, "security.protocol": "SSL"}, [],
                      timeout=3)
    assert "the TLS handshake failed" in str(info.value)

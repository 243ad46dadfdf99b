"""Deploying: the manifests of k8s/ (rendered, validated, and run as local processes), the pod
helpers, the engine's startup checks (lock, cluster check, recovery init) and credentials.

No Kubernetes here: a "pod" is the container's command with the environment and the volume the
rendered manifest gives it, run on loopback. What the kubelet would fill in (the downward API)
is filled in here the same way; the network names are replaced by loopback addresses
(``BYTEWAX_ADDRESSES``, which ``kwf.engine.pod`` honours) and the broker and topics by the
test's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kwf.config import Settings, kafka_env
from kwf.engine._startup import StartupError, plan_store
from kwf.engine.pod import PodError, cluster_addresses, pod_environment, probe

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (apt-get install kubectl; .ci/run does)")
OLDEST, NEWEST = "1.25.0", "1.37.0"
"""The Kubernetes versions k8s/ is validated against (kubernetes-validate's oldest and newest)."""


def render(directory: Path) -> list[dict[str, Any]]:
    import yaml

    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def kind(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == name]
    return doc


# -- the manifests ------------------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_rendered_base_and_overlay_validate_strictly(tmp_path: Path, version: str) -> None:
    for name, directory in (("base", K8S), ("overlay", K8S / "overlays" / "example")):
        rendered = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True,
                                  text=True, check=True, timeout=60).stdout  # type: ignore[list-item]
        path = tmp_path / f"{name}.yaml"
        path.write_text(rendered)
        tool = Path(sys.executable).with_name("kubernetes-validate")
        done = subprocess.run([str(tool), "--strict", "-k", version, str(path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("passed") >= 5


@needs_kubectl
def test_overlay_derives_names_and_the_process_count_from_one_place() -> None:
    docs = render(K8S / "overlays" / "example")
    sts, svc = kind(docs, "StatefulSet"), kind(docs, "Service")
    engine = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in engine["env"]}
    assert sts["metadata"]["name"] == "acme-kwf" and sts["metadata"]["namespace"] == "workflows"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] == "acme-kwf"
    assert env["KWF_PROCESSES"]["value"] == str(sts["spec"]["replicas"]) == "3"
    assert engine["image"].startswith("registry.example.com/acme/kwf@sha256:")
    assert svc["spec"]["publishNotReadyAddresses"] is True and svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    secret = kind(docs, "Secret")["metadata"]["name"]
    assert {"secretRef": {"name": secret, "optional": True}} in engine["envFrom"]
    pdb = kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


# -- pod helpers and the recovery plan (no Kafka) -----------------------------------------------

def test_cluster_addresses_follow_the_pods_own_name_and_fqdn() -> None:
    env = {"POD_NAME": "acme-kwf-2", "KWF_PROCESSES": "3",
           "KWF_POD_FQDN": "acme-kwf-2.acme-kwf.team-a.svc.example.org"}
    got = pod_environment(env)
    assert got["BYTEWAX_PROCESS_ID"] == "2"
    assert got["BYTEWAX_ADDRESSES"].split(";") == [
        f"acme-kwf-{i}.acme-kwf.team-a.svc.example.org:2101" for i in range(3)]
    with pytest.raises(PodError, match="headless Service"):
        cluster_addresses("kwf-0", "kwf-0", 2, 2101)  # no subdomain: serviceName is not set
    with pytest.raises(PodError, match="KWF_PROCESSES=2"):
        cluster_addresses("kwf-2", "kwf-2.kwf.ns.svc.cluster.local", 2, 2101)


def _report(parts: list[int], marker: dict[str, int] | None = None) -> dict[str, Any]:
    return {"parts": parts, "marker": marker}


def test_recovery_plan_creates_each_partition_once_and_completes_an_interrupted_init() -> None:
    plan, marker = plan_store({0: _report([]), 1: _report([])}, 6)
    assert plan == {0: [0, 2, 4], 1: [1, 3, 5]} and marker == {"partitions": 6, "processes": 2}
    # interrupted: process 0 created two of its three, process 1 none; nothing ran on them
    plan, _ = plan_store({0: _report([0, 2]), 1: _report([])}, 6)
    assert plan == {0: [4], 1: [1, 3, 5]}
    # scaled out later: the new process holds nothing and creates nothing
    done = {"partitions": 6, "processes": 2}
    plan, marker = plan_store({0: _report([0, 2, 4], done), 1: _report([1, 3, 5], done),
                               2: _report([])}, 6)
    assert plan == {0: [], 1: [], 2: []} and marker == done


def test_recovery_plan_refuses_lost_duplicated_or_misplaced_partitions() -> None:
    done = {"partitions": 6, "processes": 2}
    with pytest.raises(StartupError, match=r"partitions \[1, 3, 5\] of 6 are missing.*processes "
                                           r"\[1\].*restore those volumes"):
        plan_store({0: _report([0, 2, 4], done), 1: _report([])}, 6)
    with pytest.raises(StartupError, match="partition 2 exists in the directories of processes 0 "
                                           "and 1"):
        plan_store({0: _report([0, 2]), 1: _report([2])}, 6)
    with pytest.raises(StartupError, match=r"process 1 holds recovery partitions \[2\].*delete"):
        plan_store({0: _report([]), 1: _report([2])}, 6)
    with pytest.raises(StartupError, match="KWF_RECOVERY_PARTITIONS"):
        plan_store({0: _report([])}, 0)


def test_probe_fails_when_no_epoch_closed_lately(tmp_path: Path) -> None:
    assert probe(tmp_path / "missing", 30) is not None
    assert probe(tmp_path, 30) == "recovery not ready"
    part = tmp_path / "part-0.sqlite3-wal"
    part.write_bytes(b"x")
    assert probe(tmp_path, 30) is None
    assert "no epoch closed for 100 s" in str(probe(tmp_path, 30, now=time.time() + 100))


def test_kafka_settings_come_from_the_environment_and_a_missing_ca_is_named() -> None:
    env = {"KWF_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KWF_KAFKA_SASL_PASSWORD": "s3cret",
           "KWF_KAFKA_SSL_CA_LOCATION": "/nonexistent/ca.crt", "KWF_KAFKA_HOME": "/x"}
    assert kafka_env(env) == {"security.protocol": "SASL_SSL", "sasl.password": "s3cret",
                              "ssl.ca.location": "/nonexistent/ca.crt"}
    with pytest.raises(ValueError, match="KWF_KAFKA_SSL_CA_LOCATION=/nonexistent/ca.crt: no such "
                                         "file"):
        Settings.from_env(env).kafka_config()


def test_guard_creates_the_store_once_locks_it_and_completes_an_interrupted_init(
        tmp_path: Path) -> None:
    """One process, no Kafka: the partitions are created by the engine (never twice), a second
    guard on the locked directory refuses naming this pid, and a store whose first
    initialisation stopped halfway (no marker yet) is completed."""
    import kwf
    from kwf.engine import _startup
    from kwf.engine._startup import Launch, create_partitions, guard, store_report
    from kwf.registry import Registry

    @kwf.workflow("deploy-guard")
    async def noop(arg: object) -> object:
        return arg

    settings, registry = Settings(recovery_partitions=3), Registry([noop])
    half = tmp_path / "half"
    half.mkdir()
    create_partitions(half, [0], 3)  # interrupted before parts 1, 2 and the marker
    assert store_report(half)["parts"] == [0] and store_report(half)["marker"] is None
    held = len(_startup._held)
    try:
        guard(settings, registry, Launch(recovery=half))
        assert store_report(half) == {"parts": [0, 1, 2], "directory": str(half),
                                      "marker": {"partitions": 3, "processes": 1}}
        with pytest.raises(StartupError, match=f"{half} is in use by another engine "
                                               f"\\(pid {os.getpid()} "):
            guard(settings, registry, Launch(recovery=half))
    finally:
        for fd in _startup._held[held:]:
            os.close(fd)
        del _startup._held[held:]
    guard(settings, registry, Launch(recovery=half))  # the lock is free again: nothing re-made
    assert store_report(half)["parts"] == [0, 1, 2]
    os.close(_startup._held.pop())


def test_the_engine_names_a_missing_ca_file_instead_of_a_kafka_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "KWF_BROKERS": "127.0.0.1:1", "KWF_WORKFLOWS": "flow_workflows",
           "PYTHONPATH": str(Path(__file__).parent), "KWF_KAFKA_SECURITY_PROTOCOL": "SSL",
           "KWF_KAFKA_SSL_CA_LOCATION": str(tmp_path / "ca.crt")}
    done = subprocess.run([sys.executable, "-m", "bytewax.run", "kwf.engine:engine_flow"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert (f"kwf engine not started: KWF_KAFKA_SSL_CA_LOCATION={tmp_path / 'ca.crt'}: no such "
            "file; mount it") in done.stderr
    assert "Traceback" not in done.stderr

"""The engine outside a checkout: the image's files, built into a wheel and installed in a fresh
venv with the constraints, start the engine with the image's command and with ``kwf run``.

No container engine here, so the image is reproduced from k8s/Dockerfile itself: its COPY lines
say which files go in (copied into a build context, as ``.dockerignore`` would leave them), its
``pip install -c constraints.txt .`` is done as pip does it (build the wheel of the context, then
install it with the constraints; the pip cache makes it fast), and its CMD runs the engine, with
the recovery volume and the user's workflows laid out as the image documents.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from test_flow_kafka import World

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def dockerfile() -> dict[str, list[str]]:
    """The instructions of k8s/Dockerfile that matter here: COPY sources, RUN, CMD."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "k8s" / "Dockerfile").read_text())
    found: dict[str, list[str]] = {"COPY": [], "RUN": [], "CMD": []}
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "COPY":
            found["COPY"] += rest.split()[:-1]
        elif word == "RUN":
            found["RUN"].append(rest)
        elif word == "CMD":
            found["CMD"] = json.loads(rest)
    return found


def test_the_image_files_install_in_a_fresh_venv_and_run_the_engine(
        kafka_brokers: str, unique: object, tmp_path: Path) -> None:
    image = dockerfile()
    context = tmp_path / "context"
    for source in image["COPY"]:
        target = context / source
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / source, target)
    (install,) = [r for r in image["RUN"] if "pip install" in r]
    assert "-c constraints.txt ." in install  # what the steps below reproduce

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(context)], check=True, timeout=300)
    (wheel,) = wheels.glob("kwf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"kwf"} and "kwf/engine/pod.py" in names  # no top-level workflows package

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # this pip installs into it (no ensurepip: faster)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--disable-pip-version-check", "-c", str(context / "constraints.txt"),
                    str(wheel)], check=True, timeout=300)

    world = World(kafka_brokers, unique("image"), tmp_path)  # type: ignore[operator]
    world.create_topics()
    # The documented pattern for your workflows: your package on PYTHONPATH, KWF_WORKFLOWS.
    app = tmp_path / "app"
    shutil.copytree(TESTS, app / "flow_workflows_pkg", ignore=lambda *_: [
        n for n in os.listdir(TESTS) if n != "flow_workflows.py"])
    env = {k: v for k, v in world.env.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": str(app / "flow_workflows_pkg"), "KWF_RECOVERY_PARTITIONS": "1"}
    volume = tmp_path / "var-lib-kwf"
    command = [str(python) if a == "python" else a.replace("/var/lib/kwf", str(volume))
               for a in image["CMD"]]
    log = (tmp_path / "engine.log").open("ab")
    engine = subprocess.Popen(command, cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        world.send("trip-1", 'new:ftrip:{"rest": 0}')
        world.pump(lambda: "trip-1" in world.results(), 90)
    finally:
        engine.kill()
        engine.wait()
    assert (volume / "recovery" / "part-0.sqlite3").exists()

    # `kwf run` from the venv, in a directory that is no checkout
    kwf = env_dir / "bin" / "kwf"
    engine = subprocess.Popen([str(kwf), "run", "--state", str(tmp_path / "state")], cwd=app,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        offset = world.send("trip-2", 'new:ftrip:{"rest": 0}')
        world.pump(lambda: "trip-2" in world.results(), 90)
    finally:
        engine.kill()
        engine.wait()
    assert world.results()["trip-2"] == {"car": {"id": f"{offset}:1"},
                                         "hotel": {"id": f"{offset}:2"}}
    # without KWF_WORKFLOWS an installed engine refuses instead of serving anything
    env.pop("KWF_WORKFLOWS")
    done = subprocess.run(command, cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "KWF_WORKFLOWS is not set" in done.stderr

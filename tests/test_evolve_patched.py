"""Versioned changes: ``kwf.patched`` and ``kwf.deprecate_patch`` (issue 11, item 3).

Every test runs live and with replay before every event (``make_engine``). "Deploying" a version
replaces the engine's workflow and evicts the live instances, as a restart with new code does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import evolve_workflows as ew
from kwf.config import Settings
from kwf.instance import Instance
from kwf.journal import RESUME
from kwf.registry import Workflow, get
from kwf.testing import Engine

GOLDEN = Path(__file__).parent / "golden" / "patched"


def deploy(eng: Engine, fn: Any) -> None:
    eng.registry.workflows[ew.NAME] = fn.__kwf_workflow__
    eng.evict()


def start(eng: Engine, key: str) -> None:
    eng.send(key, f"new:{ew.NAME}:" + json.dumps(key))


def resume(eng: Engine, key: str, ref: str, value: Any) -> None:
    eng.send(key, json.dumps({"ref": ref, "value": value}))


def written(eng: Engine, key: str) -> list[Any]:
    return [r.json() for r in eng.outputs(ew.TOPIC) if r.key == key]


def test_old_threads_keep_the_old_path_new_threads_take_the_new(make_engine):
    eng = make_engine(ew.v1)
    start(eng, "old")
    deploy(eng, ew.v2)
    start(eng, "new")
    assert written(eng, "old") == [{"hello": "old"}]
    assert written(eng, "new") == [{"audit": "new"}, {"hello": "new"}]
    assert eng.journal("old").patches == {} and eng.journal("new").patches == {"audit": 0}
    resume(eng, "old", "name", "ada")
    resume(eng, "new", "name", "bob")
    assert eng.result("old") == {"name": "ada", "audited": False}
    assert eng.result("new") == {"name": "bob", "audited": True}


def test_a_patch_an_old_thread_meets_live_is_taken_and_replays(make_engine):
    eng = make_engine(ew.v1)
    start(eng, "old")
    deploy(eng, ew.v3)
    resume(eng, "old", "name", "ada")  # step 1 runs v3 for the first time: "shout" is taken
    assert eng.journal("old").patches == {"shout": 1}
    eng.evict()  # the next event replays step 1, which must take "shout" again
    resume(eng, "old", "done", None)
    assert eng.result("old") == {"name": "ADA", "audited": False}


def test_an_unpatched_edit_parks_the_threads_in_flight(make_engine):
    eng = make_engine(ew.v1)
    start(eng, "old")
    deploy(eng, ew.v2_unsafe)
    resume(eng, "old", "name", "ada")
    status = eng.status("old")
    assert status["status"] == "failed" and "diverged" in status["error"]


def test_deprecating_a_patch_fails_exactly_the_threads_without_its_marker(make_engine):
    eng = make_engine(ew.v1)
    start(eng, "old")
    deploy(eng, ew.v2)
    start(eng, "new")
    deploy(eng, ew.v4)
    start(eng, "newest")
    for key in ("old", "new", "newest"):
        resume(eng, key, "name", key)
    assert "took the old path at step 0" in eng.status("old")["error"]
    assert eng.result("new") == eng.result("newest") | {"name": "new"}
    assert written(eng, "newest")[0] == {"audit": "newest"}


def test_patched_outside_a_workflow_says_where_it_works():
    import kwf

    with pytest.raises(RuntimeError, match=r"kwf.patched\(\) is only available inside"):
        kwf.patched("x")


# -- golden journals of both paths ----------------------------------------------------------------
def _golden_scripts() -> dict[str, Any]:
    return {"old": ew.v1, "new": ew.v2}


def record() -> None:
    """Write the goldens: a thread started by v1 and one started by v2, both in flight."""
    from test_golden import to_json

    GOLDEN.mkdir(exist_ok=True)
    for key, fn in _golden_scripts().items():
        with Engine(workflows=[fn]) as eng:
            start(eng, f"golden-patched-{key}")
            journal = eng.journal(f"golden-patched-{key}")
            assert journal is not None and not journal.finished
            (GOLDEN / f"{key}.json").write_text(to_json(journal) + "\n")


@pytest.mark.parametrize("key,audited", [("old", False), ("new", True)])
def test_golden_journals_of_both_paths_replay_and_continue_on_their_path(key, audited):
    from test_golden import from_json

    journal = from_json((GOLDEN / f"{key}.json").read_text())
    workflow = get(ew.NAME)
    assert isinstance(workflow, Workflow) and workflow.fn is ew.v2  # today's code
    instance = Instance.rebuild(workflow, journal, Settings())
    try:
        instance.apply((RESUME, journal.time + 1, "name", "ada", "99"))
        assert instance.main.result() == {"name": "ada", "audited": audited}
    finally:
        instance.dispose()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent.parent))
    sys.path.insert(0, str(Path(__file__).parent))
    record()

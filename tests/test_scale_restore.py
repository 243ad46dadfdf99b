"""A restart builds one ``_ThreadLogic`` per thread: a restored thread keeps its snapshot's
bytes and decodes them on its first record or timer (issue 13: restart time and memory)."""

from __future__ import annotations

import json

import flow_workflows as fw

from kwf.config import Settings
from kwf.engine.flow import _Item, _ThreadLogic, _Workers
from kwf.journal import encode
from kwf.protocol import Incoming, parse
from kwf.registry import Registry
from kwf.testing import Engine

RESUME = "workflow-resume"


def test_a_restored_thread_is_decoded_only_when_work_arrives() -> None:
    engine = Engine(workflows=fw.ALL)
    engine.send("w", "new:fnotify:{}")
    engine.send("d", "new:fnotify:{}")
    engine.send("d", json.dumps({"ref": "note", "value": "stop"}))
    registry, settings = Registry(fw.ALL), Settings()
    workers = _Workers(registry, settings)
    worker = workers.get()
    waiting = (encode(engine.journal("w")), None, False)  # type: ignore[arg-type]
    finished = engine.journal("d")
    assert finished is not None and finished.finished
    tomb = (encode(finished), finished.expires, True)

    w, d = _ThreadLogic(worker, waiting), _ThreadLogic(worker, tomb)
    assert (w.state, d.state) == (None, None)  # nothing decoded
    assert (worker.ctx.journals, worker.ctx.tombstones) == (2, 1)  # kwf_threads still right
    assert w.notify_at() is None and d.notify_at() is None  # no wakeup: the wheel holds d's
    assert w.snapshot() == waiting and d.snapshot() == tomb  # untouched: the same bytes

    rec = Incoming(RESUME, "w", json.dumps({"ref": "note", "value": "stop"}), 0.0, 0, 7)
    key, what = parse(rec, settings, registry)
    out, _ = w.on_item(_Item(key, rec, what))
    assert w.held is None and w.state is not None
    assert [r.value for r in out if getattr(r, "topic", None) == settings.result_topic] == ["0"]
    assert (worker.ctx.journals, worker.ctx.tombstones) == (2, 2)  # w finished: a tombstone

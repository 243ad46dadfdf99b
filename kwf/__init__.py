"""kwf: durable workflows as ordinary Python ``async def``, run by a Bytewax dataflow on Kafka.

>>> import kwf
>>> @kwf.workflow("doc-greet")
... async def greet(arg):
...     name = await kwf.suspend("name")
...     return f"hello {name}"
>>> from kwf.testing import Engine
>>> eng = Engine(workflows=[greet])
>>> _ = eng.send("t1", "new:{}")
>>> _ = eng.send("t1", '{"ref": "name", "value": "Ada"}')
>>> eng.result("t1")
'hello Ada'
"""

from kwf import config, registry
from kwf.api import (Suspend, all, as_completed, cancel, child, continue_as_new, deprecate_patch, first, gather,
                     journal_length, now, output, output_json, patched, race, random, rng,
                     start_child, step_id, suspend, thread_id, uuid4, wait)
from kwf.calls import CallTimeout, call
from kwf.errors import ChildFailed, ContinueAsNew, NonDeterminismError, RemoteError, WorkflowNotAvailable
from kwf.registry import workflow

__all__ = [
    "CallTimeout",
    "ChildFailed",
    "ContinueAsNew",
    "NonDeterminismError",
    "RemoteError",
    "Suspend",
    "WorkflowNotAvailable",
    "all",
    "as_completed",
    "call",
    "cancel",
    "child",
    "config",
    "continue_as_new",
    "deprecate_patch",
    "first",
    "gather",
    "journal_length",
    "now",
    "output",
    "output_json",
    "patched",
    "race",
    "random",
    "registry",
    "rng",
    "start_child",
    "step_id",
    "suspend",
    "thread_id",
    "uuid4",
    "wait",
    "workflow",
]

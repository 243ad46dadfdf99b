"""Parsing the wire protocol: every accepted form, and a stable code for every refusal."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kwf
from kwf.config import Settings
from kwf.protocol import (Cancel, Incoming, ProtocolError, Resume, Schedule, Start, parse,
                          parse_command)
from kwf.registry import Registry


@kwf.workflow("proto-a")
async def proto_a(arg):
    return arg


REGISTRY = Registry([proto_a])
SETTINGS = Settings(max_payload_bytes=100)


@pytest.mark.parametrize(("text", "command"), [
    ('new:{"x": 1}', Start(None, {"x": 1}, False)),
    ("new:proto-a:[1]", Start("proto-a", [1], False)),
    ("new:true", Start(None, True, False)),
    ("new:null", Start(None, None, False)),
    ("init:proto-a:null", Start("proto-a", None, True)),
    ('init:"s"', Start(None, "s", True)),
    ('{"ref": "0:1", "value": {"a": 1}}', Resume("0:1", value={"a": 1})),
    ('{"ref": "main"}', Resume("main")),
    ('{"ref": "0:1", "error": null}', Resume("0:1", error=None, is_error=True)),
    ("cancel:", Cancel(None)),
    ('cancel:{"why": "user"}', Cancel({"why": "user"})),
])
def test_accepted_forms(text, command):
    assert parse_command(text) == command


@pytest.mark.parametrize(("key", "value", "code"), [
    ("t", "hello", "bad-form"),
    ("t", "new:", "no-json"),
    ("t", "new: ", "no-json"),
    ("t", "init:", "no-json"),
    ("t", "new:proto-a:", "no-json"),
    ("t", "init:proto-a:", "no-json"),
    ("t", "new:{oops", "bad-json"),
    ("t", "new:NaN", "bad-json"),
    ("t", '{"value": 1}', "no-ref"),
    ("t", '{"ref": 5}', "no-ref"),
    ("t", "[1, 2]", "bad-form"),
    ("t", "new:nope:{}", "unknown-workflow"),
    ("t", b"\xff\xfe", "not-utf8"),
    ("t", None, "empty"),
    ("t", "new:" + "x" * 200, "too-large"),
    (None, "new:{}", "bad-key"),
    ("", "new:{}", "bad-key"),
    (b"\xff", "new:{}", "bad-key"),
])
def test_refusals_have_stable_codes(key, value, code):
    with pytest.raises(ProtocolError) as e:
        parse(Incoming("workflow-resume", key, value, 0.0), SETTINGS, REGISTRY)
    assert e.value.code == code
    assert str(e.value).startswith(f"{code}: ")


def test_plain_new_needs_a_default():
    two = Registry([proto_a, kwf.registry.get("proto-a")])  # one name: still a default
    assert two.default == "proto-a"

    @kwf.workflow("proto-b")
    async def proto_b(arg):
        return arg

    many = Registry([proto_a, proto_b])
    with pytest.raises(ProtocolError, match="no-default"):
        parse(Incoming("workflow-resume", "t", "new:{}", 0.0), SETTINGS, many)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("t1|{\"ref\":\"0:1\"}", "1500", Schedule("t1", '{"ref":"0:1"}', 11.5)),
    ("t1|x", "0", Schedule("t1", "x", None)),
    ("t1|x", None, Schedule("t1", "x", None)),
])
def test_scheduler_records(key, value, expected):
    assert parse(Incoming("workflow-scheduler", key, value, 10.0), SETTINGS, REGISTRY) == (
        "t1", expected)


@pytest.mark.parametrize(("key", "value"), [("nobar", "10"), ("|x", "10"), ("t|x", "soon"),
                                            ("t|x", "-5")])
def test_bad_scheduler_records(key, value):
    with pytest.raises(ProtocolError, match="bad-schedule"):
        parse(Incoming("workflow-scheduler", key, value, 0.0), SETTINGS, REGISTRY)


def test_core_does_not_import_bytewax_or_kafka():
    code = ("import sys, kwf, kwf.testing, kwf.thread, kwf.instance, kwf.journal, kwf.protocol;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('bytewax', 'confluent_kafka')];"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

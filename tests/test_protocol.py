"""Parsing the wire protocol: every accepted form, and a stable code for every refusal."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kwf
from kwf.config import Settings
from kwf.protocol import (Cancel, Incoming, ProtocolError, Resume, Schedule, Start, dumps, loads,
                          parse, parse_command, status_json)
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


# -- JSON: the fast paths give what the plain json calls give --------------------------------

_texts = st.text(alphabet=st.characters(codec=None, blacklist_categories=()), max_size=12)
_numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=300, deadline=None)
@given(thread=_texts, workflow=_texts, status=st.sampled_from(["running", "completed"]),
       step=st.integers(0, 10**6), pending=st.lists(st.one_of(_texts, st.integers()), max_size=3),
       timers=st.lists(_numbers, max_size=3), updated=_numbers)
def test_status_json_is_the_dict_encoded(thread, workflow, status, step, pending, timers,
                                         updated):
    """The status record written without a dict is byte for byte the dict's JSON, or None."""
    text = status_json(thread, workflow, status, step, pending, timers, updated)
    expected = dumps({"thread": thread, "workflow": workflow, "status": status, "step": step,
                      "pending": pending, "timers": timers, "updated": updated}, flat=True)
    plain = all(isinstance(p, str) for p in pending) and all(
        isinstance(x, int) or math.isfinite(x) for x in [*timers, updated])
    assert text == (expected if plain else None)
    expected.encode()  # valid UTF-8: lone surrogates escaped


@pytest.mark.parametrize("text", [
    '{"ref":"1:1","value":1}', ' {"a": 1}', '{"a": 1} ', '{"a": 1}x', '\ufeff{"a": 1}', "NaN",
    "[1e400]", "[-Infinity]", '"\\ud800"', '{"a":', "", " ", "123456789012345678901234567890",
    "[" * 65 + "]" * 65, "[" * 5000 + "]" * 5000, '{"a": 1, "a": 2}', '"\x01"', "1.5e-7"])
def test_loads_accepts_and_refuses_as_json_loads(text):
    """``loads`` parses once with a prebuilt decoder, and says what ``json.loads`` says."""
    try:
        expected = json.loads(text, parse_constant=_refuse, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        with pytest.raises(ProtocolError, match="bad-json") as got:
            loads(text)
        if isinstance(e, ValueError):
            assert str(got.value) == f"bad-json: {e} in {text[:80]!r}" or len(text) > 80
        return
    if text.count("[") > 64:
        with pytest.raises(ProtocolError, match="nested deeper than 64"):
            loads(text)
    else:
        assert loads(text) == expected


def _refuse(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} overflows a double")
    return value


def test_dumps_keeps_its_errors():
    """Cycles, NaN and objects fail as ``json.dumps`` makes them fail, and non-cycles pass."""
    loop: list = []
    loop.append(loop)
    shared = [1]
    for value, error in [(loop, "Circular reference detected"), ({"a": {"b": {}}}, None),
                         (float("nan"), "Out of range float values are not JSON compliant"),
                         ({1: object()}, "Object of type object is not JSON serializable"),
                         ([shared, shared], None)]:
        if error is None:
            assert dumps(value) == json.dumps(value, separators=(",", ":"))
        else:
            with pytest.raises((ValueError, TypeError), match=error):
                dumps(value)
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(RecursionError):
        dumps(deep)
    assert dumps("\ud800é") == '"\\ud800é"'

"""The wire protocol v1: parsing input records into commands, and the records kwf writes.

Shared by the dataflow and ``kwf.testing.Engine``, so that both accept and refuse exactly the
same records. Values are JSON at the boundary; nothing from Kafka is ever unpickled. A record
that does not parse raises ``ProtocolError`` whose ``code`` is the stable prefix of the
``kwf-error`` dead-letter header.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

from kwf import observe
from kwf.registry import NAME, RESERVED, UnknownWorkflow

if TYPE_CHECKING:
    from kwf.config import Settings
    from kwf.registry import Registry

Headers = tuple[tuple[str, Union[str, bytes]], ...]

MAX_KEY_BYTES = 4096
"""Thread ids longer than this are refused: a key appears three times in every status record."""

MAX_DEPTH = 64
"""JSON nested deeper is refused: the journal keeps values, and pickling them must not recurse
past Python's limit at snapshot time (a poison pill: every restart would fail again)."""

MAX_DELAY_MS = 10**12
"""The longest ``workflow-scheduler`` delay accepted: beyond it, dates stop being dates."""

_NAMED = re.compile(f"({NAME}):")


@dataclass(frozen=True)
class Record:
    """A record kwf writes (or dead-letters): what the sink produces and ``Engine`` returns."""

    topic: str
    key: str | bytes | None
    value: str | bytes | None
    headers: Headers = ()
    timestamp: float = 0.0

    def __init__(self, topic: str, key: str | bytes | None, value: str | bytes | None,
                 headers: Headers = (), timestamp: float = 0.0) -> None:
        # Written out: the ``__init__`` of a frozen dataclass sets each field through
        # ``object.__setattr__``, twice as slow, and records are made several times a step.
        d = self.__dict__
        d["topic"], d["key"], d["value"], d["headers"], d["timestamp"] = (
            topic, key, value, headers, timestamp)

    def header(self, name: str) -> str | None:
        """The first header called ``name``, decoded, or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode() if isinstance(value, bytes) else value
        return None

    def json(self) -> Any:
        """The value parsed as JSON."""
        return json.loads(self.value) if self.value is not None else None


@dataclass(frozen=True)
class Incoming:
    """A record as read from an input topic, before parsing."""

    topic: str
    key: bytes | str | None
    value: bytes | str | None
    timestamp: float
    partition: int = 0
    offset: int = 0
    """The record's Kafka offset in its partition: a step it causes makes suspend ids
    ``<offset>:<n>``, as the original's runtime did."""

    def __init__(self, topic: str, key: bytes | str | None, value: bytes | str | None,
                 timestamp: float, partition: int = 0, offset: int = 0) -> None:
        d = self.__dict__  # written out, as ``Record.__init__``
        d["topic"], d["key"], d["value"], d["timestamp"], d["partition"], d["offset"] = (
            topic, key, value, timestamp, partition, offset)

    @property
    def source(self) -> str:
        """``topic/partition/offset``, for the ``kwf-source`` dead-letter header and logs."""
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True)
class Start:
    """``new:`` / ``init:``: start a workflow (``workflow`` None means the default one)."""

    workflow: str | None
    arg: Any
    only_if_new: bool


@dataclass(frozen=True)
class StartChild(Start):
    """``child:{"workflow", "arg", "parent", "ref"}``: a child workflow, started by ``kwf.child``.

    kwf's extension of the seed's protocol (its forms are unchanged): like ``init:``, a thread
    that exists is left alone, but it must be this same child (a repeated record), else the
    start is refused; the child's end, or a refusal, goes to ``parent`` as a resume of ``ref``
    (no ``ref``: started by ``kwf.start_child``, nobody waits for it).
    """

    parent: str = ""
    ref: str | None = None

    @property
    def link(self) -> tuple[str, str | None]:
        return (self.parent, self.ref)


@dataclass(frozen=True)
class Resume:
    """``{"ref": id, "value": v}`` or ``{"ref": id, "error": e}``."""

    ref: str
    value: Any = None
    error: Any = None
    is_error: bool = False

    def __init__(self, ref: str, value: Any = None, error: Any = None,
                 is_error: bool = False) -> None:
        d = self.__dict__  # written out, as ``Record.__init__``
        d["ref"], d["value"], d["error"], d["is_error"] = ref, value, error, is_error


@dataclass(frozen=True)
class Cancel:
    """``cancel:`` / ``cancel:<json>``: cancel the whole thread."""

    payload: Any = None


@dataclass(frozen=True)
class Fire:
    """``timer:<due>``: the timer wheel's firing for one thread (``kwf.wheel``). The thread
    fires its durable timers due by ``due``, or drops its tombstone if it expired by then; a
    stale firing (the thread moved on) changes nothing. Anyone may send one: it fires nothing
    a record stamped ``due`` would not fire anyway."""

    due: float


TIMER_PREFIX = "timer:"


def timer_value(due: float) -> str:
    """The value of a firing record (``Fire``): ``timer:<due>``, the due time in epoch seconds."""
    return f"{TIMER_PREFIX}{due!r}"


Command = Union[Start, Resume, Cancel, Fire]


@dataclass(frozen=True)
class Schedule:
    """A ``workflow-scheduler`` record: send ``(key, value)`` to workflow-resume at ``due``."""

    key: str
    value: str
    due: float | None
    """None cancels what was scheduled for this key."""


class ProtocolError(ValueError):
    """A record kwf cannot accept; ``code`` is stable, the message says what to send instead."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def _reject_constant(name: str) -> Any:
    msg = f"{name} is not JSON"
    raise ValueError(msg)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        msg = f"{text} overflows a double"
        raise ValueError(msg)
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)
# Built once: ``json.loads`` with arguments builds a decoder on every call.
_scan = _DECODER.scan_once  # type: ignore[attr-defined]


def loads(text: str) -> Any:
    """Strict JSON (no NaN, no Infinity, no overflow, ``MAX_DEPTH`` levels at most)."""
    try:  # the common case, a value that fills the text; anything else takes ``json.loads``
        value, end = _scan(text, 0)
    except (StopIteration, ValueError, RecursionError):
        end = -1
    if end != len(text):  # whitespace around the value, or an error: json.loads says which
        try:
            value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
        except ValueError as e:
            raise ProtocolError("bad-json", f"{e} in {_clip(text)}") from None
        except RecursionError:
            raise ProtocolError("bad-json", f"nested deeper than {MAX_DEPTH} levels: "
                                            f"{_clip(text)}") from None
    # fewer brackets than levels allowed cannot nest too deep: skip the walk
    if text.count("[") + text.count("{") <= MAX_DEPTH or _shallow(value):
        return value
    raise ProtocolError("bad-json", f"nested deeper than {MAX_DEPTH} levels: {_clip(text)}")


def _shallow(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if type(item) is dict else item if type(item) is list else ()
        for child in children:
            if type(child) in (dict, list):
                if depth >= MAX_DEPTH:
                    return False
                stack.append((child, depth + 1))
    return True


def _clip(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


_COMPACT = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_FLAT = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":"))
_SURROGATE = re.compile("[\ud800-\udfff]")
# The C encoders ``JSONEncoder.encode`` builds on every call, built once. Without a cycle
# check (its state would outlive a failed call): a cycle then overflows the stack, and
# ``dumps`` asks ``_COMPACT`` again for its exact error.
_encode_compact: Any = None
_encode_flat: Any = None
if c_make_encoder is not None:
    _encode_compact = c_make_encoder(None, _COMPACT.default, encode_basestring, None, ":", ",",
                                     False, False, False)
    _encode_flat = c_make_encoder(None, _FLAT.default, encode_basestring, None, ":", ",",
                                  False, False, True)


def _valid_utf8(text: str) -> str:
    """``text`` with lone surrogates escaped as ``\\uXXXX``, so that it encodes to UTF-8."""
    if not text.isascii() and _SURROGATE.search(text):
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def dumps(value: Any, *, flat: bool = False) -> str:
    """JSON text as ``JSON.stringify`` writes it: compact, keys in the order given, non-ASCII
    characters as themselves (lone surrogates escaped, so the text is valid UTF-8).

    Raises ``ValueError`` (NaN, infinities, cycles), ``RecursionError`` (too deep) or
    ``TypeError`` for what JSON cannot hold. ``flat=True`` is for kwf's own records, which
    have no cycles: NaN and infinities are written as Python's ``json`` writes them.
    """
    encode = _encode_flat if flat else _encode_compact
    if encode is None:  # a Python without the json accelerator
        text: str = (_FLAT if flat else _COMPACT).encode(value)
    else:
        try:
            text = "".join(encode(value, 0))
        except RecursionError:
            if flat:
                raise
            text = _COMPACT.encode(value)  # a cycle (ValueError) or truly too deep
    return _valid_utf8(text)


def _number(value: Any) -> str:
    """An int or a finite float as ``json`` writes it; ``ValueError`` for anything else."""
    if type(value) is float:
        if value - value == 0.0:  # finite
            return float.__repr__(value)
    elif type(value) is int:
        return int.__repr__(value)
    raise ValueError(value)


def status_json(thread: str, workflow: str, status: str, step: int, pending: Iterable[str],
                timers: Iterable[float], updated: float) -> str | None:
    """A thread's ``workflow-events`` value in its common form, written without a dict:
    ``dumps({"thread": ..., "workflow": ..., "status": ..., "step": ..., "pending": [...],
    "timers": [...], "updated": ...}, flat=True)`` exactly, or None when a part is not a
    plain string or number (the caller then builds the dict). ``status`` is one of the
    journal's statuses, which JSON writes as they are."""
    try:
        text = (f'{{"thread":{encode_basestring(thread)},"workflow":'
                f'{encode_basestring(workflow)},"status":"{status}","step":{_number(step)},'
                f'"pending":[{",".join(map(encode_basestring, pending))}],'
                f'"timers":[{",".join(map(_number, timers))}],'
                f'"updated":{_number(updated)}}}')
    except (TypeError, ValueError):
        return None
    return _valid_utf8(text)


def decode_key(key: bytes | str | None) -> str:
    """A thread id: a non-empty UTF-8 string."""
    if isinstance(key, bytes):
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad-key", "the key is not UTF-8; keys are thread ids") from None
    if not key:
        raise ProtocolError("bad-key", "the record has no key; the key is the thread id")
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
        raise ProtocolError("bad-key", f"the key is longer than {MAX_KEY_BYTES} bytes; "
                                       "thread ids are short names")
    return key


def decode_value(value: bytes | str | None, max_bytes: int) -> str:
    """The value as text, within the size limit."""
    if value is None:
        raise ProtocolError("empty", "the record has no value; send new:<json>, "
                                     '{"ref": ..., "value": ...} or cancel:')
    size = len(value) if isinstance(value, bytes) or value.isascii() else len(value.encode())
    if size > max_bytes:
        raise ProtocolError("too-large", f"{size} bytes, over the limit of {max_bytes} "
                                         "(KWF_MAX_PAYLOAD_BYTES); send a reference instead")
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("not-utf8", "the value is not UTF-8 text") from None
    return value


def parse_command(text: str) -> Command:
    """Parse a ``workflow-resume`` value (already decoded) into a command.

    >>> parse_command('new:trip:{"x": 1}')
    Start(workflow='trip', arg={'x': 1}, only_if_new=False)
    >>> parse_command('{"ref": "0:1", "error": "no car"}')
    Resume(ref='0:1', value=None, error='no car', is_error=True)
    """
    if text[:1] == "{":  # a resume, most records: no prefix can match
        return _resume(text)
    for prefix, only_if_new in (("new:", False), ("init:", True)):
        if text.startswith(prefix):
            rest = text[len(prefix):]
            name = None
            match = _NAMED.match(rest)
            if match and match.group(1) not in RESERVED:
                name, rest = match.group(1), rest[match.end():]
            if not rest.strip():
                form = f"{prefix}{name}:" if name else prefix
                raise ProtocolError("no-json", f"{_clip(text)} carries no JSON argument; send "
                                    f"{form}<json> (for no argument, {form}null)")
            return Start(name, loads(rest), only_if_new)
    if text.startswith("child:"):
        return _child(loads(text[len("child:"):]), text)
    if text.startswith("cancel:"):
        rest = text[len("cancel:"):]
        return Cancel(loads(rest) if rest.strip() else None)
    if text.startswith(TIMER_PREFIX):
        return _fire(text)
    if not text.lstrip().startswith("{"):
        raise ProtocolError("bad-form", f"{_clip(text)} is none of new:<json>, "
                            'new:<name>:<json>, init:..., cancel:, {"ref": ..., "value": ...}, timer:<due>')
    return _resume(text)


def _resume(text: str) -> Resume:
    obj = loads(text)
    ref = obj.get("ref") if isinstance(obj, dict) else None
    if not isinstance(ref, str):
        raise ProtocolError("no-ref", f'a resume needs a string "ref"; got {_clip(text)}')
    if "error" in obj:
        return Resume(ref, error=obj["error"], is_error=True)
    return Resume(ref, value=obj.get("value"))


def _child(obj: Any, text: str) -> StartChild:
    if not isinstance(obj, dict):
        raise ProtocolError("bad-child", f"child: takes a JSON object, got {_clip(text)}")
    name, parent, ref = obj.get("workflow"), obj.get("parent"), obj.get("ref")
    if not (isinstance(name, str) and _NAMED.fullmatch(name + ":") and name not in RESERVED):
        raise ProtocolError("bad-child", f'"workflow" must be a workflow name; got {_clip(text)}')
    if not (isinstance(parent, str) and parent) or not (ref is None or isinstance(ref, str)):
        raise ProtocolError("bad-child", '"parent" must be a thread id and "ref" a string or '
                                         f"null; got {_clip(text)}")
    return StartChild(name, obj.get("arg"), True, parent, ref)


def child_value(workflow: str, arg: Any, parent: str, ref: str | None) -> str:
    """The ``child:`` record a parent writes to ``workflow-resume`` (key: the child's id)."""
    return "child:" + dumps({"workflow": workflow, "arg": arg, "parent": parent, "ref": ref})


def _fire(text: str) -> Fire:
    try:
        due = _finite(text[len(TIMER_PREFIX):])
    except ValueError:
        due = math.nan
    if math.isnan(due):
        raise ProtocolError("bad-timer", f"{_clip(text)} is not timer:<due>, the due time in "
                            "seconds since the epoch; kwf's timer wheel writes these")
    return Fire(due)


def parse_schedule(rec: Incoming, max_bytes: int) -> Schedule:
    """Parse a ``workflow-scheduler`` record: key ``a|b``, value a delay in ms (``0``/null cancels)."""
    key = decode_key(rec.key)
    if "|" not in key:
        raise ProtocolError("bad-schedule", f"key {_clip(key)} has no '|'; scheduler keys are "
                                            "<thread>|<resume value>")
    a, b = key.split("|", 1)
    if not a:
        raise ProtocolError("bad-schedule", "the part before '|' (the thread id) is empty")
    if rec.value is None:
        return Schedule(a, b, None)
    text = decode_value(rec.value, max_bytes).strip()
    try:
        delay_ms = int(text)
    except ValueError:
        raise ProtocolError("bad-schedule", f"value {_clip(text)} is not a delay in "
                                            "milliseconds") from None
    if not 0 <= delay_ms <= MAX_DELAY_MS:
        raise ProtocolError("bad-schedule", f"delay {_clip(text)} ms is not between 0 and "
                                            f"{MAX_DELAY_MS} (about 30 years)")
    return Schedule(a, b, None if delay_ms == 0 else rec.timestamp + delay_ms / 1000)


DLQ_KEEP_BYTES = 65536
"""What a dead letter keeps of a key or value when the whole record would be refused."""

KAFKA_MESSAGE_MAX_BYTES = 1_000_000
"""librdkafka's default ``message.max.bytes``, the largest record a producer sends (below the
broker's default limit of 1,048,588 bytes per batch)."""

_RECORD_OVERHEAD = 512
"""What librdkafka counts beyond key, value and header bytes (record framing), with room."""


def message_max_bytes(conf: Mapping[str, Any]) -> int:
    """The producer's ``message.max.bytes`` in librdkafka settings, or librdkafka's default."""
    return int(conf.get("message.max.bytes", KAFKA_MESSAGE_MAX_BYTES))


def dead_letter(rec: Incoming, dlq_topic: str, error: str,
                max_bytes: int = KAFKA_MESSAGE_MAX_BYTES) -> Record:
    """The record unchanged, to the dead-letter topic, with what is wrong and where it came from.

    The record is kept whole whenever Kafka can take it: only when its key, value and headers
    together are over ``max_bytes`` (the producer's ``message.max.bytes``, which
    ``message_max_bytes`` reads; a write over it would be refused and the engine would stop on
    it after every restart) are key and value cut to ``DLQ_KEEP_BYTES`` each, and the header
    ``kwf-truncated`` gives the original sizes.
    """
    key, value = rec.key, rec.value
    headers: Headers = (("kwf-error", error), ("kwf-source", rec.source))
    key_size, value_size = _size(key), _size(value)
    size = key_size + value_size + sum(_size(n) + _size(v) for n, v in headers)
    if size + _RECORD_OVERHEAD > max_bytes:
        key, value = _cut(key), _cut(value)
        headers += (("kwf-truncated", f"key {key_size} bytes, value {value_size} bytes"),)
    code = error.partition(":")[0]
    observe.stats.dead_letter(code if _CODE.fullmatch(code) else "other")
    return Record(dlq_topic, key, value, headers, rec.timestamp)


_CODE = re.compile(r"[a-z][a-z0-9-]{0,31}")


def _size(data: str | bytes | None) -> int:
    if data is None:
        return 0
    return len(data) if isinstance(data, bytes) else len(data.encode(errors="surrogatepass"))


def _cut(data: str | bytes | None) -> bytes | None:
    if data is None:
        return None
    raw = data if isinstance(data, bytes) else data.encode(errors="surrogatepass")
    return raw[:DLQ_KEEP_BYTES]


def output_record(topic: str, key: str, value: str | None, *, thread: str, seq: int, step: int,
                  time: float, extra: Headers = ()) -> Record:
    """A record a thread writes, with the headers consumers use to order and deduplicate."""
    headers = (("kwf-thread", thread), ("kwf-seq", str(seq)), ("kwf-step", str(step))) + extra
    return Record(topic, key, value, headers, time)


def parse(rec: Incoming, settings: Settings, registry: Registry) -> tuple[str, Command | Schedule]:
    """Route an input record: its key (thread id) and what it asks, or ``ProtocolError``.

    Validation that needs no thread state happens here (including the workflow name of a
    start), so that the per-thread logic only sees records it can act on.
    """
    if rec.topic == settings.scheduler_topic:
        schedule = parse_schedule(rec, settings.max_payload_bytes)
        return schedule.key, schedule
    key = decode_key(rec.key)
    command = parse_command(decode_value(rec.value, settings.max_payload_bytes))
    if isinstance(command, Start) and not isinstance(command, StartChild):
        try:  # a child's refusal goes to its parent too: the thread's rules handle it
            registry.resolve(command.workflow)
        except UnknownWorkflow as e:
            raise ProtocolError("unknown-workflow" if command.workflow else "no-default",
                                str(e)) from None
    return key, command

"""A picture of a thread: its history (``kwf.history``) drawn as hand-written SVG.

Time runs left to right. Each distinct instant of the thread (a step, a timer's due time) is one
column, labelled with the time since the start, so that a saga of milliseconds and a two-week
approval both read well. Rows: the steps (one mark per journal step, the start included, named
by what woke it), the waits (one bar per suspend id, from the step that made it to the step that
settled it), the timers (a diamond at the due time, filled once fired), one row per output topic
(compensations, topics with "cancel" in their name, in red), and the end: the result or the error.

It needs only core data, so it lives in the core (private), where ``Engine.timeline`` reaches it;
``kwf timeline`` draws the same picture from a recovery store. No dependency beyond the stdlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from kwf.config import Settings
from kwf.history import History, Step
from kwf.journal import TIMER

_LEFT, _COL, _ROW, _TOP = 170, 90, 34, 44
_COLOURS = {"start": "#2b6cb0", "resume": "#2f855a", "error": "#c05621", "timer": "#6b46c1",
            "cancel": "#c53030"}


def duration(seconds: float) -> str:
    """``3 h``, ``2.5 s``, ``4 d``: a span as a person reads it."""
    s = abs(seconds)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0)):
        if s >= size:
            value = s / size
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.3g} {unit}"
    return f"{s * 1000:.3g} ms" if s else "0 s"


@dataclass
class Timeline:
    """The SVG picture of a ``History``; ``_repr_svg_`` makes Jupyter show it inline."""

    history: History
    settings: Settings

    @property
    def svg(self) -> str:
        return _render(self.history, self.settings)

    def _repr_svg_(self) -> str:
        return self.svg

    def save(self, path: str | Path) -> Path:
        """Write the SVG to ``path``; returns it."""
        target = Path(path)
        target.write_text(self.svg, encoding="utf-8")
        return target


def _render(history: History, settings: Settings) -> str:
    j, steps = history.journal, history.steps
    times = sorted({s.time for s in steps} | {t for s in steps for t in s.timers} | {j.started})
    col: dict[float, float] = {t: float(_LEFT + 20 + i * _COL) for i, t in enumerate(times)}
    topics = sorted({r.topic for s in steps for r in s.outputs}
                    - {settings.events_topic, settings.result_topic, settings.error_topic},
                    key=lambda t: ("cancel" in t, t))  # compensations below what they undo
    rows = ["steps", "waits", "timers", *topics, "end"]
    y = {name: _TOP + 30 + i * _ROW for i, name in enumerate(rows)}
    width = _LEFT + 200 + len(times) * _COL  # room for the end's label
    height = y["end"] + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           _text(10, 20, f"thread {j.thread} - workflow {history.workflow} - {j.status}",
                 size=14, weight="bold")]
    if history.note:
        out.append(_text(10, 36, history.note, fill="#744210"))
    for name in rows:
        label = f"→ {name}" if name in topics else name
        fill = _COLOURS["cancel"] if "cancel" in name else "#333"
        out.append(_text(10, y[name] + 4, label, fill=fill))
        out.append(f'<line x1="{_LEFT}" y1="{y[name]}" x2="{width - 20}" y2="{y[name]}" '
                   'stroke="#e2e8f0"/>')
    for t in times:  # the axis: one column per instant, labelled from the start
        x = col[t]
        out.append(f'<line x1="{x}" y1="{_TOP + 12}" x2="{x}" y2="{height - 30}" '
                   'stroke="#edf2f7" stroke-dasharray="2,3"/>')
        out.append(_text(x, height - 14, f"+{duration(t - j.started)}", anchor="middle"))
    out += _waits(steps, col, y["waits"])
    out += _timers(steps, col, y["timers"])
    for step in steps:
        out.append(_step_mark(step, col[step.time], y["steps"]))
        for rec in step.outputs:
            if rec.topic in y:
                out.append(_output_mark(step, rec.topic, rec.value, col[step.time], y[rec.topic]))
    out += _end(history, settings, col, y["end"])
    out.append("</svg>")
    return "\n".join(out)


def _step_mark(step: Step, x: float, y: float) -> str:
    kind = step.kind
    colour = "#e53e3e" if step.diverged else _COLOURS.get(kind, "#333")
    what = kind if step.ref is None else f"{kind} {step.ref}"
    tip = f"step {step.number}: {what}" + (f" - DIVERGED: {step.diverged}" if step.diverged else "")
    return (f'<g class="step" data-step="{step.number}" data-kind="{escape(kind)}">'
            f'<title>{escape(tip)}</title>'
            f'<circle cx="{x}" cy="{y}" r="7" fill="{colour}"/>'
            + _text(x, y - 11, _clip(what, 16), anchor="middle") + "</g>")


def _waits(steps: list[Step], col: dict[float, float], y: float) -> list[str]:
    """One bar per suspend id, from the step that made it to the step that settled it."""
    opened: dict[str, float] = {}
    bars: list[tuple[str, float, float | None]] = []
    for step in steps:
        for ref in [r for r in opened if r not in step.pending]:
            bars.append((ref, opened.pop(ref), step.time))
        for ref in step.pending:
            opened.setdefault(ref, step.time)
    bars += [(ref, since, None) for ref, since in opened.items()]
    marks = []
    lane = len({ref for ref, _, _ in bars}) > 1
    for i, (ref, since, until) in enumerate(bars):
        x0 = col[since]
        x1 = col[until] if until is not None else x0 + _COL * 0.6
        dy = (i % 3 - 1) * 9 if lane else 0
        state = "settled" if until is not None else "pending"
        marks.append(f'<g class="wait" data-ref={quoteattr(ref)}><title>'
                     f'{escape(f"wait {ref}: {state}")}</title>'
                     f'<rect x="{x0}" y="{y + dy - 3}" width="{max(x1 - x0, 4)}" height="6" '
                     f'rx="3" fill="{"#68d391" if until is not None else "#f6ad55"}"/>'
                     + _text(max(x1, x0 + 4) + 3, y + dy + 3, _clip(ref, 12), size=9) + "</g>")
    return marks


def _timers(steps: list[Step], col: dict[float, float], y: float) -> list[str]:
    fired = {s.time for s in steps if s.event is not None and s.event[0] == TIMER}
    marks = []
    for due in sorted({t for s in steps for t in s.timers}):
        x = col[due]
        filled = due in fired
        marks.append(f'<g class="timer" data-due="{due}"><title>timer due at +'
                     f'{escape(duration(due - steps[0].time))}'
                     f'{" (fired)" if filled else ""}</title>'
                     f'<path d="M{x} {y - 7} L{x + 7} {y} L{x} {y + 7} L{x - 7} {y} Z" '
                     f'fill="{_COLOURS["timer"] if filled else "white"}" '
                     f'stroke="{_COLOURS["timer"]}"/></g>')
    return marks


def _output_mark(step: Step, topic: str, value: Any, x: float, y: float) -> str:
    colour = _COLOURS["cancel"] if "cancel" in topic else "#3182ce"
    return (f'<g class="output" data-topic={quoteattr(topic)} data-step="{step.number}">'
            f'<title>{escape(f"{topic}: {_clip(str(value), 200)}")}</title>'
            f'<rect x="{x - 5}" y="{y - 5}" width="10" height="10" fill="{colour}"/>'
            + _text(x + 8, y + 4, _clip(str(value), 14), size=9) + "</g>")


def _end(history: History, settings: Settings, col: dict[float, float], y: float) -> list[str]:
    ends = [(s, r) for s in history.steps for r in s.outputs
            if r.topic in (settings.result_topic, settings.error_topic)]
    if not ends and history.journal.finished:  # a tombstone: the result is in the journal
        last = max(col)
        kind = "result" if history.journal.status == "completed" else "error"
        return [_end_mark(kind, history.journal.result, col[last], y)]
    return [_end_mark("result" if r.topic == settings.result_topic else "error", r.value,
                      col[s.time], y) for s, r in ends]


def _end_mark(kind: str, value: Any, x: float, y: float) -> str:
    colour = "#2f855a" if kind == "result" else "#c53030"
    return (f'<g class="{kind}"><title>{escape(f"{kind}: {_clip(str(value), 500)}")}</title>'
            f'<rect x="{x - 8}" y="{y - 8}" width="16" height="16" rx="8" fill="{colour}"/>'
            + _text(x + 12, y + 4, f"{kind}: {_clip(str(value), 40)}", fill=colour) + "</g>")


def _text(x: float, y: float, text: str, *, size: int = 11, anchor: str = "start",
          fill: str = "#333", weight: str = "normal") -> str:
    return (f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
            f'font-weight="{weight}">{escape(text)}</text>')


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"

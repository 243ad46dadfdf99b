"""Workflows by name: the ``@kwf.workflow`` decorator, module loading and default resolution.

A workflow is registered once, at import of its module; an engine serves a ``Registry``, a
fixed selection of them, so that two engines in one process (tests, notebooks) can serve
different sets.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, TypeVar, cast, overload

from kwf.observe import where

NAME = r"[A-Za-z_][A-Za-z0-9_.-]*"
"""A workflow name, as ``new:<name>:<json>`` carries it."""
RESERVED = frozenset({"true", "false", "null"})
"""Names that would read as the JSON of ``new:<json>``."""
_NAME_RE = re.compile(NAME + r"\Z")

WorkflowFn = Callable[[Any], Awaitable[Any]]
F = TypeVar("F", bound=WorkflowFn)


@dataclass(frozen=True)
class Workflow:
    """A registered workflow: its name, function, and a fingerprint of its module's source.

    The fingerprint goes into each journal so that a log line can say "the code changed since
    this thread started"; determinism itself is checked by replay, not by the fingerprint.
    """

    name: str
    fn: WorkflowFn
    fingerprint: str
    location: str


_REGISTERED: dict[str, Workflow] = {}


def _fingerprint(fn: WorkflowFn) -> tuple[str, str]:
    try:
        source = inspect.getsource(inspect.getmodule(fn) or fn)
        line = inspect.getsourcelines(fn)[1]
    except (OSError, TypeError):  # defined in a notebook cell or by exec
        source, line = getattr(fn, "__qualname__", repr(fn)), 0
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    location = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
    file = getattr(getattr(fn, "__code__", None), "co_filename", "?")
    return digest, f"{location} ({file}:{line})"


def check_name(name: str) -> str:
    """Return ``name`` if it can appear in ``new:<name>:<json>``, else raise ``ValueError``."""
    if not _NAME_RE.match(name) or name in RESERVED:
        msg = (
            f"workflow name {name!r} is not valid; names match [A-Za-z_][A-Za-z0-9_.-]* "
            "and are not true/false/null, so that new:<name>:<json> is unambiguous"
        )
        raise ValueError(msg)
    return name


@overload
def workflow(name: F) -> F: ...
@overload
def workflow(name: str | None = None) -> Callable[[F], F]: ...
def workflow(name: Any = None) -> Any:
    """Register an ``async def`` as a workflow, under ``name`` or its function name.

    >>> import kwf
    >>> @kwf.workflow("doc-hello")
    ... async def hello(arg):
    ...     return f"hello {arg['who']}"
    >>> kwf.registry.get("doc-hello").name
    'doc-hello'
    """
    if callable(name):
        return workflow(None)(name)

    def register(fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            msg = f"@kwf.workflow needs an async def; {fn!r} is not one"
            raise TypeError(msg)
        wf_name = check_name(name or fn.__name__)
        fingerprint, location = _fingerprint(fn)
        _REGISTERED[wf_name] = Workflow(wf_name, fn, fingerprint, location)
        fn.__kwf_workflow__ = _REGISTERED[wf_name]  # type: ignore[attr-defined]
        return cast(F, fn)  # iscoroutinefunction narrowed it

    return register


def get(name: str) -> Workflow | None:
    """The workflow registered under ``name``, if any."""
    return _REGISTERED.get(name)


def registered() -> list[Workflow]:
    """Every workflow registered in this process, in registration order."""
    return list(_REGISTERED.values())


def load_modules(names: Iterable[str]) -> None:
    """Import workflow modules; a package also has its public submodules imported.

    Importing is what registers workflows and declares output topics, so the engine and
    ``kwf topics create`` call this with ``Settings.workflows``.

    Raises ``WorkflowImportError`` naming the module, the file and line where its import
    failed, and the exception (chained, with the traceback of the module's frames).
    """
    for name in names:
        module = _import(name)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if not info.name.startswith("_"):
                _import(f"{name}.{info.name}")


class WorkflowImportError(ImportError):
    """A workflow module failed to import; the message names the file and line."""


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any error of user code at import
        at = where(e)
        msg = (f"cannot import workflow module {name!r}: {type(e).__name__}: {e}"
               f"{f' (at {at})' if at else ''}")
        raise WorkflowImportError(msg, name=name) from e


class UnknownWorkflow(LookupError):
    """A start record names no workflow this engine serves (or there is no default)."""


class Registry:
    """The workflows one engine serves, and which of them plain ``new:<json>`` starts."""

    def __init__(self, workflows: Iterable[Workflow | WorkflowFn] | None = None,
                 default: str | None = None) -> None:
        chosen = registered() if workflows is None else [_as_workflow(w) for w in workflows]
        self.workflows = {w.name: w for w in chosen}
        if default is None and len(self.workflows) == 1:
            default = next(iter(self.workflows))
        if default is not None and default not in self.workflows:
            msg = f"default workflow {default!r} is not among {sorted(self.workflows)}"
            raise ValueError(msg)
        self.default = default

    def resolve(self, name: str | None) -> Workflow:
        """The workflow a start record names, or the default for ``new:<json>``."""
        if name is None:
            if self.default is None:
                msg = (f"no default workflow: name one (new:<name>:<json>) or set "
                       f"KWF_DEFAULT_WORKFLOW; served: {sorted(self.workflows)}")
                raise UnknownWorkflow(msg)
            return self.workflows[self.default]
        try:
            return self.workflows[name]
        except KeyError:
            msg = f"unknown workflow {name!r}; served: {sorted(self.workflows)}"
            raise UnknownWorkflow(msg) from None


def _as_workflow(item: Workflow | WorkflowFn) -> Workflow:
    if isinstance(item, Workflow):
        return item
    wf: Workflow | None = getattr(item, "__kwf_workflow__", None)
    if wf is None:
        msg = f"{item!r} is not a workflow; decorate it with @kwf.workflow"
        raise TypeError(msg)
    return wf

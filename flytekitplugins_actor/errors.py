"""Named failure states of actor executions, as seen by a local driver."""

from __future__ import annotations

import copyreg
from typing import Any, Dict, Tuple


class ActorError(RuntimeError):
    """Base class of actor failures that are not the task's own exception."""


class ActorTaskFailed(ActorError):
    """The task failed on its replica and its exception could not be sent back as an object."""


class ReplicaDied(ActorError):
    """The replica running the execution died (crash, os._exit, OOM kill, signal); a new replica takes its place."""


class ExecutionCancelled(ActorError):
    """The execution was cancelled (its pool shut down, or it was aborted) before it finished."""


def make_portable(exc: BaseException) -> None:
    """Lets `exc` (and its cause/context chain) travel by pickle even when its type cannot be rebuilt from its args.

    Pickle rebuilds an exception as ``type(*args)``: an ``__init__(self, code, detail)`` that passes one message to
    ``super().__init__`` fails on the way back. For such types (only those), a reducer is registered that rebuilds
    the exception without calling ``__init__``: type, args and attributes, as raised."""
    import cloudpickle

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cls = type(exc)
        if cls not in copyreg.dispatch_table:
            try:
                cloudpickle.loads(cloudpickle.dumps(exc))
            except Exception:
                copyreg.pickle(cls, _reduce_exception)
        exc = exc.__cause__ or exc.__context__


def _reduce_exception(exc: BaseException) -> Tuple[Any, ...]:
    return (rebuild_exception, (type(exc), exc.args, dict(getattr(exc, "__dict__", None) or {})))


def rebuild_exception(cls: type, args: Tuple[Any, ...], state: Dict[str, Any]) -> BaseException:
    """An exception of `cls` with `args` and attributes `state`, made without calling its ``__init__``."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc

"""Named failure states of actor executions, as seen by a local driver."""

from __future__ import annotations


class ActorError(RuntimeError):
    """Base class of actor failures that are not the task's own exception."""


class ActorTaskFailed(ActorError):
    """The task failed on its replica and its exception could not be sent back as an object."""


class ReplicaDied(ActorError):
    """The replica running the execution died (crash, os._exit, OOM kill, signal); a new replica takes its place."""


class ExecutionCancelled(ActorError):
    """The execution was cancelled (its pool shut down, or it was aborted) before it finished."""

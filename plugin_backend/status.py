"""What GetTask (or ExecuteTaskSync) answers about an execution, before it becomes a flytekit Resource."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from flyteidl.core import literals_pb2
from flyteidl.core.execution_pb2 import TaskExecution, TaskLog

from flytekitplugins_actor.replica.error import ExecutionError

TERMINAL_PHASES = (TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED)


@dataclass(frozen=True)
class Status:
    """A phase, its message (the console shows it), log links, inline outputs (sync answers only) and custom info."""

    phase: int
    message: str = ""
    log_links: List[TaskLog] = field(default_factory=list)
    outputs: Optional[literals_pb2.LiteralMap] = None
    custom_info: Optional[dict] = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES


def log_links(replicas: List[Tuple[str, Optional[str]]]) -> List[TaskLog]:
    """One log link per replica that ran (part of) the execution; a bare path becomes a file:// URI."""
    links = []
    for name, uri in replicas:
        if uri:
            if "://" not in uri:
                uri = f"file://{uri}"
            links.append(TaskLog(uri=uri, name=f"Actor replica {name}", message_format=TaskLog.UNKNOWN))
    return links


def failure(error: Optional[ExecutionError], where: str, links: List[TaskLog]) -> Status:
    """A failed execution's status from its error: RETRYABLE_FAILED when the error is recoverable."""
    if error is None:
        return Status(TaskExecution.FAILED, f"[Error] {where}: unknown error", links)
    phase = TaskExecution.RETRYABLE_FAILED if error.recoverable else TaskExecution.FAILED
    return Status(phase, f"[{error.code or 'Error'}] {where}: {error.message}", links)

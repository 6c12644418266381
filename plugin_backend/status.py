"""What GetTask (or ExecuteTaskSync) answers about an execution, before it becomes a flytekit Resource."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

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


def waiting_for_resources(pool: Any, env_name: str) -> Optional[Status]:
    """WAITING_FOR_RESOURCES with the platform's reason (e.g. the scheduler's Unschedulable message) while no replica
    of the pool is ready and a starting one says why it waits (`Replica.waiting_reason`, set by the backend)."""
    from flytekitplugins_actor.replica.backend import ReplicaState

    replicas = pool.replicas
    if any(r.state is ReplicaState.READY for r in replicas):
        return None
    reasons = [(r.name, r.waiting_reason) for r in replicas if r.state is ReplicaState.STARTING and r.waiting_reason]
    if not reasons:
        return None
    name, reason = reasons[0]
    return Status(
        TaskExecution.WAITING_FOR_RESOURCES,
        f"waiting for resources: replica {name} of actor environment {env_name}: {reason}",
    )


class SyncOverrun(enum.Enum):
    """Why an actor_sync execution was cancelled at the end of its budget (the answer says what to change)."""

    POOL_STARTING = "pool_starting"  # no replica was ready yet: a cold pool
    TOO_LONG = "too_long"  # it ran on a replica past the budget
    NO_FREE_REPLICA = "no_free_replica"  # every replica stayed busy with other executions
    ABANDONED = "abandoned"  # propeller gave up first (its ExecuteTaskSync deadline is shorter than the budget)

"""What the service tracks per execution, one kind per task type behind one interface: a single execution on a
replica (`SingleRun`, for actor and actor_sync), a map fanned out over the pool (`MapRunView`, over MapRun), or
an execution a restarted connector answers from storage alone (`StoredRun`).

The service never branches on the kind: it asks a run for its status, aborts it (DeleteTask), waits for it (the
sync path) and releases it once terminal (drops what its pool keeps for it).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Optional

from flyteidl.core.execution_pb2 import TaskExecution

from flytekitplugins_actor.constants import CANCEL_GRACE_S
from flytekitplugins_actor.map_model import MapPhase
from flytekitplugins_actor.pool import Execution, ExecutionState, ReplicaPool
from flytekitplugins_actor.replica.backend import DeathCause
from plugin_backend.map_run import MapRun
from plugin_backend.status import Status, failure, log_links, waiting_for_resources

"""How long a cancelled execution may take to stop before its replica is replaced."""
MAP_ABORT_WAIT_S = 10.0
"""How long DeleteTask waits for a map's coordinator to cancel its in-flight items."""


def pending(pool: Optional[ReplicaPool], env_name: str) -> Status:
    """What an execution no replica has taken yet answers (a single execution queued, a map none of whose items
    reached a replica): WAITING_FOR_RESOURCES with the platform's reason, INITIALIZING while its pool's first
    replicas start, else QUEUED behind the pool's other work. `pool` None: not created yet (or reaped)."""
    if pool is None:
        return Status(TaskExecution.QUEUED, f"queued for actor environment {env_name}")
    waiting = waiting_for_resources(pool, env_name)
    if waiting is not None:
        return waiting
    stats = pool.stats()
    if stats["starting"] and not stats["busy"] and not stats["idle"]:
        return Status(
            TaskExecution.INITIALIZING, f"starting {stats['starting']} replica(s) of actor environment {env_name}"
        )
    return Status(
        TaskExecution.QUEUED,
        f"queued for actor environment {env_name}: "
        f"{stats['queued']} queued, {stats['busy']} of {stats['replicas']} replicas busy",
    )


class Run(abc.ABC):
    """One execution the connector serves, whatever its kind."""

    @property
    @abc.abstractmethod
    def terminal(self) -> bool:
        """True once the run has ended (succeeded, failed, aborted, or its replica died)."""

    @abc.abstractmethod
    def status(self) -> Status:
        """What GetTask answers now."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Cancels the run (DeleteTask) without waiting for it to end: the pool escalates past the grace."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """Blocks until the run is terminal or `timeout` passes; True when terminal."""

    def release(self) -> None:
        """Drops what the pool keeps for a terminal run (a pool that never goes idle would keep it forever)."""


class SingleRun(Run):
    """One execution on a replica of the environment's pool."""

    def __init__(self, execution: Execution, env_name: str, find_pool: Callable[[], Optional[ReplicaPool]]):
        self.execution = execution
        self.env_name = env_name
        self._find_pool = find_pool  # the live pool, never a new one: a getter must not start replicas

    @property
    def terminal(self) -> bool:
        return self.execution.state.terminal

    def status(self) -> Status:
        e = self.execution
        links = log_links([(e.replica, e.log_uri)]) if e.replica else []
        state = e.state
        if state is ExecutionState.QUEUED and e.system_retries:  # it ran: its phase does not go back to QUEUED
            return Status(
                TaskExecution.RUNNING,
                f"dispatching again after its replica was lost to the platform ({e.system_retries} system "
                f"retr{'y' if e.system_retries == 1 else 'ies'} so far): {e.retried_after}",
                links,
            )
        if state is ExecutionState.QUEUED:
            return pending(self._find_pool(), self.env_name)
        if state is ExecutionState.RUNNING:
            how = "re-attached after a connector restart" if e.reattached else ("warm" if e.warm else "cold")
            return Status(TaskExecution.RUNNING, f"running on replica {e.replica} ({how})", links)
        if state is ExecutionState.SUCCEEDED:
            return Status(TaskExecution.SUCCEEDED, f"succeeded on replica {e.replica}", links)
        if state is ExecutionState.FAILED:
            return failure(e.error, f"on replica {e.replica}", links)
        if state is ExecutionState.CANCELLED:
            return Status(TaskExecution.ABORTED, "aborted", links)
        # REPLICA_DIED
        death = e.death
        if death is not None and death.cause is DeathCause.START:  # it never ran; retryable, as propeller's
            return Status(  # own ImagePullBackOff is (a pull can succeed later)
                TaskExecution.RETRYABLE_FAILED,
                f"actor environment {self.env_name} could not start a replica: {death}; execution {e.id} never ran",
                links,
            )
        return Status(
            TaskExecution.RETRYABLE_FAILED,
            f"replica died: {death or 'replica ' + str(e.replica) + ' vanished'} while running execution {e.id}; "
            f"a replacement replica serves the retry",
            links,
        )

    def abort(self) -> None:
        pool = self._find_pool()
        if pool is not None and not self.terminal:
            pool.cancel(self.execution.id, grace_seconds=CANCEL_GRACE_S)

    def wait(self, timeout: float) -> bool:
        return self.execution.wait(timeout)

    def release(self) -> None:
        pool = self._find_pool()
        if pool is not None:
            pool.forget(self.execution.id)


class MapRunView(Run):
    """An actor_map run (MapRun coordinates its items); outputs go by reference: propeller reads outputs.pb. Until
    an item reaches a replica it answers as a queued single execution does (`pending`): e.g. WAITING_FOR_RESOURCES
    while its pool's pods cannot be scheduled."""

    def __init__(self, run: MapRun, env_name: str, find_pool: Callable[[], Optional[ReplicaPool]]):
        self.run = run
        self.env_name = env_name
        self._find_pool = find_pool  # the live pool, never a new one: a getter must not start replicas

    @property
    def terminal(self) -> bool:
        return self.run.phase is not MapPhase.RUNNING

    def status(self) -> Status:
        run = self.run
        links = log_links(list(run.replicas.items()))
        info = run.progress()
        phase = run.phase
        if phase is MapPhase.RUNNING:
            done = info["succeeded"] + info["failed"]
            if not done and not run.started.is_set():
                return dataclasses.replace(pending(self._find_pool(), self.env_name), custom_info=info)
            return Status(TaskExecution.RUNNING, f"{done} of {run.n} items done", links, custom_info=info)
        if phase is MapPhase.SUCCEEDED:  # no inline outputs: an answer over 4 MiB fails in propeller's client
            return Status(TaskExecution.SUCCEEDED, run.message, links, custom_info=info)
        if phase is MapPhase.ABORTED:
            return Status(TaskExecution.ABORTED, run.message, links, custom_info=info)
        failed = TaskExecution.RETRYABLE_FAILED if run.recoverable else TaskExecution.FAILED
        return Status(failed, run.message, links, custom_info=info)

    def abort(self) -> None:
        self.run.abort()
        self.run.finished.wait(MAP_ABORT_WAIT_S)

    def wait(self, timeout: float) -> bool:
        return self.run.finished.wait(timeout)


class StoredRun(Run):
    """An execution this process did not run, answered from storage alone (a restarted connector found its result,
    its abort, or that it was dispatched and left nothing: never run twice)."""

    def __init__(self, answer: Status):
        self.answer = answer

    @property
    def terminal(self) -> bool:
        return True

    def status(self) -> Status:
        return self.answer

    def abort(self) -> None:
        """Nothing runs here: the abort marker in storage (written by DeleteTask) is all there is to do."""

    def wait(self, timeout: float) -> bool:
        return True

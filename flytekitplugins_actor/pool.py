"""A warm replica pool: a FIFO queue of executions served by up to `size` replicas, one execution each at a time.

The same pool serves local runs (driver) and the connector; only the replica backend differs.

Data flow of one execution (cf. CPython's concurrent/futures/process.py):

    submit() ─► _queue (QUEUED, FIFO) ─► slot thread (_serve, one per replica) ─► replica: `submit`, then
                                               │                                   `wait` in bounded rounds
                  before_dispatch hook ◄───────┤ (RUNNING once taken)                  │
                                               ▼                                       ▼
          SUCCEEDED | FAILED | CANCELLED  ◄── the replica's answer ◄────────────────────┘
          REPLICA_DIED ◄── the replica died (backend) ─► or QUEUED again when the platform took it
                           (DeathCause.INFRASTRUCTURE) and its backend saw it end, up to `system_retries` times
          on_done callbacks run after the state is set, outside the pool's lock

    cancel() ─► QUEUED: CANCELLED at once; RUNNING: the supervisor sends `cancel` and, if the execution has not
                ended after the grace, stops its replica (a replacement starts when work waits)
    supervisor thread (one per pool): cancels and their escalation, a `health` keepalive of idle replicas
                every KEEPALIVE_S (a replica that does not answer is replaced)
    adopt() ─► replicas a previous process left (a restarted connector's pods): idle ones serve the queue; one
                running an execution (or holding its uncollected end) is re-attached: RUNNING, collected by `_await`,
                never dispatched again

Every state change goes through `Execution._transition`, which refuses an invalid one (as
`Future.set_running_or_notify_cancel` does). The pool's lock is not re-entrant and no callback runs under it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import enum
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple, Union

from flytekit.loggers import logger

from flytekitplugins_actor.replica.backend import (
    DeathCause,
    Replica,
    ReplicaBackend,
    ReplicaDeath,
    ReplicaSpec,
    ReplicaState,
)
from flytekitplugins_actor.replica.error import ExecutionError
from flytekitplugins_actor.replica.execution import ExecutionSpec
from flytekitplugins_actor.replica.protocol import (
    INLINE_PROTOCOL,
    TOKEN_ENV,
    AuthenticationError,
    ProtocolError,
    ReplicaActivity,
    ReplicaClient,
    ReplicaExecutionState,
    ReplyLost,
    RequestRefused,
    decode_bytes,
)
from flytekitplugins_actor.replica.supervisor import Supervisor

MAX_FAILED_STARTS = 3
SYSTEM_RETRIES = 3
"""How often an execution whose replica the platform took away is dispatched again (propeller's default)."""
KEEPALIVE_S = 10.0
"""An idle replica hears from its pool at least this often (a replica exits after FLYTE_ACTOR_ORPHAN_TIMEOUT_S
without a request)."""
SUBMIT_EXIT_GRACE_S = 1.0
"""A submit whose reply was lost goes to another replica only if its own is seen ended within this (a replica that
died idle); else it may have been accepted and is never sent elsewhere."""
FIRST_WAIT_ROUND_S = 0.5
"""The `wait` sent along with the submit asks this long: a cancel that arrives meanwhile waits for it to return."""
WAIT_ROUND_S = 5.0
"""A `wait` asks the replica for at most this long: a vanished peer is noticed within WAIT_ROUND_S + IO_MARGIN_S."""
IO_MARGIN_S = 5.0
CONTROL_TIMEOUT_S = 2.0
"""Bound on a keepalive or cancel request (connect and answer)."""
ADOPT_TIMEOUT_S = 10.0
"""Bound on the `health` that decides a replica's adoption: a replica whose task holds the GIL in a long C call
answers late, and one not adopted is stopped (with the execution it may be running)."""


class ExecutionState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the task failed: error says why
    CANCELLED = "cancelled"
    REPLICA_DIED = "replica_died"  # the replica died or vanished mid-execution: death says how

    @property
    def terminal(self) -> bool:
        return self not in (ExecutionState.QUEUED, ExecutionState.RUNNING)


_TERMINAL = frozenset(s for s in ExecutionState if s.terminal)
_TRANSITIONS = {
    ExecutionState.QUEUED: frozenset({ExecutionState.RUNNING}) | _TERMINAL,
    ExecutionState.RUNNING: frozenset({ExecutionState.QUEUED}) | _TERMINAL,  # QUEUED: never accepted, or re-dispatched
}


class InvalidTransition(RuntimeError):
    """An execution was asked to move to a state it cannot reach from where it is (a pool bug, never ignored)."""


@dataclass
class Execution:
    """One execution's life in a pool. Its state is changed by the pool only, under the pool's lock."""

    spec: ExecutionSpec
    state: ExecutionState = ExecutionState.QUEUED
    error: Optional[ExecutionError] = None
    death: Optional[ReplicaDeath] = None
    replica: Optional[str] = None
    log_uri: Optional[str] = None
    warm: Optional[bool] = None
    exception_payload: Optional[str] = None
    outputs: Optional[bytes] = None
    """outputs.pb as the replica returned it, when the execution asked for its outputs back (`return_outputs`)."""
    printed: Optional[bool] = None
    """Whether the task wrote to its replica's output while it ran (None: the replica cannot tell, e.g. a pod)."""
    queued_at: float = field(default_factory=time.monotonic)
    started_at: Optional[float] = None
    want_exception: bool = False
    cancel_requested: bool = False
    dispatched: bool = False
    """The replica it runs on has accepted it (a cancel is then the replica's to deliver)."""
    system_retries: int = 0
    """How often it was dispatched again because the platform took its replica away."""
    retried_after: Optional[ReplicaDeath] = None
    """The death that made its last system retry (it is QUEUED again after having run)."""
    reattached: bool = False
    """A previous process (connector) dispatched it; this pool adopted its replica and collects it. It has no
    command, so it is never dispatched again (a lost replica ends it REPLICA_DIED)."""
    before_dispatch: Optional[Callable[["Execution"], None]] = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _callbacks: List[Callable[["Execution"], None]] = field(default_factory=list, repr=False)
    _forget_when_done: bool = field(default=False, repr=False)
    _claimed: bool = field(default=False, repr=False)  # a re-attached execution's first submit gave its on_done
    _cancel_grace_s: float = field(default=0.0, repr=False)

    @property
    def id(self) -> str:
        return self.spec.execution_id

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def task_exception(self) -> Optional[BaseException]:
        """The task's own exception object when the replica could send it back (local runs), else None."""
        if not self.exception_payload:
            return None
        try:
            import cloudpickle

            return cloudpickle.loads(base64.b64decode(self.exception_payload))
        except Exception:
            logger.warning("execution %s: the task's exception could not be unpickled", self.id, exc_info=True)
            return None

    def _transition(self, to: ExecutionState) -> None:
        allowed = _TRANSITIONS.get(self.state, frozenset())
        if to not in allowed:
            raise InvalidTransition(f"execution {self.id} cannot go from {self.state.name} to {to.name}")
        self.state = to


_Callbacks = List[Tuple[Callable[[Execution], None], Execution]]


class PoolClosed(RuntimeError):
    """The pool was shut down; it accepts no more executions."""


@dataclass(frozen=True)
class _Adoptee:
    """A replica a pool may adopt, and the id of the execution it holds (runs, or ended uncollected), if any."""

    replica: Replica
    holds: Optional[str] = None


class _Slot:
    """A replica of the pool and what it is doing. Plain state: the pool's slot thread and supervisor act on it."""

    def __init__(self, replica: Replica):
        self.replica = replica
        self.client: Optional[ReplicaClient] = None  # set once the replica is ready and connected
        self.current: Optional[Execution] = None
        self.accepted = 0  # executions the replica accepted: the next one is warm when > 0
        self.lost: Optional[ReplicaDeath] = None  # why the pool gave the replica up, if it did
        self.protocol = 1  # the replica's protocol version, asked once it is connected
        self.parked = False  # its thread waits for work (in `_next_for`): only then may a caller borrow its replica
        self.lent = False
        """A caller runs an execution on this replica itself (`submit(..., run_here=True)`): the slot thread leaves
        the replica alone until the caller gives it back."""

    @property
    def busy(self) -> bool:
        return self.current is not None


class ReplicaPool:
    """Warm replicas of one environment (and code version). Executions queue FIFO; each replica runs one at a time."""

    _ids = itertools.count(1)

    def __init__(
        self,
        key: str,
        backend: ReplicaBackend,
        make_spec: Callable[[str, str], ReplicaSpec],
        size: int,
        ttl_seconds: float,
        name: str = "actor",
        system_retries: int = SYSTEM_RETRIES,
    ):
        if not isinstance(system_retries, int) or system_retries < 0:
            raise ValueError(f"system_retries must be an int >= 0, got {system_retries!r}")
        self.key, self.backend, self.size, self.ttl_seconds, self.name = key, backend, size, ttl_seconds, name
        self.system_retries = system_retries
        self.token = secrets.token_hex(16)
        self._make_spec = make_spec
        self._starting = 0  # replicas being started outside the lock
        self._cond = threading.Condition(threading.Lock())  # not re-entrant: nothing may take it twice
        self._queue: Deque[Execution] = collections.deque()
        self._executions: Dict[str, Execution] = {}
        self._slots: List[_Slot] = []
        self._closed = False
        self.idle_since = time.monotonic()
        self.deaths = 0
        self.dispatches = {"warm": 0, "cold": 0}
        self.keepalives = 0  # health pings answered by idle replicas
        self.reattached = 0  # executions of a previous process collected on adopted replicas
        self._failed_starts = 0
        self._supervisor = Supervisor(f"actor-pool-{name}")
        self._supervisor.call_later(KEEPALIVE_S, self._keepalive)

    # ---- public ----
    def submit(
        self,
        spec: ExecutionSpec,
        want_exception: bool = False,
        before_dispatch: Optional[Callable[[Execution], None]] = None,
        on_done: Optional[Callable[[Execution], None]] = None,
        run_here: bool = False,
    ) -> Execution:
        """Queues an execution and returns at once. Idempotent per execution id: a repeat returns the same one.

        `before_dispatch(execution)` runs on the slot thread just before the replica gets the execution;
        `on_done(execution)` runs once it is terminal, outside the pool's lock (a failure is logged). The first
        submit of an execution the pool re-attached (`adopt`) gets it, never a second run, and its `on_done`.

        With `run_here`, a caller that would wait for the execution anyway runs it on an idle replica itself when
        nothing is queued (two thread hand-offs less), and returns once it has been dispatched and collected (or
        handed back to the queue); otherwise it is queued."""
        slot: Optional[_Slot] = None
        usable = False
        try:
            with self._cond:
                if self._closed:
                    raise PoolClosed(f"pool {self.name} ({self.key}) is shut down")
                existing = self._executions.get(spec.execution_id)
                if existing is not None:
                    callbacks = self._claim_locked(existing, on_done)
                else:
                    execution = Execution(spec=spec, want_exception=want_exception, before_dispatch=before_dispatch)
                    if on_done is not None:
                        execution._callbacks.append(on_done)
                    self._executions[spec.execution_id] = execution
                    slot = self._lend_locked(execution) if run_here and not self._queue else None
                    if slot is None:
                        self._queue.append(execution)
                        to_start = self._reserve_locked()
                        self._cond.notify_all()
            if existing is not None:
                _run_callbacks(callbacks)
                return existing
            if slot is None:
                self._start_replicas(to_start)
                return execution
            usable = self._run_lent(slot, execution)
            return execution
        finally:
            if slot is not None:
                self._give_back(slot, execution, usable)

    def _lend_locked(self, execution: Execution) -> Optional[_Slot]:
        """A slot whose thread waits for work, lent to the caller with the execution RUNNING on it; None if none."""
        for slot in self._slots:
            if slot.parked and not slot.busy and not slot.lent and not self._gone(slot):
                slot.lent = True
                self._take_locked(slot, execution)
                return slot
        return None

    def _run_lent(self, slot: _Slot, execution: Execution) -> bool:
        """Runs an execution on a lent slot's replica on this thread; False if the replica cannot serve on."""
        try:
            return self._run(slot, execution)
        except (ProtocolError, OSError) as e:
            logger.warning("pool %s: replica %s is unusable: %s", self.name, slot.replica.name, e)
        except Exception:
            logger.exception("pool %s: running %s on replica %s failed", self.name, execution.id, slot.replica.name)
        return False

    def _give_back(self, slot: _Slot, execution: Execution, usable: bool) -> None:
        """Gives a lent slot back to its thread. A replica the caller could not use to the end (it failed, or the
        caller was interrupted mid-exchange, e.g. Ctrl-C) is given up: its slot thread replaces it and decides the
        execution's fate, as for its own. The steps that matter take no lock (a second Ctrl-C may interrupt the
        wait for one): the connection is closed first, so nothing can read a late reply on it."""
        if not usable and slot.client is not None:
            slot.client.abort()
        slot.lent = False
        with self._cond:
            if not usable and not self._gone(slot):
                slot.lost = ReplicaDeath(slot.replica.name, f"its exchange about {execution.id} did not complete")
            if self._queue or self._closed or self._gone(slot):  # else its thread has nothing to wake for
                self._cond.notify_all()

    def adopt(self, token: str, replicas: List[Replica]) -> None:
        """Serves with replicas a previous process started for this pool (same key), and with their token: a
        restarted connector's pool is warm at once. A replica that holds an execution of the previous process (it
        runs it, or it ended and nobody collected its end) is re-attached: the execution is the pool's again,
        RUNNING on that replica, and its end is collected as a normal one's (never submitted again). Replicas that
        cannot be asked (no answer, refused token, stopping, or busy with an execution they do not name) and those
        beyond the pool's size are stopped."""
        found = [a for a in (self._adoptee(r, token) for r in replicas) if a is not None]
        found.sort(key=lambda a: a.holds is None)  # replicas holding an execution first: never stop one for room
        with self._cond:
            self.token = token
            room = 0 if self._closed else max(0, self.size - len(self._slots) - self._starting)
            slots = []
            for adoptee in found[:room]:
                if adoptee.holds in self._executions:  # never two records of one execution: not adopted
                    continue
                slot = _Slot(adoptee.replica)
                if adoptee.holds is not None:
                    slot.current = self._executions[adoptee.holds] = self._reattached_locked(slot, adoptee.holds)
                    slot.accepted = 1
                slots.append(slot)
            self._slots.extend(slots)
        kept = {id(s.replica) for s in slots}
        for replica in replicas:
            if id(replica) not in kept:
                replica.terminate(0)
        for slot in slots:
            self._start_serving(slot)

    @staticmethod
    def _claim_locked(execution: Execution, on_done: Optional[Callable[[Execution], None]]) -> _Callbacks:
        """A submit of a re-attached execution's id hands it the `on_done` the pool could not know when it adopted
        it (once: later repeats add nothing, as for any execution); returned to run now if it has ended."""
        if not execution.reattached or execution._claimed or on_done is None:
            return []
        execution._claimed = True
        if execution.state.terminal:
            return [(on_done, execution)]
        execution._callbacks.append(on_done)
        return []

    def _adoptee(self, replica: Replica, token: str) -> Optional[_Adoptee]:
        """Whether a replica can be adopted, and the execution it holds: the one it runs, else the latest one that
        ended without anyone collecting its end (`health`'s `uncollected`). None: it cannot be adopted."""
        if replica.state is not ReplicaState.READY:
            return _Adoptee(replica) if replica.state is ReplicaState.STARTING else None
        try:
            with contextlib.closing(ReplicaClient(replica.address, token, timeout=ADOPT_TIMEOUT_S)) as client:
                reply = client.request("health", io_timeout=ADOPT_TIMEOUT_S)
            activity = ReplicaActivity(reply.get("state"))
        except (ProtocolError, OSError, ValueError) as e:
            logger.warning("pool %s: replica %s cannot be adopted: %s", self.name, replica.name, e)
            return None
        running, uncollected = reply.get("running"), reply.get("uncollected") or []
        if activity is ReplicaActivity.BUSY and isinstance(running, str) and running:
            logger.info("pool %s: adopting replica %s, re-attaching %s it runs", self.name, replica.name, running)
            return _Adoptee(replica, running)
        if activity is ReplicaActivity.IDLE and uncollected:
            held = str(uncollected[-1])
            logger.info("pool %s: adopting replica %s, collecting %s it finished", self.name, replica.name, held)
            return _Adoptee(replica, held)
        if activity is ReplicaActivity.IDLE:
            return _Adoptee(replica)
        logger.info(
            "pool %s: not adopting replica %s: it is %s (running %s)", self.name, replica.name, activity.value, running
        )
        return None

    def _reattached_locked(self, slot: _Slot, execution_id: str) -> Execution:
        """The pool's execution for one an adopted replica holds: RUNNING there, already dispatched. The pool has
        no command for it (a previous process submitted it), so it is collected, never dispatched again."""
        now = time.monotonic()
        execution = Execution(
            spec=ExecutionSpec(execution_id, []),
            state=ExecutionState.RUNNING,
            replica=slot.replica.name,
            log_uri=slot.replica.log_uri,
            warm=True,
            queued_at=now,
            started_at=now,
            dispatched=True,
            reattached=True,
        )
        self.reattached += 1
        return execution

    def get(self, execution_id: str) -> Optional[Execution]:
        with self._cond:
            return self._executions.get(execution_id)

    def executions(self, matching: Callable[[str], bool]) -> List[Execution]:
        """The executions the pool knows whose id `matching` accepts, ended ones included (e.g. a map's items)."""
        with self._cond:
            return [e for execution_id, e in self._executions.items() if matching(execution_id)]

    def forget(self, execution_id: str) -> None:
        """Drops the pool's record of an execution: now if it has ended, else as soon as it ends."""
        with self._cond:
            e = self._executions.get(execution_id)
            if e is None:
                return
            if e.state.terminal:
                del self._executions[execution_id]
            else:
                e._forget_when_done = True

    def cancel(self, execution_id: str, grace_seconds: float = 5.0) -> Optional[Execution]:
        """Cancels an execution without blocking: a queued one ends CANCELLED at once; a running one is interrupted
        by its replica, and the replica is replaced if the execution has not ended `grace_seconds` later."""
        callbacks: _Callbacks = []
        slot: Optional[_Slot] = None
        with self._cond:
            execution = self._executions.get(execution_id)
            if execution is None or execution.state.terminal or execution.cancel_requested:
                return execution
            if execution.state is ExecutionState.QUEUED:
                self._queue.remove(execution)
                callbacks = self._complete_locked(execution, ExecutionState.CANCELLED)
            else:  # not dispatched yet: the slot thread sees the flag before its submit, or after its short first round
                execution.cancel_requested, execution._cancel_grace_s = True, grace_seconds
                if execution.dispatched:
                    slot = next((s for s in self._slots if s.current is execution), None)
        _run_callbacks(callbacks)
        if slot is not None:
            self._supervisor.call_soon(self._deliver_cancel, slot, execution)
        return execution

    def stats(self) -> dict:
        with self._cond:
            ready = [s for s in self._slots if s.replica.state is ReplicaState.READY]
            return {
                "queued": len(self._queue),
                "replicas": len(self._slots),
                # replicas still inside backend.start (no slot yet) and started ones not ready yet
                "starting": self._starting + sum(1 for s in self._slots if s.replica.state is ReplicaState.STARTING),
                "busy": sum(1 for s in ready if s.busy),
                "idle": sum(1 for s in ready if not s.busy),
                "deaths": self.deaths,
                "keepalives": self.keepalives,
                "reattached": self.reattached,
                **self.dispatches,
            }

    @property
    def replicas(self) -> List[Replica]:
        with self._cond:
            return [s.replica for s in self._slots]

    def is_idle(self) -> bool:
        with self._cond:
            return self._is_idle_locked()

    def expired(self, now: Optional[float] = None) -> bool:
        with self._cond:
            return self._expired_locked(now)

    def close_if_expired(self) -> bool:
        """Closes the pool if it is idle past its ttl, atomically with respect to submit (no execution slips in)."""
        with self._cond:
            if self._closed or not self._expired_locked(None):
                return False
            self._closed = True
            return True

    def shutdown(self, grace_seconds: float = 2.0) -> None:
        """Stops every replica; queued executions end CANCELLED."""
        callbacks: _Callbacks = []
        with self._cond:
            self._closed = True
            while self._queue:
                callbacks += self._complete_locked(self._queue.popleft(), ExecutionState.CANCELLED)
            slots = list(self._slots)
            self._cond.notify_all()
        self._supervisor.stop()
        _run_callbacks(callbacks)
        for s in slots:
            s.replica.terminate(grace_seconds)

    # ---- under the lock ----
    def _is_idle_locked(self) -> bool:
        return not self._queue and not any(s.busy for s in self._slots)

    def _expired_locked(self, now: Optional[float]) -> bool:
        return self._is_idle_locked() and (now or time.monotonic()) - self.idle_since >= self.ttl_seconds

    def _reserve_locked(self) -> int:
        """How many replicas to start for the waiting work (counted as starting; call _start_replicas after)."""
        if self._closed:
            return 0
        idle = sum(1 for s in self._slots if not s.busy and s.replica.state is not ReplicaState.DEAD) + self._starting
        have = len(self._slots) + self._starting
        n = max(0, min(self.size, have + max(0, len(self._queue) - idle)) - have)
        self._starting += n
        return n

    def _complete_locked(self, execution: Execution, state: ExecutionState) -> _Callbacks:
        """Ends an execution; returns its callbacks, for the caller to run once it has released the lock."""
        execution._transition(state)
        if self._is_idle_locked():
            self.idle_since = time.monotonic()
        if execution._forget_when_done and self._executions.get(execution.id) is execution:
            del self._executions[execution.id]
        execution._done.set()  # no notify: slot threads wait for work, and an end gives them none
        callbacks, execution._callbacks = execution._callbacks, []
        return [(fn, execution) for fn in callbacks]

    def _requeue_locked(self, execution: Execution) -> None:
        """Back to the head of the queue, as if it had never been taken (it was never run, or is run again)."""
        execution._transition(ExecutionState.QUEUED)
        execution.replica = execution.log_uri = execution.warm = execution.started_at = None
        execution.dispatched = False
        execution.queued_at = time.monotonic()  # its dispatch latency counts from now, not from the first submit
        self._queue.appendleft(execution)
        self._cond.notify_all()

    def _failed_start_locked(self, death: ReplicaDeath, log_uri: Optional[str]) -> _Callbacks:
        self._failed_starts += 1
        if self._failed_starts < MAX_FAILED_STARTS:
            return []
        # do not crash-loop: fail what waits, and say why
        where = f"; see {log_uri}" if log_uri else ""
        failed = ReplicaDeath(
            death.replica,
            f"could not start ({MAX_FAILED_STARTS} replicas in a row failed before "
            f"becoming ready; last one {death.reason}{where})",
            death.exit_code,
            DeathCause.START,
        )
        logger.error("pool %s: %s; failing %d queued execution(s)", self.name, failed, len(self._queue))
        callbacks: _Callbacks = []
        while self._queue:
            queued = self._queue.popleft()
            queued.death = failed
            callbacks += self._complete_locked(queued, ExecutionState.REPLICA_DIED)
        self._failed_starts = 0
        return callbacks

    # ---- replicas: start, serve, end ----
    def _start_replicas(self, n: int) -> None:
        """Starts replicas outside the pool's lock (a backend may spawn a process or call an API)."""
        while n > 0:
            n -= 1
            name = f"{self.name}-{next(self._ids)}"
            try:
                replica = self.backend.start(self._make_spec(name, self.token))
            except Exception as e:
                logger.warning("pool %s: replica %s could not be started: %r", self.name, name, e)
                with self._cond:
                    self._starting -= 1
                    callbacks = self._failed_start_locked(
                        ReplicaDeath(name, f"could not be started: {e!r}", cause=DeathCause.START), None
                    )
                    n += self._reserve_locked()  # try again while work waits (bounded by MAX_FAILED_STARTS)
                _run_callbacks(callbacks)
                continue
            slot = _Slot(replica)
            with self._cond:
                self._starting -= 1
                closed = self._closed
                if not closed:
                    self._slots.append(slot)
            if closed:
                replica.terminate(0)
                continue
            self._start_serving(slot)

    def _start_serving(self, slot: _Slot) -> None:
        """Starts the slot's thread (the slot is in `_slots` already); a death of its replica wakes it."""
        slot.replica.add_death_callback(lambda _death: self._on_death(slot))
        threading.Thread(target=self._serve, args=(slot,), name=f"slot-{slot.replica.name}", daemon=True).start()

    def _on_death(self, slot: _Slot) -> None:
        client = slot.client
        if client is not None:
            client.abort()  # wakes a `wait` blocked on a peer that vanished without closing the connection
        with self._cond:
            self._cond.notify_all()

    def _serve(self, slot: _Slot) -> None:
        """The slot thread: waits for the replica to be ready, then feeds it executions until it is gone."""
        replica = slot.replica
        try:
            timeout = self.backend.ready_timeout_s
            if replica.wait_ready(timeout) is ReplicaState.STARTING:
                replica.abandon(f"did not become ready within {timeout:.0f}s", DeathCause.START)
            if replica.state is not ReplicaState.READY:
                return
            slot.client = ReplicaClient(replica.address, self.token)
            try:  # what the replica understands (an image may carry an older version of this package)
                slot.protocol = int(slot.client.request("health", io_timeout=CONTROL_TIMEOUT_S).get("protocol", 1))
            except AuthenticationError as e:  # a misconfiguration: the execution it would take fails, saying so
                execution = self._next_for(slot)
                if execution is not None:
                    self._unauthenticated(slot, execution, e)
                return
            with self._cond:
                self._failed_starts = 0
                held = slot.current  # re-attached at adoption: collected first (a cancel() delivers its own cancel)
            if held is not None and not self._await(slot, held):
                return
            while True:
                execution = self._next_for(slot)
                if execution is None or not self._run(slot, execution):
                    return
        except (ProtocolError, OSError) as e:  # a refused connection, a peer gone: the replica is unusable
            logger.warning("pool %s: replica %s is unusable: %s", self.name, replica.name, e)
        except Exception:  # a pool bug: log it, never leave the execution hanging (_on_slot_gone ends it)
            logger.exception("pool %s: slot of replica %s failed", self.name, replica.name)
        finally:
            if slot.client is not None:
                slot.client.close()
            if replica.death is None:
                replica.terminate(0)  # a replica this pool cannot use must not linger
            self._on_slot_gone(slot)

    def _next_for(self, slot: _Slot) -> Optional[Execution]:
        with self._cond:  # a lent slot is its caller's until given back (then gone, if the caller gave it up)
            slot.parked = True
            try:
                self._cond.wait_for(lambda: not slot.lent and (self._queue or self._closed or self._gone(slot)))
            finally:
                slot.parked = False
            if self._gone(slot) or (self._closed and not self._queue):
                return None
            execution = self._queue.popleft()
            self._take_locked(slot, execution)
        return execution

    @staticmethod
    def _take_locked(slot: _Slot, execution: Execution) -> None:
        """The execution is RUNNING on the slot's replica from now (its submit follows)."""
        execution._transition(ExecutionState.RUNNING)
        execution.started_at = time.monotonic()
        execution.replica = slot.replica.name
        execution.log_uri = slot.replica.log_uri
        execution.warm = slot.accepted > 0
        slot.current = execution

    @staticmethod
    def _gone(slot: _Slot) -> bool:
        return slot.replica.death is not None or slot.lost is not None

    def _run(self, slot: _Slot, execution: Execution) -> bool:
        """Runs one execution on the slot's replica; returns False when the replica can serve no more."""
        spec, replica, client = execution.spec, slot.replica, slot.client
        assert client is not None
        if execution.cancel_requested:  # cancelled between the queue and the replica
            self._finish(slot, execution, ExecutionState.CANCELLED)
            return True
        if execution.before_dispatch is not None:
            try:  # e.g. the connector's durable 'started' marker: written before the replica may run anything
                execution.before_dispatch(execution)
            except Exception as e:
                logger.warning("pool %s: dispatch hook of %s failed: %r", self.name, spec.execution_id, e)
                error = ExecutionError.system(
                    "DispatchFailed", f"could not record the dispatch of {spec.execution_id}: {e}"
                )
                self._finish(slot, execution, ExecutionState.FAILED, error=error)
                return True
            if execution.cancel_requested:  # cancelled while the hook ran
                self._finish(slot, execution, ExecutionState.CANCELLED)
                return True
        inline = spec.inputs_pb is not None and slot.protocol >= INLINE_PROTOCOL
        if spec.inputs_pb is not None and not inline:
            try:  # a replica too old to read inputs_pb reads the file the command names
                spec.write_inputs()
            except Exception as e:
                error = ExecutionError.system(
                    "DispatchFailed", f"could not write the inputs of {spec.execution_id}: {e}"
                )
                self._finish(slot, execution, ExecutionState.FAILED, error=error)
                return True
        # submit and a short first `wait` round go out together (one round trip); the submit's own reply says
        # whether the replica accepted it
        try:
            submitted, first_round = client.pipeline(
                [("submit", spec.to_wire(inline)), ("wait", self._wait_fields(execution, FIRST_WAIT_ROUND_S))],
                io_timeout=FIRST_WAIT_ROUND_S + IO_MARGIN_S,  # never unbounded: a peer may vanish mid-request
            )
            if isinstance(submitted, Exception):
                raise submitted
        except ReplyLost as e:
            if replica.wait_exited(SUBMIT_EXIT_GRACE_S):  # its process is gone (it died idle): nothing of it runs
                self._requeue(slot, execution, f"replica {replica.name} ended before answering its submit ({e})")
                return False
            # sent, never answered, by a replica that may still run: it may have accepted it, so it is never sent
            # elsewhere from here (its fate is decided as for a replica that stopped answering a `wait`)
            with self._cond:
                execution.dispatched = True
            return self._await(slot, execution, e)
        except AuthenticationError as e:
            self._unauthenticated(slot, execution, e)
            return False
        except RequestRefused as e:
            if not e.code.transient:  # the replica will refuse it again: fail it, keep the replica
                error = ExecutionError.system(
                    "SubmitRefused", f"replica {replica.name} refused the execution: {e}", recoverable=False
                )
                self._finish(slot, execution, ExecutionState.FAILED, error=error)
                return True
            self._requeue(slot, execution, f"replica {replica.name} refused it ({e.code.value})")
            return False
        except ProtocolError as e:  # not sent, so never accepted: back to the head of the queue for another replica
            self._requeue(slot, execution, f"submit to replica {replica.name} failed: {e}")
            return False
        with self._cond:
            self.dispatches["warm" if execution.warm else "cold"] += 1
            slot.accepted += 1
            execution.dispatched = True
            cancel = execution.cancel_requested
        if cancel:  # asked while the submit was on its way: cancel() left the delivery to this thread
            self._supervisor.call_soon(self._deliver_cancel, slot, execution)
        return self._await(slot, execution, first_round)

    @staticmethod
    def _wait_fields(execution: Execution, timeout: float = WAIT_ROUND_S) -> dict:
        return {"execution_id": execution.id, "timeout": timeout, "include_exception": execution.want_exception}

    def _await(self, slot: _Slot, execution: Execution, reply: Union[dict, Exception, None] = None) -> bool:
        """Waits for the execution's end in bounded rounds, so a vanished peer is noticed within one round.
        `reply` is the first round's answer when it was sent along with the submit."""
        spec, replica, client = execution.spec, slot.replica, slot.client
        while True:
            try:
                if reply is None:
                    reply = client.request(
                        "wait", io_timeout=WAIT_ROUND_S + IO_MARGIN_S, **self._wait_fields(execution)
                    )
                elif isinstance(reply, Exception):
                    raise reply
            except AuthenticationError as e:
                self._unauthenticated(slot, execution, e)
                return False
            except ProtocolError as e:
                # not the pool's to say why: a lost node is reported (INFRASTRUCTURE) only after the backend's bound
                grace = self.backend.death_report_grace_s
                logger.warning(
                    "pool %s: replica %s stopped answering while running %s (%s); waiting up to %gs for its backend "
                    "to report its death",
                    self.name,
                    replica.name,
                    spec.execution_id,
                    e,
                    grace,
                )
                slot.lost = replica.wait_dead(grace) or ReplicaDeath(
                    replica.name,
                    f"stopped answering its control port ({e}); its backend reported no death in {grace:g}s",
                )
                return False  # _on_slot_gone decides what becomes of the execution
            try:
                state = ReplicaExecutionState.from_wire(reply.get("state"))
                if state in (ReplicaExecutionState.ACCEPTED, ReplicaExecutionState.RUNNING):
                    reply = None
                    continue
                if not state.ended:
                    raise ProtocolError(f"replica {replica.name} has no record of {spec.execution_id} it accepted")
                error = None if reply.get("error") is None else ExecutionError.from_wire(reply["error"])
                outputs = decode_bytes(reply.get("outputs_pb"))
            except (ProtocolError, ValueError) as e:  # a replica that breaks the protocol is not trusted again
                logger.error("pool %s: replica %s broke the protocol: %s", self.name, replica.name, e)
                error = ExecutionError.system("ProtocolError", f"replica {replica.name}: {e}")
                self._finish(slot, execution, ExecutionState.FAILED, error=error)
                return False
            printed = reply.get("printed")
            self._finish(
                slot,
                execution,
                _ENDED[state],
                error=error,
                exception_payload=reply.get("exception"),
                outputs=outputs,
                printed=printed if isinstance(printed, bool) else None,
            )
            return True

    def _unauthenticated(self, slot: _Slot, execution: Execution, e: AuthenticationError) -> None:
        """A replica refused the pool token: a misconfiguration, said loudly, never retried."""
        message = (
            f"replica {slot.replica.name} refused the pool's token ({e}): the replica and its pool do not share "
            f"{TOKEN_ENV}; this is a deployment misconfiguration, not a task failure"
        )
        logger.error("pool %s: %s", self.name, message)
        self._finish(
            slot, execution, ExecutionState.FAILED, error=ExecutionError.system("Unauthenticated", message, False)
        )
        slot.lost = ReplicaDeath(slot.replica.name, "refused the pool token")

    def _finish(
        self,
        slot: _Slot,
        execution: Execution,
        state: ExecutionState,
        error: Optional[ExecutionError] = None,
        exception_payload: Optional[str] = None,
        outputs: Optional[bytes] = None,
        printed: Optional[bool] = None,
    ) -> None:
        with self._cond:
            execution.error, execution.exception_payload, execution.outputs = error, exception_payload, outputs
            execution.printed = printed
            slot.current = None
            callbacks = self._complete_locked(execution, state)
        _run_callbacks(callbacks)

    def _requeue(self, slot: _Slot, execution: Execution, why: str) -> None:
        """The replica never accepted the execution: it goes back for another replica; this one is replaced."""
        logger.info("pool %s: %s; %s goes back to the queue", self.name, why, execution.id)
        with self._cond:
            slot.current = None
            slot.lost = ReplicaDeath(slot.replica.name, why)
            self._requeue_locked(execution)

    def _on_slot_gone(self, slot: _Slot) -> None:
        # what the pool saw first (it stops a replica it gives up, so the backend's death would say "killed"),
        # unless the backend says the platform took the replica: that cause decides whether it runs again
        reported = slot.replica.death
        if reported is not None and reported.cause is DeathCause.INFRASTRUCTURE:
            death = reported
        else:
            death = slot.lost or reported or ReplicaDeath(slot.replica.name, "became unreachable")
        execution = slot.current
        exited = False
        if execution is not None and self._may_retry(execution, death):
            # run it again only once nothing of the old run is left: both would write under one output prefix
            exited = slot.replica.wait_exited(self.backend.exit_confirm_s)
        callbacks: _Callbacks = []
        with self._cond:
            if slot in self._slots:
                self._slots.remove(slot)
            if not self._closed:
                self.deaths += 1
            execution, slot.current = slot.current, None
            if execution is not None and not execution.state.terminal:
                callbacks += self._replica_lost_locked(execution, death, exited)
            if slot.client is None and not self._closed:  # never became usable: a failed start
                callbacks += self._failed_start_locked(death, slot.replica.log_uri)
            to_start = self._reserve_locked()  # a replacement starts if work is waiting
            self._cond.notify_all()
        _run_callbacks(callbacks)
        self._start_replicas(to_start)

    def _may_retry(self, execution: Execution, death: ReplicaDeath) -> bool:
        """Whether the execution may be dispatched again after its replica's death: the platform's fault, not
        cancelled, within the system-retry budget, in a pool still open (its old run must still be seen ended)."""
        return (
            death.cause is DeathCause.INFRASTRUCTURE
            and not execution.cancel_requested
            and not execution.reattached  # re-attached after a connector restart: this pool holds no command for it
            and execution.system_retries < self.system_retries
            and not self._closed
        )

    def _replica_lost_locked(self, execution: Execution, death: ReplicaDeath, exited: bool) -> _Callbacks:
        """The replica running `execution` is gone: cancelled, dispatched again (the platform's fault, within the
        budget, and only once its backend saw the old replica end: never two runs at once) or REPLICA_DIED naming
        the replica, the cause and, for the platform's fault, why it was not dispatched again."""
        if execution.cancel_requested:
            return self._complete_locked(execution, ExecutionState.CANCELLED)
        may_retry = self._may_retry(execution, death)
        if may_retry and exited:
            execution.system_retries += 1
            execution.retried_after = death
            logger.warning(
                "pool %s: %s (%s) while running %s: dispatching it again (system retry %d of %d)",
                self.name,
                death,
                death.cause.value,
                execution.id,
                execution.system_retries,
                self.system_retries,
            )
            self._requeue_locked(execution)
            return []
        if may_retry:
            why = (
                f"not dispatched again: its backend did not see it end within {self.backend.exit_confirm_s:g}s, "
                "so the execution may still be running there"
            )
        elif death.cause is DeathCause.INFRASTRUCTURE and execution.reattached:
            why = (
                "not dispatched again: it was re-attached after a connector restart; this pool holds no command for it"
            )
        elif death.cause is DeathCause.INFRASTRUCTURE and self._closed:
            why = "not dispatched again: its pool is shut down"
        elif death.cause is DeathCause.INFRASTRUCTURE:
            why = f"gave up after {execution.system_retries} system retries of {self.system_retries}"
        else:
            why = None
        if why is not None:
            death = ReplicaDeath(
                death.replica, f"{death.reason} (cause: {death.cause.value}; {why})", death.exit_code, death.cause
            )
        execution.death = death
        return self._complete_locked(execution, ExecutionState.REPLICA_DIED)

    # ---- supervisor actions ----
    def _deliver_cancel(self, slot: _Slot, execution: Execution) -> None:
        """Asks the replica to interrupt the execution, and stops the replica if the execution has not ended
        when the cancel's grace runs out."""
        if execution.state.terminal:
            return
        address = slot.replica.address
        try:
            with contextlib.closing(ReplicaClient(address, self.token, timeout=CONTROL_TIMEOUT_S)) as c:
                c.request("cancel", io_timeout=CONTROL_TIMEOUT_S, execution_id=execution.id)
        except AuthenticationError as e:
            logger.error("pool %s: replica %s refused the pool token on cancel: %s", self.name, slot.replica.name, e)
        except (ProtocolError, OSError) as e:
            logger.warning("pool %s: cancel of %s on %s failed: %s", self.name, execution.id, slot.replica.name, e)
        self._supervisor.call_later(execution._cancel_grace_s, self._escalate_cancel, slot, execution)

    def _escalate_cancel(self, slot: _Slot, execution: Execution) -> None:
        if execution.state.terminal:
            return
        logger.warning(
            "pool %s: %s did not stop on cancel; stopping replica %s", self.name, execution.id, slot.replica.name
        )
        slot.replica.terminate(0)

    def _keepalive(self) -> None:
        """Pings every idle replica (a busy one hears `wait` rounds), so none sees its pool as gone."""
        with self._cond:
            if self._closed:
                return
            idle = [s for s in self._slots if s.client is not None and not s.busy and not self._gone(s)]
        for slot in idle:
            try:
                slot.client.request("health", io_timeout=CONTROL_TIMEOUT_S)
                with self._cond:
                    self.keepalives += 1
            except (ProtocolError, OSError) as e:
                with self._cond:
                    if slot not in self._slots or slot.busy or self._gone(slot):
                        continue  # it went away or got work meanwhile: nothing to replace
                    slot.lost = ReplicaDeath(slot.replica.name, f"failed its keepalive ({e})")
                    self._cond.notify_all()
                level = logger.error if isinstance(e, AuthenticationError) else logger.warning
                level("pool %s: replica %s failed its keepalive (%s); replacing it", self.name, slot.replica.name, e)
                slot.client.abort()
        self._supervisor.call_later(KEEPALIVE_S, self._keepalive)


_ENDED = {
    ReplicaExecutionState.SUCCEEDED: ExecutionState.SUCCEEDED,
    ReplicaExecutionState.FAILED: ExecutionState.FAILED,
    ReplicaExecutionState.CANCELLED: ExecutionState.CANCELLED,
}


def _run_callbacks(callbacks: _Callbacks) -> None:
    for fn, execution in callbacks:
        try:
            fn(execution)
        except Exception:
            logger.exception("on_done callback %r of execution %s failed", fn, execution.id)


class PoolRegistry:
    """Pools by key, created on first use; a reaper thread tears down the ones idle past their ttl.

    Shared by a local driver (`LocalPools`) and the connector (`plugin_backend.pools.PoolManager`)."""

    reap_interval_s = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: Dict[str, ReplicaPool] = {}
        self._stop = threading.Event()
        self._reaper: Optional[threading.Thread] = None

    def _pool(self, key: str, create: Callable[[], ReplicaPool]) -> ReplicaPool:
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = create()
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap_forever, name="actor-pool-reaper", daemon=True)
                    self._reaper.start()
            return pool

    def get(self, key: str) -> Optional[ReplicaPool]:
        """The live pool for a key, without creating one."""
        with self._lock:
            return self._pools.get(key)

    def pools(self) -> List[ReplicaPool]:
        with self._lock:
            return list(self._pools.values())

    def _reap_forever(self) -> None:
        while not self._stop.wait(self.reap_interval_s):
            try:
                self.reap()
            except Exception:  # never die of one bad pool: the next round tries again
                logger.exception("actor pool reaper: a round failed")

    def reap(self) -> int:
        """Tears down pools idle past their ttl; returns how many. One pool that fails is logged, not fatal."""
        closed: List[ReplicaPool] = []
        with self._lock:
            for key, pool in list(self._pools.items()):
                try:
                    if pool.close_if_expired():
                        closed.append(self._pools.pop(key))
                except Exception:
                    logger.exception("actor pool reaper: could not check pool %s", key)
        for pool in closed:
            try:
                pool.shutdown()
            except Exception:
                logger.exception("actor pool reaper: could not shut pool %s down", pool.key)
        return len(closed)

    def submit(self, key: str, create: Callable[[], ReplicaPool], spec: ExecutionSpec, **kwargs) -> Execution:
        """Submits to the pool for `key`, creating it if needed; a pool reaped meanwhile is replaced, not failed."""
        while True:
            pool = self._pool(key, create)
            try:
                return pool.submit(spec, **kwargs)
            except PoolClosed:
                with self._lock:
                    if self._pools.get(key) is pool:
                        del self._pools[key]

    def shutdown(self) -> None:
        """Stops the reaper and every pool's replicas."""
        self._stop.set()
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
            reaper = self._reaper
        for p in pools:
            p.shutdown(grace_seconds=1.0)
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join(timeout=5.0)

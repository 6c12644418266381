"""A warm replica pool: a FIFO queue of executions served by up to `size` replicas, one execution each at a time.

The same pool serves local runs (driver) and the connector; only the replica backend differs.
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
from typing import Callable, Deque, Dict, List, Optional

from flytekit.loggers import logger

from flytekitplugins_actor.replica.backend import Replica, ReplicaBackend, ReplicaDeath, ReplicaSpec, ReplicaState
from flytekitplugins_actor.replica.error import ExecutionError
from flytekitplugins_actor.replica.execution import ExecutionSpec
from flytekitplugins_actor.replica.protocol import ProtocolError, ReplicaClient, ReplicaExecutionState, RequestRefused

MAX_FAILED_STARTS = 3


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


@dataclass
class Execution:
    """One execution's life in a pool."""

    spec: ExecutionSpec
    state: ExecutionState = ExecutionState.QUEUED
    error: Optional[ExecutionError] = None
    death: Optional[ReplicaDeath] = None
    replica: Optional[str] = None
    log_uri: Optional[str] = None
    warm: Optional[bool] = None
    exception_payload: Optional[str] = None
    queued_at: float = field(default_factory=time.monotonic)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    want_exception: bool = False
    cancel_requested: bool = False
    before_dispatch: Optional[Callable[["Execution"], None]] = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _callbacks: List[Callable[["Execution"], None]] = field(default_factory=list, repr=False)

    @property
    def id(self) -> str:
        return self.spec.execution_id

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def exception(self) -> Optional[BaseException]:
        """The task's own exception object when the replica could send it back (local runs), else None."""
        if not self.exception_payload:
            return None
        try:
            import cloudpickle

            return cloudpickle.loads(base64.b64decode(self.exception_payload))
        except Exception:
            return None


class PoolClosed(RuntimeError):
    """The pool was shut down; it accepts no more executions."""


class _Slot:
    """A replica and the thread that feeds it executions from the pool's queue."""

    def __init__(self, pool: "ReplicaPool", replica: Replica):
        self.pool, self.replica = pool, replica
        self.executions = 0
        self.current: Optional[Execution] = None
        self.client: Optional[ReplicaClient] = None
        replica.add_death_callback(self._on_death)
        self.thread = threading.Thread(target=self._run, name=f"slot-{replica.name}", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return self.current is not None

    def _on_death(self, death: ReplicaDeath) -> None:
        client = self.client
        if client is not None:
            client.abort()  # wakes a `wait` blocked on a peer that vanished without closing the connection
        self.pool._notify()

    def _run(self) -> None:
        pool, replica = self.pool, self.replica
        timeout = pool.backend.ready_timeout_s
        state = replica.wait_ready(timeout)
        if state is ReplicaState.STARTING:
            replica.terminate(0)
            replica._set_dead(f"did not become ready within {timeout:.0f}s")
        try:
            if replica.state is ReplicaState.READY:
                self.client = ReplicaClient(replica.address, replica.spec.token)
                pool._on_slot_ready(self)
                while True:
                    execution = pool._next_for(self)
                    if execution is None:
                        return
                    if not self._execute(execution):
                        return
        except (ProtocolError, OSError):  # includes a refused connection and a bad token
            pass
        finally:
            if self.client:
                self.client.close()
            if replica.death is None:
                replica.terminate(0)  # a replica this pool cannot use must not linger
            pool._on_slot_gone(self)

    def _execute(self, execution: Execution) -> bool:
        """Runs one execution on the replica; returns False when the replica is gone."""
        spec = execution.spec
        if execution.cancel_requested:  # cancelled between the queue and the replica
            self.pool._finish(self, execution, ExecutionState.CANCELLED)
            return True
        if execution.before_dispatch is not None:
            try:  # e.g. the connector's durable 'started' marker: written before the replica may run anything
                execution.before_dispatch(execution)
            except Exception as e:
                error = ExecutionError.system(
                    "DispatchFailed", f"could not record the dispatch of {spec.execution_id}: {e}"
                )
                self.pool._finish(self, execution, ExecutionState.FAILED, error=error)
                return True
            if execution.cancel_requested:  # cancelled while the hook ran
                self.pool._finish(self, execution, ExecutionState.CANCELLED)
                return True
        try:
            self.client.request("submit", execution_id=spec.execution_id, args=spec.args, env=spec.env)
        except RequestRefused as e:
            if not e.transient:  # the replica will refuse it again: fail it, keep the replica
                error = ExecutionError.system(
                    "SubmitRefused", f"replica {self.replica.name} refused the execution: {e}", recoverable=False
                )
                self.pool._finish(self, execution, ExecutionState.FAILED, error=error)
                return True
            self.pool._requeue(self, execution)
            self.replica.terminate(0)
            return False
        except ProtocolError:  # never accepted: it goes back to the head of the queue for another replica
            self.pool._requeue(self, execution)
            self.replica.terminate(0)
            return False
        try:
            reply = self.client.request(
                "wait", execution_id=spec.execution_id, include_exception=execution.want_exception
            )
        except ProtocolError:
            death = self.replica.wait_dead(5.0) or ReplicaDeath(self.replica.name, "stopped answering its control port")
            self.pool._finish(self, execution, ExecutionState.REPLICA_DIED, death=death)
            self.replica.terminate(0)
            return False
        try:
            state = _ENDED[ReplicaExecutionState.from_wire(reply.get("state"))]
            error = None if reply.get("error") is None else ExecutionError.from_wire(reply["error"])
        except (KeyError, ValueError, ProtocolError) as e:  # a replica that breaks the protocol is not trusted again
            message = f"replica {self.replica.name} answered wait for {spec.execution_id} with {reply!r}: {e}"
            error = ExecutionError.system("ProtocolError", message)
            self.pool._finish(self, execution, ExecutionState.FAILED, error=error)
            self.replica.terminate(0)
            return False
        self.pool._finish(self, execution, state, error=error, exception_payload=reply.get("exception"))
        return True


_ENDED = {
    ReplicaExecutionState.SUCCEEDED: ExecutionState.SUCCEEDED,
    ReplicaExecutionState.FAILED: ExecutionState.FAILED,
    ReplicaExecutionState.CANCELLED: ExecutionState.CANCELLED,
}
"""How an ended execution's replica state maps to the pool's; `wait` answers only these (it has no timeout)."""


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
    ):
        self.key, self.backend, self.size, self.ttl_seconds, self.name = key, backend, size, ttl_seconds, name
        self.token = secrets.token_hex(16)
        self._make_spec = make_spec
        self._starting = 0  # replicas being started outside the lock
        self._cond = threading.Condition()
        self._queue: Deque[Execution] = collections.deque()
        self._executions: Dict[str, Execution] = {}
        self._slots: List[_Slot] = []
        self._closed = False
        self.idle_since = time.monotonic()
        self.deaths = 0
        self.dispatches = {"warm": 0, "cold": 0}
        self._failed_starts = 0

    # ---- public ----
    def submit(
        self,
        spec: ExecutionSpec,
        want_exception: bool = False,
        before_dispatch: Optional[Callable[[Execution], None]] = None,
        on_done: Optional[Callable[[Execution], None]] = None,
    ) -> Execution:
        """Queues an execution and returns at once. Idempotent per execution id: a repeat returns the same one.

        `before_dispatch(execution)` runs on the slot thread just before the replica gets the execution;
        `on_done(execution)` runs once it is terminal, under the pool's lock: keep it to a queue put or a counter.
        """
        with self._cond:
            if self._closed:
                raise PoolClosed(f"pool {self.name} ({self.key}) is shut down")
            existing = self._executions.get(spec.execution_id)
            if existing is not None:
                return existing
            execution = Execution(spec=spec, want_exception=want_exception, before_dispatch=before_dispatch)
            if on_done is not None:
                execution._callbacks.append(on_done)
            self._executions[spec.execution_id] = execution
            self._queue.append(execution)
            to_start = self._reserve_locked()
            self._cond.notify_all()
        self._start_replicas(to_start)
        return execution

    def get(self, execution_id: str) -> Optional[Execution]:
        with self._cond:
            return self._executions.get(execution_id)

    def forget(self, execution_id: str) -> None:
        with self._cond:
            e = self._executions.get(execution_id)
            if e is not None and e.state.terminal:
                del self._executions[execution_id]

    def cancel(self, execution_id: str, grace_seconds: float = 5.0) -> Optional[Execution]:
        """Drops a queued execution or interrupts a running one (restarting its replica if it ignores the interrupt)."""
        with self._cond:
            execution = self._executions.get(execution_id)
            if execution is None or execution.state.terminal:
                return execution
            if execution.state is ExecutionState.QUEUED:
                self._queue.remove(execution)
                self._complete_locked(execution, ExecutionState.CANCELLED)
                return execution
            execution.cancel_requested = True
            slot = next((s for s in self._slots if s.current is execution), None)
        if slot is not None:
            try:
                with contextlib.closing(ReplicaClient(slot.replica.address, self.token, timeout=2.0)) as c:
                    c.request("cancel", io_timeout=2.0, execution_id=execution_id)
            except (ProtocolError, OSError):
                pass
            if not execution.wait(grace_seconds):
                slot.replica.terminate(0)  # it would not stop: replace the replica
        return execution

    def stats(self) -> dict:
        with self._cond:
            ready = [s for s in self._slots if s.replica.state is ReplicaState.READY]
            return {
                "queued": len(self._queue),
                "replicas": len(self._slots),
                "starting": sum(1 for s in self._slots if s.replica.state is ReplicaState.STARTING),
                "busy": sum(1 for s in ready if s.busy),
                "idle": sum(1 for s in ready if not s.busy),
                "deaths": self.deaths,
                **self.dispatches,
            }

    @property
    def replicas(self) -> List[Replica]:
        with self._cond:
            return [s.replica for s in self._slots]

    def is_idle(self) -> bool:
        with self._cond:
            return not self._queue and not any(s.busy for s in self._slots)

    def expired(self, now: Optional[float] = None) -> bool:
        with self._cond:
            return self.is_idle() and (now or time.monotonic()) - self.idle_since >= self.ttl_seconds

    def close_if_expired(self) -> bool:
        """Closes the pool if it is idle past its ttl, atomically with respect to submit (no execution slips in)."""
        with self._cond:
            if self._closed or not self.expired():
                return False
            self._closed = True
            return True

    def shutdown(self, grace_seconds: float = 2.0) -> None:
        """Stops every replica; queued executions end CANCELLED."""
        with self._cond:
            self._closed = True
            while self._queue:
                self._complete_locked(self._queue.popleft(), ExecutionState.CANCELLED)
            slots = list(self._slots)
            self._cond.notify_all()
        for s in slots:
            s.replica.terminate(grace_seconds)

    # ---- scaling and slot callbacks ----
    def _reserve_locked(self) -> int:
        """How many replicas to start for the waiting work (counted as starting; call _start_replicas after)."""
        if self._closed:
            return 0
        idle = sum(1 for s in self._slots if not s.busy and s.replica.state is not ReplicaState.DEAD) + self._starting
        have = len(self._slots) + self._starting
        n = max(0, min(self.size, have + max(0, len(self._queue) - idle)) - have)
        self._starting += n
        return n

    def _start_replicas(self, n: int) -> None:
        """Starts replicas outside the pool's lock (a backend may spawn a process or call an API)."""
        while n > 0:
            n -= 1
            name = f"{self.name}-{next(self._ids)}"
            try:
                replica = self.backend.start(self._make_spec(name, self.token))
            except Exception as e:
                with self._cond:
                    self._starting -= 1
                    self._failed_start_locked(ReplicaDeath(name, f"could not be started: {e!r}"), None)
                    n += self._reserve_locked()  # try again while work waits (bounded by MAX_FAILED_STARTS)
                continue
            with self._cond:
                self._starting -= 1
                if self._closed:
                    replica.terminate(0)
                    continue
                self._slots.append(_Slot(self, replica))

    def _notify(self, *_: object) -> None:
        with self._cond:
            self._cond.notify_all()

    def _requeue(self, slot: _Slot, execution: Execution) -> None:
        with self._cond:
            slot.current = None
            execution.state, execution.replica, execution.started_at = ExecutionState.QUEUED, None, None
            self._queue.appendleft(execution)
            self._cond.notify_all()

    def _on_slot_ready(self, slot: _Slot) -> None:
        with self._cond:
            self._failed_starts = 0

    def _next_for(self, slot: _Slot) -> Optional[Execution]:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed or slot.replica.death is not None)
            if slot.replica.death is not None or (self._closed and not self._queue):
                return None
            execution = self._queue.popleft()
            execution.state = ExecutionState.RUNNING
            execution.started_at = time.monotonic()
            execution.replica = slot.replica.name
            execution.log_uri = slot.replica.log_uri
            execution.warm = slot.executions > 0
            self.dispatches["warm" if execution.warm else "cold"] += 1
            slot.current = execution
            slot.executions += 1
        return execution

    def _finish(
        self, slot: _Slot, execution: Execution, state: ExecutionState, error=None, death=None, exception_payload=None
    ) -> None:
        with self._cond:
            execution.error, execution.death, execution.exception_payload = error, death, exception_payload
            slot.current = None
            self._complete_locked(execution, state)

    def _complete_locked(self, execution: Execution, state: ExecutionState) -> None:
        execution.state = state
        execution.finished_at = time.monotonic()
        if not self._queue and not any(s.busy for s in self._slots):
            self.idle_since = time.monotonic()
        execution._done.set()
        callbacks, execution._callbacks = execution._callbacks, []
        for fn in callbacks:
            try:
                fn(execution)
            except Exception:
                pass
        self._cond.notify_all()

    def _on_slot_gone(self, slot: _Slot) -> None:
        with self._cond:
            if slot in self._slots:
                self._slots.remove(slot)
            death = slot.replica.death or ReplicaDeath(slot.replica.name, "became unreachable and was stopped")
            if not self._closed:
                self.deaths += 1
            if slot.current is not None and not slot.current.state.terminal:
                slot.current.death = death
                self._complete_locked(slot.current, ExecutionState.REPLICA_DIED)
            if slot.client is None and not self._closed:  # never became usable: a failed start
                self._failed_start_locked(death, slot.replica.log_uri)
            to_start = self._reserve_locked()  # a replacement starts if work is waiting
            self._cond.notify_all()
        self._start_replicas(to_start)

    def _failed_start_locked(self, death: ReplicaDeath, log_uri: Optional[str]) -> None:
        self._failed_starts += 1
        if self._failed_starts < MAX_FAILED_STARTS:
            return
        # do not crash-loop: fail what waits, and say why
        where = f"; see {log_uri}" if log_uri else ""
        failed = ReplicaDeath(
            death.replica,
            f"could not start ({MAX_FAILED_STARTS} replicas in a row failed before "
            f"becoming ready; last one {death.reason}{where})",
            death.exit_code,
        )
        while self._queue:
            queued = self._queue.popleft()
            queued.death = failed
            self._complete_locked(queued, ExecutionState.REPLICA_DIED)
        self._failed_starts = 0


class PoolRegistry:
    """Pools by key, created on first use; a reaper thread tears down the ones idle past their ttl.

    Shared by a local driver (`LocalPools`) and the connector (`plugin_backend.pools.PoolManager`)."""

    reap_interval_s = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: Dict[str, ReplicaPool] = {}
        self._stop = threading.Event()
        self._reaper: Optional[threading.Thread] = None
        self.reaped = 0

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
            except Exception:  # never let one round's failure end the reaper: no pool would be torn down again
                logger.exception("actor pool reaper: a reaping round failed; carrying on")

    def reap(self) -> int:
        """Tears down pools idle past their ttl; returns how many. A pool that cannot be checked or stopped is
        logged and skipped: one bad pool never keeps the others alive."""
        with self._lock:
            closed = [k for k, p in self._pools.items() if _closes(p)]
            pools = [self._pools.pop(k) for k in closed]
        for p in pools:
            try:
                p.shutdown()
            except Exception:
                logger.exception("actor pool reaper: could not shut down pool %s (%s)", p.name, p.key)
        self.reaped += len(pools)
        return len(pools)

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
        for p in pools:
            p.shutdown(grace_seconds=1.0)


def _closes(pool: ReplicaPool) -> bool:
    """pool.close_if_expired(), logging (not raising) a pool that cannot say, so the reaper carries on."""
    try:
        return pool.close_if_expired()
    except Exception:
        logger.exception("actor pool reaper: cannot check pool %s (%s) for expiry; skipping it", pool.name, pool.key)
        return False

"""Runs one `actor_map` execution: dispatches its items to the pool, keeps each result in storage, gathers.

A coordinator thread per map keeps at most `concurrency` items in the pool (twice the pool size when unbounded,
so replicas never wait on the coordinator while other executions still interleave FIFO). Items already finished
in storage (a connector restart) are not dispatched again.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from typing import Callable, Dict, List, Optional

from flyteidl.core import literals_pb2

from flytekitplugins_actor.pool import Execution, ExecutionState, PoolClosed, ReplicaPool
from flytekitplugins_actor.replica.error import ExecutionError, read_error_document, write_error_document
from flytekitplugins_actor.replica.execution import ExecutionSpec
from plugin_backend import metrics, store
from plugin_backend.map_plan import MapPlan, item_args
from plugin_backend.template import ActorTemplate

log = logging.getLogger(__name__)

WINDOW_PER_REPLICA = int(os.environ.get("FLYTE_ACTOR_MAP_WINDOW_PER_REPLICA", "2"))
"""Unbounded maps keep this many items per replica in the pool: enough that a replica never waits for the
coordinator, few enough that other executions of the environment interleave FIFO."""


class MapRun:
    """One map execution's progress. `phase` is running | succeeded | failed | aborted."""

    def __init__(
        self,
        execution_id: str,
        template: ActorTemplate,
        plan: MapPlan,
        record: store.ExecutionRecord,
        env: Dict[str, str],
        pool_of: Callable[[], ReplicaPool],
    ):
        self.execution_id, self.template, self.plan, self.record, self.env = execution_id, template, plan, record, env
        self._pool_of = pool_of
        self.n = plan.size
        self.results: Dict[int, str] = {}  # item -> "outputs" | "error"
        self.errors: Dict[int, dict] = {}
        self.inflight: Dict[str, int] = {}  # item execution id -> item index
        self.items: Dict[int, Execution] = {}
        self.phase = "running"
        self.message = ""
        self.recoverable = False
        self.outputs: Optional[literals_pb2.LiteralMap] = None
        self.resumed = 0  # items whose result was already in storage when this run started
        self.dispatched = 0
        self.replicas: "collections.OrderedDict[str, str]" = collections.OrderedDict()  # replica -> log uri
        self._pending: "collections.deque[int]" = collections.deque()  # items to dispatch, coordinator thread only
        self._done_q: "queue.SimpleQueue[Optional[Execution]]" = queue.SimpleQueue()
        self._aborted = threading.Event()
        self.finished = threading.Event()
        self.started_at = time.monotonic()

    def start(self) -> "MapRun":
        threading.Thread(target=self._run, name=f"map-{self.execution_id}", daemon=True).start()
        return self

    def abort(self) -> None:
        self._aborted.set()
        self._done_q.put(None)

    def progress(self) -> Dict[str, int]:
        """Read from GetTask's thread while the coordinator runs: only counters, never a dict iteration."""
        failed = len(self.errors)
        return {
            "total": self.n,
            "succeeded": len(self.results) - failed,
            "failed": failed,
            "running": len(self.inflight),
            "resumed": self.resumed,
        }

    # ---- coordinator thread ----
    def _run(self) -> None:
        try:
            for i, kind in self.record.finished_items(self.n).items():
                self.results[i] = kind
                if kind == "error":
                    error = read_error_document(self.record.item_prefix(i))
                    self.errors[i] = error.to_wire() if error else {"message": "failed", "recoverable": False}
            self.resumed = len(self.results)
            pending = self._pending
            pending.extend(i for i in range(self.n) if i not in self.results)
            while not self._decided():
                pool = self._pool_of()  # resolved again each round: a pool reaped or closed under the map is replaced
                window = self.template.map.concurrency or WINDOW_PER_REPLICA * pool.size
                while pending and len(self.inflight) < window:
                    self._dispatch(pool, pending.popleft())
                execution = self._done_q.get()
                if execution is None:
                    continue  # abort: _decided() sees it
                self._absorb(execution)
        except Exception as e:  # storage or pool trouble: the map fails, retryably
            self._finish("failed", f"map coordinator failed: {type(e).__name__}: {e}", recoverable=True)
        finally:
            self._cancel_inflight()
            self.finished.set()

    def _dispatch(self, pool: ReplicaPool, i: int) -> None:
        prefix = self.record.item_prefix(i)
        inputs_path = store.join(prefix, "inputs.pb")
        store.write_bytes(inputs_path, self.plan.item_inputs(i).SerializeToString())
        item_id = f"{self.execution_id}.{i}"
        spec = ExecutionSpec(item_id, item_args(self.template.args, inputs_path, prefix, i), self.env)
        self.inflight[item_id] = i
        try:
            self.items[i] = pool.submit(spec, on_done=self._on_done)
        except PoolClosed:  # reaped while idle between two items: the next lookup makes a new pool
            self.items[i] = self._pool_of().submit(spec, on_done=self._on_done)
        self.dispatched += 1

    def _on_done(self, execution: Execution) -> None:
        metrics.observe_done(execution)
        self._done_q.put(execution)

    def _absorb(self, execution: Execution) -> None:
        i = self.inflight.pop(execution.id, None)
        if i is None:
            return
        self.items.pop(i, None)
        if execution.replica:
            self.replicas[execution.replica] = execution.log_uri or ""
            self.replicas.move_to_end(execution.replica)
            while len(self.replicas) > 8:
                self.replicas.popitem(last=False)
        pool = self._pool_of()
        pool.forget(execution.id)
        state = execution.state
        if state is ExecutionState.CANCELLED and not self._aborted.is_set():
            # cancelled under the map (its pool was closed or reaped): dispatch it again, to a live pool
            self._pending.appendleft(i)
            return
        if state is ExecutionState.SUCCEEDED:
            self.results[i] = "outputs"
        elif state is ExecutionState.FAILED:
            self.results[i] = "error"
            self.errors[i] = (
                execution.error.to_wire() if execution.error else {"message": "failed", "recoverable": False}
            )
        elif state is ExecutionState.REPLICA_DIED:
            self.results[i] = "error"
            self.errors[i] = {
                "code": "ReplicaDied",
                "message": f"{execution.death}",
                "origin": "SYSTEM",
                "recoverable": True,
            }
        # CANCELLED while aborting: the map ends aborted

    def _decided(self) -> bool:
        if self.phase != "running":
            return True
        if self._aborted.is_set():
            self.phase, self.message = "aborted", "map was aborted"
            return True
        spec = self.template.map
        failed = sorted(self.errors)
        need = spec.min_successes(self.n)
        if len(failed) > self.n - need:
            first = failed[0]
            err = self.errors[first]
            msg = (
                f"{len(failed)} of {self.n} items failed; min_success_ratio={spec.min_success_ratio} needs {need} "
                f"successes. Item {first}: {err.get('code', '')}: {err.get('message', '')}"
            )
            self._finish("failed", msg, recoverable=all(self.errors[i].get("recoverable") for i in failed))
            return True
        if len(self.results) == self.n:
            self._gather()
            return True
        return False

    def _gather(self) -> None:
        results: List[Optional[literals_pb2.LiteralMap]] = []
        for i in range(self.n):
            if self.results.get(i) != "outputs":
                results.append(None)
                continue
            data = store.read_bytes(store.join(self.record.item_prefix(i), "outputs.pb"))
            m = literals_pb2.LiteralMap()
            m.ParseFromString(data or b"")
            results.append(m)
        outputs = MapPlan.gather(self.template.output_names, results)
        store.write_bytes(
            self.record.path("outputs.pb"), outputs.SerializeToString(), atomic=True
        )  # it means SUCCEEDED
        self.outputs = outputs
        failed = len(self.errors)
        self._finish(
            "succeeded",
            f"{self.n - failed} of {self.n} items succeeded" + (f", {failed} failed (none)" if failed else ""),
        )

    def _finish(self, phase: str, message: str, recoverable: bool = False) -> None:
        """Decides the map. A failure goes to storage first (a restarted connector must answer what GetTask
        answered), but a failed write is logged, not raised, and the phase is set whatever happens: a map can
        never stay RUNNING because its error document could not be written."""
        self.message, self.recoverable = message, recoverable
        try:
            if phase == "failed":
                origin = "SYSTEM" if recoverable else "USER"
                write_error_document(
                    self.record.prefix,
                    ExecutionError.from_wire(
                        {"code": "MapItemsFailed", "message": message, "origin": origin, "recoverable": recoverable}
                    ),
                )
        except Exception:
            log.exception("map %s: could not write its error document under %s", self.execution_id, self.record.prefix)
        finally:
            self.phase = phase  # last: GetTask reads the phase, then message and recoverable

    CANCEL_GRACE_S = 2.0

    def _cancel_inflight(self) -> None:
        """Cancels every in-flight item at once and waits for them together: one grace period for the whole
        map (cancelled one by one, a map with many items in flight outlasts propeller's DeleteTask timeout)."""
        if not self.inflight:
            return
        pool = self._pool_of()

        def cancel(item_id: str) -> None:
            try:
                pool.cancel(item_id, grace_seconds=self.CANCEL_GRACE_S)
            except Exception:
                log.exception("map %s: could not cancel item %s", self.execution_id, item_id)
            pool.forget(item_id)

        threads = [
            threading.Thread(target=cancel, args=(item_id,), name=f"cancel-{item_id}", daemon=True)
            for item_id in list(self.inflight)
        ]
        for th in threads:
            th.start()
        deadline = time.monotonic() + self.CANCEL_GRACE_S + 3.0  # the cancel request's own timeout, then the grace
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        self.inflight.clear()

"""Runs one `actor_map` execution in the connector: dispatches its items to the pool, keeps each result in
storage, and decides the map by the SDK's map model (`flytekitplugins_actor.map_model`), the same window, tally
and decision as a local run. Item i's output prefix is `<outputPrefix>/items/<i>`; its inputs travel with the
request to the replica (written to `items/<i>/inputs.pb` only when they are too big for that).

A coordinator thread per map keeps the map's window of items in the pool. Within one connector process an item is
dispatched again only when it never reached a replica (its pool closed under it). After a connector restart the
items with a result in storage are not run again, but the items that were in flight when it stopped left no
result and are run again: a map item may run twice across a restart (there is no per-item started marker).
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
from typing import Callable, Dict, List, Optional, Union

from flyteidl.core import literals_pb2
from flytekit.loggers import logger
from flytekit.models.literals import LiteralMap

from flytekitplugins_actor.constants import CANCEL_GRACE_S
from flytekitplugins_actor.map_model import (
    ABORTED,
    MapDecision,
    MapInputError,
    MapPhase,
    MapPlan,
    MapSpec,
    MapTally,
    cancel_items,
)
from flytekitplugins_actor.pool import Execution, ExecutionState, PoolClosed, ReplicaPool
from flytekitplugins_actor.replica.error import ExecutionError, read_error_document, write_error_document
from flytekitplugins_actor.replica.execution import ExecutionSpec
from flytekitplugins_actor.replica.protocol import INLINE_LIMIT_BYTES
from plugin_backend import metrics, store
from plugin_backend.errors import InvalidActorRequest
from plugin_backend.template import ActorTemplate

RECENT_REPLICAS = 8
"""How many replicas (the most recent) a map's status links to."""

UNREADABLE_ITEM_ERROR = ExecutionError.system("ItemFailed", "failed; its error document could not be read", False)
"""A failed item whose error could not be read back."""


def plan_of(inputs: Union[LiteralMap, literals_pb2.LiteralMap, None], spec: MapSpec) -> MapPlan:
    """The split of a map's inputs, refusing inputs that cannot be split as a request error."""
    try:
        return MapPlan(inputs, spec)
    except MapInputError as e:
        raise InvalidActorRequest(str(e)) from None


def item_id(map_execution_id: str, i: int) -> str:
    """Item i's execution id in the pool."""
    return f"{map_execution_id}.{i}"


def item_of(map_execution_id: str, execution_id: str) -> Optional[int]:
    """The item index an execution id names within the map, or None if it is not one of the map's items."""
    prefix, _, index = execution_id.rpartition(".")
    return int(index) if prefix == map_execution_id and index.isdigit() else None


class MapRun:
    """One map execution's progress; `phase` is a MapPhase, set last when the map ends."""

    CANCEL_GRACE_S = CANCEL_GRACE_S

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
        self.tally = MapTally(plan.spec, plan.size)
        self.phase = MapPhase.RUNNING
        self.message = ""
        self.recoverable = False
        self.replicas: "collections.OrderedDict[str, str]" = collections.OrderedDict()  # replica -> log uri
        self._done_q: "queue.SimpleQueue[Optional[Execution]]" = queue.SimpleQueue()
        self._aborted = threading.Event()
        self.finished = threading.Event()
        self.started = threading.Event()
        """Set once an item reached a replica: until then the map waits for its pool (GetTask says why)."""

    @property
    def n(self) -> int:
        return self.tally.n

    def start(self) -> "MapRun":
        threading.Thread(target=self._run, name=f"map-{self.execution_id}", daemon=True).start()
        return self

    def abort(self) -> None:
        self._aborted.set()
        self._done_q.put(None)

    def progress(self) -> Dict[str, int]:
        """Read from GetTask's thread while the coordinator runs: counters only."""
        return self.tally.progress()

    # ---- coordinator thread ----
    def _run(self) -> None:
        try:
            self._resume()
            while (decision := self._decision()) is None:
                pool = self._pool_of()  # resolved again each round: a pool reaped or closed under the map is replaced
                for i in self.tally.take(self.plan.spec.window(pool.size)):
                    self._dispatch(pool, i)
                execution = self._done_q.get()
                if execution is not None:  # None: abort, which _decision() sees
                    self._absorb(execution)
            self._conclude(decision)
        except Exception as e:  # storage or pool trouble: the map fails, retryably
            logger.exception(f"map {self.execution_id}: coordinator failed")
            message = f"map coordinator failed: {type(e).__name__}: {e}"
            self._conclude(MapDecision(MapPhase.FAILED, message, recoverable=True))
        finally:
            self._cancel_inflight()
            self.finished.set()

    def _resume(self) -> None:
        """Counts the items whose result is already in storage (a connector restart): they are not run again."""
        for i, failed in sorted(self.record.finished_items(self.n).items()):
            error = (read_error_document(self.record.item_prefix(i)) or UNREADABLE_ITEM_ERROR) if failed else None
            self.tally.resume(i, error)

    def _decision(self) -> Optional[MapDecision]:
        return ABORTED if self._aborted.is_set() else self.tally.decision()

    def _dispatch(self, pool: ReplicaPool, i: int) -> None:
        prefix = self.record.item_prefix(i)
        inputs_path = store.join(prefix, "inputs.pb")
        inputs_pb = self.plan.item_inputs(i).SerializeToString()
        inline = len(inputs_pb) <= INLINE_LIMIT_BYTES  # small inputs go with the request: no storage write per item
        if not inline:
            store.write_bytes(inputs_path, inputs_pb)
        execution_id = item_id(self.execution_id, i)
        command = self.template.command.with_paths(inputs=inputs_path, output_prefix=prefix, item=i)
        spec = ExecutionSpec(
            execution_id,
            command.to_args(),
            self.env,
            inputs_pb=inputs_pb if inline else None,
            inputs_file=functools.partial(store.write_bytes, inputs_path),  # for a replica too old to take them inline
        )
        try:
            execution = pool.submit(spec, before_dispatch=self._on_dispatch, on_done=self._on_done)
        except PoolClosed:  # reaped while idle between two items: the next lookup makes a new pool
            execution = self._pool_of().submit(spec, before_dispatch=self._on_dispatch, on_done=self._on_done)
        if execution.dispatched or execution.state.terminal:  # re-attached after a restart: it reached a replica
            self.started.set()

    def _on_dispatch(self, execution: Execution) -> None:
        self.started.set()

    def _on_done(self, execution: Execution) -> None:
        metrics.observe_done(execution)
        self._done_q.put(execution)

    def _absorb(self, execution: Execution) -> None:
        """Counts a finished item. Only an item that never reached a replica goes back to the queue."""
        i = item_of(self.execution_id, execution.id)
        if i is None or i not in self.tally.inflight:
            return
        if execution.replica:
            self.replicas[execution.replica] = execution.log_uri or ""
            self.replicas.move_to_end(execution.replica)
            while len(self.replicas) > RECENT_REPLICAS:
                self.replicas.popitem(last=False)
        self._pool_of().forget(execution.id)
        state, tally = execution.state, self.tally
        if state is ExecutionState.SUCCEEDED:
            tally.succeed(i)
        elif state is ExecutionState.FAILED:
            tally.fail(i, execution.error or UNREADABLE_ITEM_ERROR)
        elif state is ExecutionState.REPLICA_DIED:
            tally.fail(i, ExecutionError.system("ReplicaDied", f"{execution.death}", recoverable=True))
        elif self._aborted.is_set():
            pass  # CANCELLED by the abort: the map ends aborted
        elif execution.replica is None:
            tally.never_ran(i)  # cancelled in the queue (its pool closed or was reaped): a live pool gets it
        else:  # a replica answered "cancelled" though nobody cancelled it: it ran, and is never sent again
            message = (
                f"replica {execution.replica} reported item {i} cancelled, but the map was not aborted "
                "(did the task raise KeyboardInterrupt?)"
            )
            tally.fail(i, ExecutionError.user("Cancelled", message))

    def _conclude(self, decision: MapDecision) -> None:
        """Ends the map: gathers its outputs (succeeded) or writes its error document (failed), then sets the
        phase. A failed write of the error document is logged, not raised: a map never stays RUNNING because
        its error document could not be written (a restarted connector then answers from the items)."""
        self.message, self.recoverable = decision.message, decision.recoverable
        try:
            if decision.phase is MapPhase.SUCCEEDED:
                self._gather()
            elif decision.phase is MapPhase.FAILED:
                write_error_document(self.record.prefix, decision.error())
        except Exception as e:
            if decision.phase is MapPhase.SUCCEEDED:
                raise  # the outputs are the result: the coordinator fails the map, retryably
            logger.error(f"map {self.execution_id}: could not write its error document under {self.record.prefix}: {e}")
        self.phase = decision.phase  # last: GetTask reads the phase, then message and recoverable

    def _gather(self) -> None:
        """Every item's outputs from storage, one list per output name (none for a failed item), into outputs.pb
        (propeller reads it there: GetTask answers by reference)."""
        results: List[Optional[literals_pb2.LiteralMap]] = []
        for i in range(self.n):
            if i not in self.tally.succeeded:
                results.append(None)
                continue
            data = store.read_bytes(store.join(self.record.item_prefix(i), "outputs.pb"))
            m = literals_pb2.LiteralMap()
            m.ParseFromString(data or b"")
            results.append(m)
        outputs = MapPlan.gather(self.template.output_names, results)
        store.write_bytes(self.record.path("outputs.pb"), outputs.SerializeToString(), atomic=True)  # = SUCCEEDED

    def _cancel_inflight(self) -> None:
        """Cancels every item still in flight (the pool escalates past the grace on its own) and forgets them."""
        ids = [item_id(self.execution_id, i) for i in sorted(self.tally.inflight)]
        if not ids:
            return
        pool = self._pool_of()

        def cancel(execution_id: str) -> None:
            pool.cancel(execution_id, grace_seconds=self.CANCEL_GRACE_S)
            pool.forget(execution_id)

        cancel_items(cancel, ids, f"map {self.execution_id}")
        self.tally.inflight.clear()

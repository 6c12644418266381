"""The actor connector's logic, independent of gRPC: create, get and delete actor and actor_map executions.

In memory it keeps one record per execution it is serving; storage (see store.py) keeps what a restarted
connector needs. GetTask for an execution this process does not know is answered from storage:
outputs.pb -> SUCCEEDED, error.pb -> FAILED or RETRYABLE_FAILED, dispatched but no result -> RETRYABLE_FAILED
(never run twice), never dispatched -> queued again; maps resume from their items' results.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from flyteidl.core import literals_pb2
from flyteidl.core.execution_pb2 import TaskExecution, TaskLog
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate

from flytekitplugins_actor.pool import Execution, ExecutionState, PoolClosed, ReplicaPool
from flytekitplugins_actor.replica.error import ExecutionError, read_error_document
from flytekitplugins_actor.replica.execution import ExecutionSpec
from plugin_backend import metrics, store
from plugin_backend.errors import InvalidActorRequest
from plugin_backend.identity import identity_of
from plugin_backend.map_plan import MapPlan
from plugin_backend.map_run import MapRun
from plugin_backend.meta import MAX_META_BYTES, ActorResourceMeta
from plugin_backend.pools import PoolKey, PoolManager
from plugin_backend.template import ACTOR_MAP_TASK_TYPE, ACTOR_SYNC_TASK_TYPE, ActorTemplate, parse_template

TERMINAL_PHASES = (TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED)

KEEP_TERMINAL_S = 600.0
"""How long a finished execution is answered from memory; after that, from storage."""


@dataclass
class Status:
    """What GetTask answers, before it becomes a flytekit Resource."""

    phase: int
    message: str = ""
    log_links: List[TaskLog] = field(default_factory=list)
    outputs: Optional[literals_pb2.LiteralMap] = None
    custom_info: Optional[dict] = None


@dataclass
class _Entry:
    meta: ActorResourceMeta
    key: PoolKey
    template: ActorTemplate
    execution: Optional[Execution] = None
    map_run: Optional[MapRun] = None
    ready: bool = False  # set once create (or adoption) has queued it; waiters use ActorService._ready
    final: Optional[Status] = None
    final_at: float = 0.0


def _log_links(replicas: List[Tuple[str, Optional[str]]]) -> List[TaskLog]:
    links = []
    for name, uri in replicas:
        if uri:
            if "://" not in uri:
                uri = f"file://{uri}"
            links.append(TaskLog(uri=uri, name=f"Actor replica {name}", message_format=TaskLog.UNKNOWN))
    return links


def _forget_when_done(pool: ReplicaPool, execution: Execution, timeout: float = 120.0) -> None:
    """Drops a cancelled execution from its pool's table now, or once it ends (a replica restarted to stop it
    reports the execution's end a moment later): a pool that never goes idle would otherwise keep it forever."""
    if execution.state.terminal:
        pool.forget(execution.id)
        return

    def later() -> None:
        execution.wait(timeout)
        pool.forget(execution.id)

    threading.Thread(target=later, name=f"forget-{execution.id}", daemon=True).start()


class ActorService:
    """One per connector process (see `service()`)."""

    def __init__(self, manager: Optional[PoolManager] = None):
        self.manager = manager or PoolManager()
        self._lock = threading.Lock()
        self._entries: Dict[str, _Entry] = {}
        self._ready = threading.Condition(self._lock)  # one for all entries: an Event each costs ~0.5 KB
        self._last_gc = time.monotonic()
        metrics.register(self)

    # ---- create ----
    def create(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap],
        task_execution_metadata: Optional[TaskExecutionMetadata],
        task_type: str,
    ) -> ActorResourceMeta:
        template = parse_template(task_template, task_type)
        if template.needs_render:
            template = self._render(template, output_prefix, inputs)
        ident = identity_of(task_execution_metadata, template.task_name)
        key = PoolKey(ident.namespace, ident.service_account, template.env_key, template.code_version)
        meta = ActorResourceMeta(
            ident.execution_id,
            output_prefix,
            task_type,
            template.env_name,
            template.env_key,
            ident.namespace,
            ident.service_account,
            key.code,
        )
        if len(meta.encode()) > MAX_META_BYTES:
            raise InvalidActorRequest(f"output prefix too long: the resource meta would exceed {MAX_META_BYTES} bytes")
        plan = MapPlan(inputs, template.map) if template.map is not None else None  # refuse bad inputs now
        env = {**template.container_env, **ident.env}
        with self._lock:
            entry = self._entries.get(meta.execution_id)
            if entry is None:
                entry = self._entries[meta.execution_id] = _Entry(meta, key, template)
                mine = True
            else:
                mine = False
        if not mine:  # a repeated CreateTask: same execution, never run twice
            self._wait_ready(entry)
            return entry.meta
        try:
            record = store.ExecutionRecord(output_prefix)
            previous = record.create_request(
                {
                    "execution_id": meta.execution_id,
                    "kind": task_type,
                    "created": time.time(),
                    "namespace": ident.namespace,
                    "service_account": ident.service_account,
                    "env": env,
                    "template": template.to_record(),
                }
            )
            if previous is not None and previous.get("execution_id") == meta.execution_id:
                # created before this process started (a restart): answer from storage, re-enqueue if never started
                with self._lock:
                    del self._entries[meta.execution_id]
                self._adopt(meta)
                return meta
            if previous is not None:  # another execution's record under this prefix: never expected
                raise InvalidActorRequest(
                    f"output prefix {output_prefix} already holds execution {previous.get('execution_id')}"
                )
            self._start(entry, env, plan, record)
        except BaseException:
            with self._lock:
                self._entries.pop(meta.execution_id, None)
            raise
        finally:
            self._set_ready(entry)
        return meta

    @staticmethod
    def _render(template: ActorTemplate, output_prefix: str, inputs: Optional[LiteralMap]) -> ActorTemplate:
        """Renders a pod template's args as propeller renders a container's: the request's inputs are written
        next to the outputs (propeller sends them, not their path), raw data and checkpoints go under the prefix."""
        inputs_path = store.join(output_prefix, store.INPUTS)
        data = inputs.to_flyte_idl().SerializeToString() if inputs is not None else b""
        store.write_bytes(inputs_path, data, atomic=True)
        return template.rendered(
            {
                "input": inputs_path,
                "outputprefix": output_prefix,
                "rawoutputdataprefix": store.join(output_prefix, "raw"),
                "checkpointoutputprefix": store.join(output_prefix, "_flytecheckpoints"),
                "prevcheckpointprefix": '""',
            }
        )

    def _set_ready(self, entry: _Entry) -> None:
        with self._ready:
            entry.ready = True
            self._ready.notify_all()

    def _wait_ready(self, entry: _Entry, timeout: float = 10.0) -> None:
        if not entry.ready:
            with self._ready:
                self._ready.wait_for(lambda: entry.ready, timeout)

    def _pool(self, entry: _Entry) -> ReplicaPool:
        return self.manager.pool_for(entry.key, entry.template)

    def _start(
        self, entry: _Entry, env: Dict[str, str], plan: Optional[MapPlan], record: store.ExecutionRecord
    ) -> None:
        if plan is not None:
            entry.map_run = MapRun(
                entry.meta.execution_id, entry.template, plan, record, env, lambda: self._pool(entry)
            ).start()
            return
        spec = ExecutionSpec(entry.meta.execution_id, entry.template.args, env)

        def mark_started(execution: Execution) -> None:
            record.mark(store.STARTED, f"{execution.replica or ''}\n{time.time()}")

        for _ in range(3):
            try:
                entry.execution = self._pool(entry).submit(
                    spec, before_dispatch=mark_started, on_done=metrics.observe_done
                )
                return
            except PoolClosed:  # reaped between lookup and submit: the next lookup makes a new pool
                continue
        raise RuntimeError(f"pool for {entry.template.env_name} kept closing")

    # ---- sync path ----
    def execute_sync(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap],
        task_execution_metadata: Optional[TaskExecutionMetadata],
        budget_s: float,
    ) -> Status:
        """Runs an `actor_sync` execution and answers with a terminal status (outputs inline): propeller keeps no
        resource meta for a sync task, so it cannot poll a non-terminal answer later. Same pools, queue, replicas
        and idempotency record as `actor`. Past `budget_s` the execution is cancelled and the answer is
        RETRYABLE_FAILED saying why and what to change."""
        deadline = time.monotonic() + budget_s
        meta = self.create(task_template, output_prefix, inputs, task_execution_metadata, ACTOR_SYNC_TASK_TYPE)
        while True:
            status = self.get(meta)
            if status.phase in TERMINAL_PHASES:
                return self._sync_answer(meta, status)
            with self._lock:
                entry = self._entries.get(meta.execution_id)
            execution = entry.execution if entry is not None else None
            remaining = deadline - time.monotonic()
            if execution is None or remaining <= 0:
                return self._sync_timeout(meta, entry, budget_s)
            execution.wait(remaining)

    @staticmethod
    def _sync_answer(meta: ActorResourceMeta, status: Status) -> Status:
        if status.phase == TaskExecution.SUCCEEDED and status.outputs is None:
            data = store.read_bytes(store.join(meta.output_prefix, "outputs.pb"))
            if data is not None:
                status = replace(status, outputs=literals_pb2.LiteralMap.FromString(data))
        elif status.phase == TaskExecution.ABORTED:  # only our own budget cancels a sync execution
            status = replace(status, phase=TaskExecution.RETRYABLE_FAILED)
        return status

    def _sync_timeout(self, meta: ActorResourceMeta, entry: Optional[_Entry], budget_s: float) -> Status:
        """Cancels an execution that outlived the sync budget; the answer says why and what to change."""
        env = meta.env
        change = (
            f"raise FLYTE_ACTOR_SYNC_BUDGET_S on the connector (now {budget_s:g}s; keep propeller's "
            "connector timeouts.ExecuteTaskSync above it), or take this task off the sync path (@env.task without "
            "sync=True)"
        )
        execution = entry.execution if entry is not None else None
        if execution is not None and execution.state is ExecutionState.RUNNING:
            reason = (
                f"task too long for the sync path: it ran on replica {execution.replica} longer than the sync "
                f"budget of {budget_s:g}s and was cancelled. Tasks that long belong on the async path: {change}"
            )
        else:
            pool = self.manager.find(entry.key) if entry is not None else None
            stats = pool.stats() if pool is not None else {"starting": 0, "busy": 0, "idle": 0, "queued": 0}
            if stats["starting"] and not stats["busy"] and not stats["idle"]:
                reason = (
                    f"pool still starting: no replica of actor environment {env} was ready within the sync budget "
                    f"of {budget_s:g}s ({stats['starting']} starting; they keep starting, so a retry finds them "
                    f"warm). Warm the environment before sync tasks need it (an async task of it, or a longer "
                    f"ttl_seconds), or {change}"
                )
            else:
                reason = (
                    f"no replica of actor environment {env} was free within the sync budget of {budget_s:g}s "
                    f"({stats['busy']} busy, {stats['queued']} queued): raise its replica_count, or {change}"
                )
        self.delete(meta)
        after = self.get(meta)
        if after.phase != TaskExecution.ABORTED:  # it finished just as the budget ran out: that result stands
            return self._sync_answer(meta, after)
        status = Status(TaskExecution.RETRYABLE_FAILED, reason, after.log_links)
        if entry is not None:  # a repeated ExecuteTaskSync of this attempt gets the same answer
            entry.final, entry.final_at = status, time.monotonic()
        return status

    # ---- get ----
    def get(self, meta: ActorResourceMeta) -> Status:
        self._gc()
        entry = self._entry(meta)
        if isinstance(entry, Status):
            return entry
        self._wait_ready(entry)
        if entry.final is not None:
            return entry.final
        status = self._map_status(entry) if entry.map_run is not None else self._status(entry)
        if status.phase in TERMINAL_PHASES:
            entry.final, entry.final_at = status, time.monotonic()
            pool = self.manager.find(entry.key)
            if entry.execution is not None and pool is not None:
                pool.forget(entry.execution.id)
        return status

    def _entry(self, meta: ActorResourceMeta) -> "_Entry | Status":
        """The in-memory entry of an execution, adopting it from storage when this process does not know it;
        a Status when storage alone answers. An entry gone again right after adoption (its start failed in
        another thread, or it was collected) is adopted again."""
        for _ in range(3):
            entry = self._entries.get(meta.execution_id)
            if entry is not None:
                return entry
            status = self._adopt(meta)
            if status is not None:
                return status
            entry = self._entries.get(meta.execution_id)
            if entry is not None:
                return entry
        raise RuntimeError(f"execution {meta.execution_id} could not be adopted from {meta.output_prefix}")

    def _status(self, entry: _Entry) -> Status:
        e = entry.execution
        links = _log_links([(e.replica, e.log_uri)]) if e.replica else []
        state = e.state
        if state is ExecutionState.QUEUED:
            stats = self._pool(entry).stats()
            if stats["starting"] and not stats["busy"] and not stats["idle"]:
                return Status(
                    TaskExecution.INITIALIZING,
                    f"starting {stats['starting']} replica(s) of actor environment {entry.template.env_name}",
                )
            return Status(
                TaskExecution.QUEUED,
                f"queued for actor environment {entry.template.env_name}: "
                f"{stats['queued']} queued, {stats['busy']} of {stats['replicas']} replicas busy",
            )
        if state is ExecutionState.RUNNING:
            return Status(
                TaskExecution.RUNNING, f"running on replica {e.replica} ({'warm' if e.warm else 'cold'})", links
            )
        if state is ExecutionState.SUCCEEDED:
            return Status(TaskExecution.SUCCEEDED, f"succeeded on replica {e.replica}", links)
        if state is ExecutionState.FAILED:
            return self._failure(e.error, f"on replica {e.replica}", links)
        if state is ExecutionState.CANCELLED:
            return Status(TaskExecution.ABORTED, "aborted", links)
        # REPLICA_DIED
        return Status(
            TaskExecution.RETRYABLE_FAILED,
            f"replica died: {e.death or 'replica ' + str(e.replica) + ' vanished'} while running execution {e.id}; "
            f"a replacement replica serves the retry",
            links,
        )

    @staticmethod
    def _failure(error: Optional[ExecutionError], where: str, links: List[TaskLog]) -> Status:
        if error is None:
            return Status(TaskExecution.FAILED, f"[Error] {where}: unknown error", links)
        phase = TaskExecution.RETRYABLE_FAILED if error.recoverable else TaskExecution.FAILED
        return Status(phase, f"[{error.code or 'Error'}] {where}: {error.message}", links)

    def _map_status(self, entry: _Entry) -> Status:
        run = entry.map_run
        links = _log_links(list(run.replicas.items()))
        info = run.progress()
        if run.phase == "running":
            return Status(
                TaskExecution.RUNNING,
                f"{info['succeeded'] + info['failed']} of {run.n} items done",
                links,
                custom_info=info,
            )
        if run.phase == "succeeded":  # outputs by reference: propeller reads outputs.pb (an answer has a 4 MiB limit)
            return Status(TaskExecution.SUCCEEDED, run.message, links, custom_info=info)
        if run.phase == "aborted":
            return Status(TaskExecution.ABORTED, run.message, links, custom_info=info)
        phase = TaskExecution.RETRYABLE_FAILED if run.recoverable else TaskExecution.FAILED
        return Status(phase, run.message, links, custom_info=info)

    # ---- restart path ----
    def _adopt(self, meta: ActorResourceMeta) -> Optional[Status]:
        """Answers for an execution this process did not create, from storage; re-enqueues or resumes if it must."""
        record = store.ExecutionRecord(meta.output_prefix)
        if record.has_error():
            return self._failure(read_error_document(meta.output_prefix), "recorded in error.pb", [])
        if record.has_outputs():
            return Status(TaskExecution.SUCCEEDED, "succeeded (answered from storage)")
        if record.marker(store.ABORTED) is not None:
            return Status(TaskExecution.ABORTED, "aborted")
        request = record.read_request()
        if request is None or request.get("execution_id") != meta.execution_id:
            return Status(
                TaskExecution.RETRYABLE_FAILED,
                f"no record of execution {meta.execution_id} under {meta.output_prefix}; "
                "the connector lost it before queueing it",
            )
        if meta.kind != ACTOR_MAP_TASK_TYPE:
            started = record.marker(store.STARTED)
            if started is not None:
                replica = started.split("\n", 1)[0] or "?"
                return Status(
                    TaskExecution.RETRYABLE_FAILED,
                    f"execution {meta.execution_id} was dispatched to replica {replica} but left no result: "
                    "the connector "
                    "restarted (or the replica died) while it ran; it is not run twice",
                )
        template = ActorTemplate.from_record(request["template"])
        key = PoolKey(request["namespace"], request["service_account"], template.env_key, template.code_version)
        plan = None
        if template.map is not None:
            data = store.read_bytes(template.command.inputs)
            plan = MapPlan(literals_pb2.LiteralMap.FromString(data or b""), template.map)
        with self._lock:
            if meta.execution_id in self._entries:
                return None
            entry = self._entries[meta.execution_id] = _Entry(meta, key, template)
        try:
            self._start(entry, request["env"], plan, record)
        except BaseException:  # as in create: never leave a broken entry (no execution) for GetTask to trip on
            with self._lock:
                if self._entries.get(meta.execution_id) is entry:
                    del self._entries[meta.execution_id]
            raise
        finally:
            self._set_ready(entry)
        return None

    # ---- delete ----
    def delete(self, meta: ActorResourceMeta) -> None:
        """Aborts a running execution or drops a queued one. Repeated or late deletes succeed quietly."""
        entry = self._entries.get(meta.execution_id)
        record = store.ExecutionRecord(meta.output_prefix)
        if entry is not None:
            self._wait_ready(entry)
        if entry is None or entry.final is None:
            try:
                if not record.has_outputs() and not record.has_error():
                    record.mark(store.ABORTED, str(time.time()))
            except OSError:
                pass
        if entry is None:
            return
        if entry.map_run is not None:
            entry.map_run.abort()
            entry.map_run.finished.wait(10.0)
        elif entry.execution is not None and not entry.execution.state.terminal:
            pool = self._pool(entry)
            pool.cancel(entry.execution.id, grace_seconds=3.0)
            if entry.execution.state not in (ExecutionState.SUCCEEDED, ExecutionState.FAILED):
                # cancelled, or its replica had to be restarted to stop it: either way, what propeller asked for
                entry.final, entry.final_at = Status(TaskExecution.ABORTED, "aborted by DeleteTask"), time.monotonic()
            _forget_when_done(pool, entry.execution)  # the entry keeps it; the pool (maybe never idle) must not

    # ---- housekeeping ----
    def _gc(self) -> None:
        now = time.monotonic()
        if now - self._last_gc < 5.0:
            return
        self._last_gc = now
        with self._lock:
            old = [k for k, e in self._entries.items() if e.final is not None and now - e.final_at > KEEP_TERMINAL_S]
            for k in old:
                del self._entries[k]

    def knows(self, execution_id: str) -> bool:
        """True when this process serves the execution from memory (GetTask needs no storage read)."""
        entry = self._entries.get(execution_id)
        return entry is not None and entry.ready

    def entries(self) -> int:
        return len(self._entries)

    def shutdown(self) -> None:
        self.manager.shutdown()


_SERVICE: Optional[ActorService] = None
_SERVICE_LOCK = threading.Lock()


def service() -> ActorService:
    """The process-wide service, created on first use (not at import, so importing the plugin starts nothing)."""
    global _SERVICE
    with _SERVICE_LOCK:
        if _SERVICE is None:
            _SERVICE = ActorService()
        return _SERVICE

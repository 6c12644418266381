"""The actor connector's logic, independent of gRPC: create, get and delete actor and actor_map executions.

In memory it keeps one record per execution it is serving; storage (see store.py) keeps what a restarted
connector needs. GetTask for an execution this process does not know is answered from storage:
outputs.pb -> SUCCEEDED, error.pb -> FAILED or RETRYABLE_FAILED, dispatched but no result -> re-attached when a
replica adopted from the previous connector holds it (Kubernetes: RUNNING, then its result), else RETRYABLE_FAILED
(never run twice), never dispatched -> queued again; maps resume from their items' results.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

from flyteidl.core import literals_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flytekit.loggers import logger
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate

from flytekitplugins_actor.constants import CANCEL_GRACE_S
from flytekitplugins_actor.map_model import MapPlan
from flytekitplugins_actor.pool import Execution, ExecutionState, ReplicaPool
from flytekitplugins_actor.replica.error import read_error_document
from flytekitplugins_actor.replica.execution import ExecutionSpec
from plugin_backend import metrics, store
from plugin_backend.errors import InvalidActorRequest
from plugin_backend.identity import identity_of
from plugin_backend.map_run import MapRun, item_of, plan_of
from plugin_backend.meta import MAX_META_BYTES, ActorResourceMeta
from plugin_backend.pools import PoolKey, PoolManager
from plugin_backend.runs import MapRunView, Run, SingleRun, StoredRun
from plugin_backend.status import TERMINAL_PHASES, Status, SyncOverrun, failure
from plugin_backend.template import ACTOR_MAP_TASK_TYPE, ACTOR_SYNC_TASK_TYPE, ActorTemplate, parse_template

__all__ = ["ActorService", "Status", "TERMINAL_PHASES", "service"]

KEEP_TERMINAL_S = 600.0
"""How long a finished execution is answered from memory; after that, from storage."""
GC_INTERVAL_S = 5.0
ABANDON_CHECK_S = 0.1
"""How often a sync wait checks whether its caller gave up."""
MAX_INLINE_OUTPUTS_BYTES = 1024 * 1024
"""Sync answers carry outputs up to this size inline; larger ones go by reference (outputs.pb)."""


@dataclass
class _Entry:
    """An execution this process serves: its meta, pool key, template and run (set once create queued it). An
    execution answered from storage alone gets a transient entry (no key, no template, a StoredRun)."""

    meta: ActorResourceMeta
    key: Optional[PoolKey]
    template: Optional[ActorTemplate]
    run: Optional[Run] = None
    ready: bool = False  # set once create (or adoption) has queued it; waiters use ActorService._ready
    final: Optional[Status] = None
    final_at: float = 0.0
    released: bool = False  # its pool no longer keeps it


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
        if not isinstance(output_prefix, str) or not output_prefix.strip():
            raise InvalidActorRequest(
                f"output_prefix={output_prefix!r} is invalid: the attempt's output prefix (where its request record, "
                "outputs.pb and error.pb live) must be a non-empty path or URI"
            )
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
        plan = plan_of(inputs, template.map) if template.map is not None else None  # refuse bad inputs now
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
                logger.error(
                    "CreateTask %s refused: %s already holds execution %s",
                    meta.execution_id,
                    output_prefix,
                    previous.get("execution_id"),
                )
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

    def _find_pool(self, entry: _Entry) -> Optional[ReplicaPool]:
        """The entry's live pool, or None: lookups for status and cancels never create a pool."""
        return self.manager.find(entry.key) if entry.key is not None else None

    def _start(
        self, entry: _Entry, env: Dict[str, str], plan: Optional[MapPlan], record: store.ExecutionRecord
    ) -> None:
        """Queues the execution (or starts the map's coordinator) and sets the entry's run."""
        if plan is not None:
            run = MapRun(
                entry.meta.execution_id,
                entry.template,
                plan,
                record,
                env,
                lambda: self.manager.pool_for(entry.key, entry.template),  # the coordinator submits: it may create
            )
            entry.run = MapRunView(run.start(), entry.template.env_name, lambda: self._find_pool(entry))
            return
        spec = ExecutionSpec(entry.meta.execution_id, entry.template.args, env)

        def mark_started(execution: Execution) -> None:
            record.mark(store.STARTED, f"{execution.replica or ''}\n{time.time()}")

        execution = self.manager.submit_for(
            entry.key, entry.template, spec, before_dispatch=mark_started, on_done=metrics.observe_done
        )
        entry.run = SingleRun(execution, entry.template.env_name, lambda: self._find_pool(entry))

    # ---- sync path ----
    def execute_sync(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap],
        task_execution_metadata: Optional[TaskExecutionMetadata],
        budget_s: float,
        abandoned: Optional[threading.Event] = None,
    ) -> Status:
        """Runs an `actor_sync` execution and answers with a terminal status (outputs inline): propeller keeps no
        resource meta for a sync task, so it cannot poll a non-terminal answer later. Same pools, queue, replicas
        and idempotency record as `actor`. Past `budget_s` the execution is cancelled and the answer is
        RETRYABLE_FAILED saying why and what to change; so it is as soon as `abandoned` is set (the caller gave up:
        propeller's deadline was shorter than the budget), so that nobody's work keeps a replica busy."""
        deadline = time.monotonic() + budget_s
        meta = self.create(task_template, output_prefix, inputs, task_execution_metadata, ACTOR_SYNC_TASK_TYPE)
        while True:
            status = self.get(meta)
            if status.phase in TERMINAL_PHASES:
                return self._sync_answer(meta, status)
            entry = self._lookup(meta.execution_id)
            remaining = deadline - time.monotonic()
            if entry is None or entry.run is None or remaining <= 0:
                return self._sync_timeout(meta, entry, budget_s)
            if abandoned is not None and abandoned.is_set():
                return self._sync_timeout(meta, entry, budget_s, SyncOverrun.ABANDONED)
            entry.run.wait(remaining if abandoned is None else min(remaining, ABANDON_CHECK_S))

    @staticmethod
    def _sync_answer(meta: ActorResourceMeta, status: Status) -> Status:
        """A terminal sync answer: outputs inline up to MAX_INLINE_OUTPUTS_BYTES; larger ones by reference (propeller
        then reads outputs.pb, as for async tasks), so an answer never nears gRPC's 4 MiB limit."""
        if status.phase == TaskExecution.SUCCEEDED and status.outputs is None:
            data = store.read_bytes(store.join(meta.output_prefix, "outputs.pb"))
            if data is not None and len(data) <= MAX_INLINE_OUTPUTS_BYTES:
                status = replace(status, outputs=literals_pb2.LiteralMap.FromString(data))
        elif status.phase == TaskExecution.ABORTED:  # only our own budget cancels a sync execution
            status = replace(status, phase=TaskExecution.RETRYABLE_FAILED)
        return status

    def _sync_timeout(
        self,
        meta: ActorResourceMeta,
        entry: Optional[_Entry],
        budget_s: float,
        cause: Optional[SyncOverrun] = None,
    ) -> Status:
        """Cancels an execution that outlived the sync budget (or its caller); the answer says why and what to
        change."""
        env = meta.env
        change = (
            f"raise FLYTE_ACTOR_SYNC_BUDGET_S on the connector (now {budget_s:g}s; keep propeller's "
            "connector timeouts.ExecuteTaskSync above it), or take this task off the sync path (@env.task without "
            "sync=True)"
        )
        run = entry.run if entry is not None else None
        execution = run.execution if isinstance(run, SingleRun) else None  # the sync path runs single executions
        pool = self._find_pool(entry) if entry is not None else None
        stats = pool.stats() if pool is not None else {"starting": 0, "busy": 0, "idle": 0, "queued": 0}
        if cause is SyncOverrun.ABANDONED:
            overrun = SyncOverrun.ABANDONED
            reason = (
                f"propeller stopped waiting for this sync execution before the connector's sync budget of "
                f"{budget_s:g}s ran out, so it was cancelled: set propeller's connector timeouts.ExecuteTaskSync "
                f"above FLYTE_ACTOR_SYNC_BUDGET_S plus a few seconds"
            )
        elif execution is not None and execution.state is ExecutionState.RUNNING and execution.warm is False:
            overrun = SyncOverrun.POOL_STARTING
            reason = (
                f"pool still starting: the execution was the first on new replica {execution.replica} (which imports "
                f"the task's code) and did not finish within the sync budget of {budget_s:g}s; the replica stays "
                f"warm, so a retry is fast. Warm the environment before sync tasks need it (an async task of it, "
                f"or a longer ttl_seconds), or {change}"
            )
        elif execution is not None and execution.state is ExecutionState.RUNNING:
            overrun = SyncOverrun.TOO_LONG
            reason = (
                f"task too long for the sync path: it ran on replica {execution.replica} longer than the sync "
                f"budget of {budget_s:g}s and was cancelled. Tasks that long belong on the async path: {change}"
            )
        elif stats["starting"] and not stats["busy"] and not stats["idle"]:
            overrun = SyncOverrun.POOL_STARTING
            reason = (
                f"pool still starting: no replica of actor environment {env} was ready within the sync budget "
                f"of {budget_s:g}s ({stats['starting']} starting; they keep starting, so a retry finds them "
                f"warm). Warm the environment before sync tasks need it (an async task of it, or a longer "
                f"ttl_seconds), or {change}"
            )
        else:
            overrun = SyncOverrun.NO_FREE_REPLICA
            reason = (
                f"no replica of actor environment {env} was free within the sync budget of {budget_s:g}s "
                f"({stats['busy']} busy, {stats['queued']} queued): raise its replica_count, or {change}"
            )
        self.delete(meta)
        after = self.get(meta)
        if after.phase != TaskExecution.ABORTED:  # it finished just as the budget ran out: that result stands
            return self._sync_answer(meta, after)
        metrics.SYNC_OVERRUNS.labels(env=env, reason=overrun.value).inc()
        logger.info("actor_sync execution %s cancelled at the end of its budget: %s", meta.execution_id, overrun.value)
        status = Status(TaskExecution.RETRYABLE_FAILED, reason, after.log_links)
        if entry is not None:  # a repeated ExecuteTaskSync of this attempt gets the same answer
            entry.final, entry.final_at = status, time.monotonic()
        return status

    # ---- get ----
    def get(self, meta: ActorResourceMeta) -> Status:
        self._gc()
        entry = self._entry(meta)
        self._wait_ready(entry)
        if entry.final is not None:
            return entry.final
        status = entry.run.status()
        if status.terminal:
            entry.final, entry.final_at = status, time.monotonic()
            self._release(entry)
        return status

    def _lookup(self, execution_id: str) -> Optional[_Entry]:
        with self._lock:
            return self._entries.get(execution_id)

    def _entry(self, meta: ActorResourceMeta) -> _Entry:
        """The in-memory entry of an execution, adopting it from storage when this process does not know it (a
        transient entry with a StoredRun when storage alone answers). An entry gone again right after adoption (its
        start failed in another thread, or it was collected) is adopted again."""
        for _ in range(3):
            entry = self._lookup(meta.execution_id)
            if entry is not None:
                return entry
            answer = self._adopt(meta)
            if answer is not None:
                return _Entry(meta, None, None, run=StoredRun(answer), ready=True)
            entry = self._lookup(meta.execution_id)
            if entry is not None:
                return entry
        raise RuntimeError(f"execution {meta.execution_id} could not be adopted from {meta.output_prefix}")

    # ---- restart path ----
    def _adopt(self, meta: ActorResourceMeta) -> Optional[Status]:
        """Answers for an execution this process did not create, from storage; re-enqueues, resumes or re-attaches
        (collects it from the adopted replica that holds it) if it must."""
        record = store.ExecutionRecord(meta.output_prefix)
        stored = self._stored_result(record, meta)
        if stored is not None:
            return stored
        request = record.request_of(meta.execution_id)
        if request is None:
            return Status(
                TaskExecution.RETRYABLE_FAILED,
                f"no record of execution {meta.execution_id} under {meta.output_prefix}; "
                "the connector lost it before queueing it",
            )
        if meta.kind != ACTOR_MAP_TASK_TYPE:
            started = record.marker(store.STARTED)
            if started is not None:
                if self._reattach(meta, request) is not None:
                    return None
                stored = self._stored_result(record, meta)  # its replica may have ended it and gone since the look
                if stored is not None:
                    return stored
                replica = started.split("\n", 1)[0] or "?"
                return Status(
                    TaskExecution.RETRYABLE_FAILED,
                    f"execution {meta.execution_id} was dispatched to replica {replica} but left no result, and no "
                    "replica adopted after the connector restarted holds it (the replica died with the connector, or "
                    "was lost): it is not run twice",
                )
        logger.info(
            "adopting execution %s from its record under %s (created before this connector started)",
            meta.execution_id,
            meta.output_prefix,
        )
        template, key = self._pool_key_of(request)
        plan = None
        if template.map is not None:
            data = store.read_bytes(template.command.inputs)
            plan = plan_of(literals_pb2.LiteralMap.FromString(data or b""), template.map)
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

    @staticmethod
    def _stored_result(record: store.ExecutionRecord, meta: ActorResourceMeta) -> Optional[Status]:
        """The execution's end as storage holds it (error.pb, outputs.pb, the abort marker), or None."""
        if record.has_error():
            return failure(read_error_document(meta.output_prefix), "recorded in error.pb", [])
        if record.has_outputs():
            return Status(TaskExecution.SUCCEEDED, "succeeded (answered from storage)")
        if record.marker(store.ABORTED) is not None:
            return Status(TaskExecution.ABORTED, "aborted")
        return None

    @staticmethod
    def _pool_key_of(request: Dict[str, Any]) -> Tuple[ActorTemplate, PoolKey]:
        """The template and pool key of a stored request record."""
        template = ActorTemplate.from_record(request["template"])
        return template, PoolKey(
            request["namespace"], request["service_account"], template.env_key, template.code_version
        )

    def _reattach(self, meta: ActorResourceMeta, request: Dict[str, Any]) -> Optional[_Entry]:
        """The entry of a dispatched execution that an adopted replica holds, or None. Its pool is found or created
        now (creating it adopts the replicas a previous connector left for it, re-attaching what they run), so a
        GetTask or DeleteTask after a restart needs no CreateTask of that environment first."""
        template, key = self._pool_key_of(request)
        execution = self.manager.pool_for(key, template).get(meta.execution_id)
        if execution is None:
            return None
        with self._lock:
            entry = self._entries.get(meta.execution_id)
            if entry is not None:
                return entry
            entry = self._entries[meta.execution_id] = _Entry(meta, key, template, ready=True)
            entry.run = SingleRun(execution, template.env_name, lambda: self._find_pool(entry))
        logger.info(
            "re-attached execution %s: replica %s, adopted from a previous connector, holds it",
            meta.execution_id,
            execution.replica,
        )
        return entry

    def _abort_after_restart(self, meta: ActorResourceMeta, record: store.ExecutionRecord) -> Optional[_Entry]:
        """For a DeleteTask of an execution this process does not know, what replicas adopted from a previous
        connector still run of it: a map's items are cancelled here (None); a dispatched single execution with no
        result that an adopted replica holds is returned, for the abort to reach it. Never queues anything."""
        request = record.request_of(meta.execution_id)
        if request is None:
            return None
        if meta.kind == ACTOR_MAP_TASK_TYPE:  # creating the map's pool adopts its replicas, re-attaching its items
            template, key = self._pool_key_of(request)
            pool = self.manager.pool_for(key, template)
            for execution in pool.executions(lambda execution_id: item_of(meta.execution_id, execution_id) is not None):
                logger.info("DeleteTask: aborting map item %s, re-attached after a connector restart", execution.id)
                pool.cancel(execution.id, grace_seconds=CANCEL_GRACE_S)
                pool.forget(execution.id)
            return None
        if record.marker(store.STARTED) is None or record.has_outputs() or record.has_error():
            return None
        return self._reattach(meta, request)

    # ---- delete ----
    def delete(self, meta: ActorResourceMeta) -> None:
        """Aborts a running execution or drops a queued one. Repeated or late deletes succeed quietly."""
        entry = self._lookup(meta.execution_id)
        record = store.ExecutionRecord(meta.output_prefix)
        if entry is not None:
            self._wait_ready(entry)
        if entry is None or entry.final is None:
            self._mark_aborted(meta, record)
        if entry is None:  # a restart: adopted replicas may still run it (or a map's items)
            entry = self._abort_after_restart(meta, record)
        if entry is None or entry.run is None:
            return
        was_terminal = entry.run.terminal
        if not was_terminal:
            logger.info("DeleteTask: aborting execution %s", meta.execution_id)
        entry.run.abort()
        if not was_terminal and entry.run.status().phase not in (TaskExecution.SUCCEEDED, TaskExecution.FAILED):
            # cancelled, or its replica had to be restarted to stop it: either way, what propeller asked for
            entry.final, entry.final_at = Status(TaskExecution.ABORTED, "aborted by DeleteTask"), time.monotonic()
        self._release(entry)

    def _release(self, entry: _Entry) -> None:
        """Drops a terminal run from its pool's table (once); a run still stopping is released by _gc later."""
        if not entry.released and entry.run is not None and entry.run.terminal:
            entry.released = True
            entry.run.release()

    @staticmethod
    def _mark_aborted(meta: ActorResourceMeta, record: store.ExecutionRecord) -> None:
        """Records the abort for a restarted connector, only under a prefix holding this execution's request and
        no result: DeleteTask never creates directories or writes where its request points at random."""
        try:
            if record.request_of(meta.execution_id) is None:
                return
            if not record.has_outputs() and not record.has_error():
                record.mark(store.ABORTED, str(time.time()), make_dirs=False)
        except OSError:  # storage trouble: the in-memory abort still happens; a restart would re-queue it
            logger.exception("DeleteTask %s: could not record the abort under %s", meta.execution_id, record.prefix)

    # ---- housekeeping ----
    def _gc(self) -> None:
        """Every GC_INTERVAL_S (on GetTask): releases answered runs that have since stopped (a cancelled execution
        ends after DeleteTask answered) and forgets entries answered more than KEEP_TERMINAL_S ago."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_gc < GC_INTERVAL_S:
                return
            self._last_gc = now
            unreleased = [e for e in self._entries.values() if e.final is not None and not e.released]
            old = [k for k, e in self._entries.items() if e.final is not None and now - e.final_at > KEEP_TERMINAL_S]
            for k in old:
                del self._entries[k]
        for entry in unreleased:
            self._release(entry)

    def knows(self, execution_id: str) -> bool:
        """True when this process serves the execution from memory (GetTask needs no storage read)."""
        entry = self._lookup(execution_id)
        return entry is not None and entry.ready

    def entries(self) -> int:
        """How many executions this process answers from memory."""
        with self._lock:
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
            # the connector's first request: what is loaded now (flytekit, grpc, this package) lives as long as the
            # process, so the collector need not walk it on every later collection (garbage is collected first:
            # frozen objects are never collected)
            gc.collect()
            gc.freeze()
        return _SERVICE

"""The `actor_sync` connector: propeller's synchronous path (ExecuteTaskSync) for actor tasks on warm pools.

Propeller 1.16 calls ExecuteTaskSync inside its Create (a stream: a header with the template, output prefix and
task execution metadata, then the inputs; one answer) and, when the answer is terminal, finishes the node in the
same round: no GetTask polling, no wait for the next workflow evaluation. The connector runs the execution on the
same pools, queue, replicas and idempotency record as `actor` and waits for it up to a budget
(FLYTE_ACTOR_SYNC_BUDGET_S); see ActorService.execute_sync for what happens past it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import typing
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from flytekit.extend.backend.base_connector import ConnectorRegistry, Resource, SyncConnectorBase
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate

from plugin_backend.errors import SUPPORTED_TYPE_VERSION
from plugin_backend.service import service
from plugin_backend.status import Status
from plugin_backend.template import ACTOR_SYNC_TASK_TYPE

SYNC_BUDGET_ENV = "FLYTE_ACTOR_SYNC_BUDGET_S"
DEFAULT_SYNC_BUDGET_S = 10.0
"""How long an ExecuteTaskSync waits for its execution before cancelling it (propeller's timeouts.ExecuteTaskSync
must be longer: budget + a few seconds for the cancel)."""
SYNC_CONCURRENCY_ENV = "FLYTE_ACTOR_SYNC_CONCURRENCY"
DEFAULT_SYNC_CONCURRENCY = 64
"""Sync executions waited on at once (one thread each); more wait for a thread, inside their budget."""


def sync_budget_s() -> float:
    """The sync budget from FLYTE_ACTOR_SYNC_BUDGET_S (read per call, so a fix needs no restart), refused clearly
    when it is not a positive number."""
    raw = os.environ.get(SYNC_BUDGET_ENV, "")
    if not raw:
        return DEFAULT_SYNC_BUDGET_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:  # the connector's configuration, not the request: INTERNAL, never INVALID_ARGUMENT
        raise ValueError(f"{SYNC_BUDGET_ENV}={raw!r} on the connector is invalid: set a number of seconds > 0")
    return value


def status_resource(status: Status) -> Resource:
    """A service Status as the flytekit Resource the connector answers."""
    outputs = LiteralMap.from_flyte_idl(status.outputs) if status.outputs is not None else None
    return Resource(
        phase=status.phase,
        message=status.message,
        log_links=status.log_links or None,
        outputs=outputs,
        custom_info=status.custom_info,
    )


@functools.lru_cache(maxsize=1)
def _waiters() -> ThreadPoolExecutor:
    """The threads sync executions are waited on in (not the event loop's default executor: the async calls'
    storage reads run there and must not queue behind long waits)."""
    n = int(os.environ.get(SYNC_CONCURRENCY_ENV, DEFAULT_SYNC_CONCURRENCY))
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="actor-sync")


class ActorSyncConnector(SyncConnectorBase):
    """Runs `actor_sync` executions on the warm replicas of their environment and answers when they are done."""

    name = "Actor Sync Connector"

    def __init__(self) -> None:
        super().__init__(task_type_name=ACTOR_SYNC_TASK_TYPE, task_type_version=SUPPORTED_TYPE_VERSION)

    async def do(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap] = None,
        task_execution_metadata: Optional[TaskExecutionMetadata] = None,
        **kwargs,
    ) -> Resource:
        abandoned = threading.Event()
        call = functools.partial(
            service().execute_sync,
            task_template,
            output_prefix,
            inputs,
            task_execution_metadata,
            sync_budget_s(),
            abandoned,
        )
        try:
            status = await asyncio.get_running_loop().run_in_executor(_waiters(), call)
        except asyncio.CancelledError:  # propeller's deadline passed or it hung up: cancel the execution now
            abandoned.set()
            raise
        return status_resource(status)


def install_sync_metadata() -> None:
    """Makes flytekit's ExecuteTaskSync hand the header's TaskExecutionMetadata to the actor sync connector.

    flytekit 1.16's SyncConnectorService passes only the template, output prefix and inputs to `do`, although
    propeller sends the task execution id, namespace and service account in the header: without them a sync
    execution could neither share the async path's pool (namespace, service account) nor its idempotency record
    (execution id). Other sync connectors are served as flytekit serves them.
    """
    try:
        from flyteidl.admin.agent_pb2 import ExecuteTaskSyncResponse, ExecuteTaskSyncResponseHeader
        from flytekit.extend.backend import connector_service
    except ImportError:  # the connector extra is not installed: nothing serves gRPC here
        return
    servicer = connector_service.SyncConnectorService
    original = servicer.ExecuteTaskSync
    if getattr(original, "_actor_sync_metadata", False):
        return

    async def ExecuteTaskSync(self, request_iterator: typing.AsyncIterator, context) -> typing.AsyncIterator:
        first = await request_iterator.__anext__()
        template = TaskTemplate.from_flyte_idl(first.header.template)
        if template.type != ACTOR_SYNC_TASK_TYPE:

            async def replay():
                yield first
                async for request in request_iterator:
                    yield request

            async for response in original(self, replay(), context):
                yield response
            return
        operation = connector_service.do_operation
        try:
            with connector_service.request_latency.labels(task_type=template.type, operation=operation).time():
                connector = ConnectorRegistry.get_connector(template.type, template.task_type_version)
                second = await request_iterator.__anext__()
                inputs = LiteralMap.from_flyte_idl(second.inputs) if second.HasField("inputs") else None
                header = first.header
                metadata = (
                    TaskExecutionMetadata.from_flyte_idl(header.task_execution_metadata)
                    if header.HasField("task_execution_metadata")
                    else None
                )
                resource = await connector.do(
                    task_template=template,
                    output_prefix=header.output_prefix,
                    inputs=inputs,
                    task_execution_metadata=metadata,
                )
                answer = ExecuteTaskSyncResponseHeader(resource=await resource.to_flyte_idl())
                yield ExecuteTaskSyncResponse(header=answer)
            connector_service.request_success_count.labels(task_type=template.type, operation=operation).inc()
        except Exception as e:
            connector_service._handle_exception(e, context, template.type, operation)

    ExecuteTaskSync._actor_sync_metadata = True  # type: ignore[attr-defined]
    servicer.ExecuteTaskSync = ExecuteTaskSync


install_sync_metadata()
ConnectorRegistry.register(ActorSyncConnector(), override=True)

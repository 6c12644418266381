"""The actor connectors: task type "actor" (one execution on a warm replica) and "actor_map" (fan-out over the pool);
"actor_sync" (propeller's synchronous path) is in sync_connector.py.

Registered with flytekit's ConnectorRegistry at import; `pyflyte serve connector` imports this package through
the `flytekit.plugins` entry point. Calls stay on the event loop when they only touch memory and local files;
anything that may wait (remote storage, cancelling a running execution) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from flytekit.extend.backend.base_connector import AsyncConnectorBase, ConnectorRegistry, Resource
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate

from plugin_backend import store
from plugin_backend.meta import ActorResourceMeta
from plugin_backend.service import service
from plugin_backend.sync_connector import status_resource
from plugin_backend.template import ACTOR_MAP_TASK_TYPE, ACTOR_TASK_TYPE, SUPPORTED_TYPE_VERSION


class ActorConnector(AsyncConnectorBase):
    """Runs `actor` task executions on warm replicas of their environment's pool."""

    name = "Actor Connector"
    task_type = ACTOR_TASK_TYPE

    def __init__(self) -> None:
        super().__init__(
            task_type_name=self.task_type, task_type_version=SUPPORTED_TYPE_VERSION, metadata_type=ActorResourceMeta
        )

    async def create(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap] = None,
        task_execution_metadata: Optional[TaskExecutionMetadata] = None,
        **kwargs,
    ) -> ActorResourceMeta:
        call = lambda: service().create(task_template, output_prefix, inputs, task_execution_metadata, self.task_type)  # noqa: E731
        if store.is_local(output_prefix):
            return call()
        return await asyncio.to_thread(call)

    async def get(self, resource_meta: ActorResourceMeta, **kwargs) -> Resource:
        svc = service()
        if store.is_local(resource_meta.output_prefix) and svc.knows(resource_meta.execution_id):
            return status_resource(svc.get(resource_meta))
        return status_resource(await asyncio.to_thread(svc.get, resource_meta))

    async def delete(self, resource_meta: ActorResourceMeta, **kwargs) -> None:
        await asyncio.to_thread(service().delete, resource_meta)


class ActorMapConnector(ActorConnector):
    """Runs `actor_map` tasks: splits the mapped lists and dispatches items across the pool's replicas."""

    name = "Actor Map Connector"
    task_type = ACTOR_MAP_TASK_TYPE


ConnectorRegistry.register(ActorConnector(), override=True)
ConnectorRegistry.register(ActorMapConnector(), override=True)

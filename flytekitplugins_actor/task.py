"""`ActorTask`: a Python function task of type "actor" that runs on a warm replica of its environment."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from flytekit.configuration import SerializationSettings
from flytekit.core.context_manager import FlyteContext, FlyteContextManager
from flytekit.core.python_function_task import PythonFunctionTask
from flytekit.extend import TaskPlugins
from flytekit.models.literals import LiteralMap

from flytekitplugins_actor.constants import ACTOR_SYNC_TASK_TYPE, ACTOR_TASK_TYPE
from flytekitplugins_actor.environment import ActorEnvironment
from flytekitplugins_actor.errors import make_portable
from flytekitplugins_actor.replica.execution import RUNTIME

IN_PROCESS_ENV = "FLYTE_ACTOR_IN_PROCESS"
"""Set to 1 to run actor tasks inside the driver during local runs (for breakpoints); replicas are skipped."""


def execution_env(
    env: ActorEnvironment, settings: Optional[SerializationSettings], extra_spec: Optional[dict] = None
) -> Dict[str, Any]:
    """The JSON form of flyteidl's core.ExecutionEnv for an environment, as Union's SDK emits it."""
    image_config = settings.image_config if settings is not None else None
    spec = {
        "container_image": env.resolved_image(image_config),
        "replica_count": env.replica_count,
        "ttl_seconds": env.resolved_ttl_seconds,
        "parallelism": 1,
        "backlog_length": None,
    }
    spec = {k: v for k, v in spec.items() if v is not None}
    spec.update(extra_spec or {})
    return {"name": env.name, "version": env.key(image_config), "type": "actor", "spec": spec}


class ActorTask(PythonFunctionTask[ActorEnvironment]):
    """Runs its function on a replica of `task_config` (an ActorEnvironment) instead of a fresh pod."""

    _TASK_TYPE = ACTOR_TASK_TYPE

    def __init__(self, task_config: ActorEnvironment, task_function, **kwargs):
        super().__init__(
            task_config=task_config,
            task_function=task_function,
            task_type=self._TASK_TYPE,
            task_type_version=0,
            **kwargs,
        )

    @property
    def sync(self) -> bool:
        """True when the task takes propeller's synchronous connector path (task type "actor_sync")."""
        return self.task_type == ACTOR_SYNC_TASK_TYPE

    def on_sync_path(self) -> "ActorTask":
        """Serializes this task as "actor_sync" (same custom): propeller then runs it with one ExecuteTaskSync call
        and finishes the node in the same round, instead of polling GetTask. Local runs are unchanged."""
        self._task_type = ACTOR_SYNC_TASK_TYPE
        return self

    def get_custom(self, settings: SerializationSettings) -> Dict[str, Any]:
        return execution_env(self.task_config, settings)

    def sandbox_execute(self, ctx: FlyteContext, input_literal_map: LiteralMap) -> LiteralMap:
        """A local run: flytekit would make (and remove) a task sandbox dir per call in the driver, where nothing of
        the task runs; the replica gives the execution its own."""
        if _runs_here(ctx):
            return super().sandbox_execute(ctx, input_literal_map)
        return self.dispatch_execute(ctx, input_literal_map)

    def dispatch_execute(self, ctx: FlyteContext, input_literal_map: LiteralMap) -> LiteralMap:
        if _runs_here(ctx):
            return super().dispatch_execute(ctx, input_literal_map)
        from flytekitplugins_actor.local import run_literals_on_replica

        return run_literals_on_replica(self, input_literal_map)  # literals straight to inputs.pb and back

    def execute(self, **kwargs) -> Any:
        if _runs_here(FlyteContextManager.current_context()):
            try:  # on a replica (or a pod): run the function here
                return super().execute(**kwargs)
            except BaseException as e:
                make_portable(e)  # the driver of a local run re-raises it as it was raised
                RUNTIME.last_exception = e
                raise
        from flytekitplugins_actor.local import run_on_replica

        return run_on_replica(self, kwargs)  # called with native values, e.g. by flytekit.map_task locally


def _runs_here(ctx: FlyteContext) -> bool:
    """True on a replica or pod (TASK_EXECUTION) and in the opt-in in-process mode; False in a local driver."""
    state = ctx.execution_state
    return state is None or not state.is_local_execution() or os.environ.get(IN_PROCESS_ENV) == "1"


TaskPlugins.register_pythontask_plugin(ActorEnvironment, ActorTask)

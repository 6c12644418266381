"""`map` over an actor task: ONE task that fans its items out across the environment's replicas.

Open-source propeller cannot run connector tasks inside an ArrayNode, so the map is a single task of type
"actor_map": run locally by the driver over local replicas, remotely by the connector over the pool.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Dict, Optional, Union

from flytekit.configuration import SerializationSettings
from flytekit.core.base_task import PythonTask
from flytekit.core.context_manager import FlyteContext
from flytekit.core.interface import transform_interface_to_list_interface
from flytekit.models.literals import LiteralMap

from flytekitplugins_actor.constants import ACTOR_MAP_TASK_TYPE
from flytekitplugins_actor.map_model import MapInputError, MapPlan, MapSpec, MapSpecError
from flytekitplugins_actor.task import IN_PROCESS_ENV, ActorTask, execution_env


class MapFailed(RuntimeError):
    """Too few items of an actor map succeeded to meet its min_success_ratio; raised from the lowest failed item's
    exception. `recoverable` says whether every failed item failed recoverably (a retry may help)."""

    def __init__(self, message: str, recoverable: bool = False):
        super().__init__(message)
        self.recoverable = recoverable


class ActorMapTask(PythonTask):
    """Maps an actor task over lists; bound (partial) inputs are passed whole to every item."""

    def __init__(
        self,
        subtask: Union[ActorTask, functools.partial],
        concurrency: Optional[int] = None,
        min_success_ratio: float = 1.0,
        **kwargs,
    ):
        partial = subtask if isinstance(subtask, functools.partial) else None
        task = partial.func if partial else subtask
        if partial is not None and partial.args:
            raise TypeError("flytekitplugins_actor.map: bind partial inputs by keyword, e.g. partial(task, x=1)")
        if not isinstance(task, ActorTask):
            raise TypeError(
                f"flytekitplugins_actor.map maps an actor task (declared with @ActorEnvironment.task), got {task!r}; "
                "for other tasks use flytekit.map_task"
            )
        self._subtask: ActorTask = task
        self._bound_values: Dict[str, Any] = dict(partial.keywords) if partial else {}
        unknown = set(self._bound_values) - set(task.python_interface.inputs)
        if unknown:
            raise TypeError(f"map({task.name}): partial binds {sorted(unknown)}, which are not inputs of the task")
        bound = sorted(self._bound_values)
        mapped = [k for k in task.python_interface.inputs if k not in self._bound_values]
        if not mapped:
            raise TypeError(f"map({task.name}): every input is bound by the partial; nothing is left to map over")
        try:
            self.spec = MapSpec(tuple(mapped), tuple(bound), task.name, concurrency, min_success_ratio)
        except MapSpecError as e:
            raise MapSpecError(f"map({task.name}): {e}") from None
        interface = transform_interface_to_list_interface(
            task.python_interface, set(bound), set(), self.spec.min_success_ratio < 1
        )
        h = hashlib.md5(f"{','.join(bound)}:{concurrency}:{self.spec.min_success_ratio}".encode()).hexdigest()[:10]
        kwargs.setdefault("metadata", task.metadata)
        kwargs.setdefault("security_ctx", task.security_context)
        super().__init__(
            task_type=ACTOR_MAP_TASK_TYPE,
            name=f"{task.name}.actor_map_{h}",
            interface=interface,
            task_config=None,
            **kwargs,
        )

    @property
    def concurrency(self) -> Optional[int]:
        return self.spec.concurrency

    @property
    def min_success_ratio(self) -> float:
        return self.spec.min_success_ratio

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **{**self._bound_values, **kwargs})

    # ---- serialization: the subtask's container, one task ----
    def get_container(self, settings: SerializationSettings):
        return self._subtask.get_container(settings)

    def get_k8s_pod(self, settings: SerializationSettings):
        return self._subtask.get_k8s_pod(settings)

    def get_config(self, settings: SerializationSettings):
        return self._subtask.get_config(settings)

    def get_custom(self, settings: SerializationSettings) -> Dict[str, Any]:
        spec = {
            "map": {
                "concurrency": self.spec.concurrency,
                "min_success_ratio": self.spec.min_success_ratio,
                "mapped_inputs": list(self.spec.mapped_inputs),
                "bound_inputs": list(self.spec.bound_inputs),
                "subtask": self.spec.subtask,
            }
        }
        return execution_env(self._subtask.task_config, settings, spec)

    # ---- local execution: fan out over local replicas ----
    def dispatch_execute(self, ctx: FlyteContext, input_literal_map: LiteralMap) -> LiteralMap:
        """Splits the inputs (the same MapPlan the connector uses) and runs the items under the same map model:
        on the environment's local replicas in parallel, or one after another in the driver when
        FLYTE_ACTOR_IN_PROCESS=1; outputs are gathered in input order."""
        from flytekitplugins_actor.map_local import LocalMapRun

        try:
            plan = MapPlan(input_literal_map, self.spec)
        except MapInputError as e:
            raise ValueError(f"map({self._subtask.name}): {e}") from None
        return LocalMapRun(self._subtask, plan, ctx).run(in_process=os.environ.get(IN_PROCESS_ENV) == "1")

    def execute(self, **kwargs) -> Any:
        raise NotImplementedError(
            "an actor map runs through dispatch_execute: call it in a workflow or as a task (local runs), "
            "or let the connector run it (remote)"
        )


def map(
    task_or_partial: Union[ActorTask, functools.partial],
    concurrency: Optional[int] = None,
    min_success_ratio: float = 1.0,
) -> ActorMapTask:
    """Maps an actor task (or a partial of one) over lists, fanned out across the environment's replicas in parallel."""
    return ActorMapTask(task_or_partial, concurrency=concurrency, min_success_ratio=min_success_ratio)

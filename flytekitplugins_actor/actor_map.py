"""`map` over an actor task: ONE task that fans its items out across the environment's replicas.

Open-source propeller cannot run connector tasks inside an ArrayNode, so the map is a single task of type
"actor_map": run locally by the driver over local replicas, remotely by the connector over the pool.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import hashlib
from typing import Any, Dict, List, Optional, Union

from flyteidl.core import literals_pb2
from flytekit.configuration import SerializationSettings
from flytekit.core.base_task import PythonTask
from flytekit.core.context_manager import FlyteContext
from flytekit.core.interface import transform_interface_to_list_interface
from flytekit.models.literals import LiteralMap

from flytekitplugins_actor.constants import ACTOR_MAP_TASK_TYPE
from flytekitplugins_actor.map_plan import MapInputError, MapPlan, required_successes
from flytekitplugins_actor.task import ActorTask, execution_env


class MapFailed(RuntimeError):
    """Too few items of an actor map succeeded to meet its min_success_ratio."""


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
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise ValueError(f"map(concurrency={concurrency!r}) is invalid: must be None (all replicas) or an int >= 1")
        if (
            isinstance(min_success_ratio, bool)
            or not isinstance(min_success_ratio, (int, float))
            or not 0 <= min_success_ratio <= 1
        ):
            raise ValueError(f"map(min_success_ratio={min_success_ratio!r}) is invalid: must be a number in [0, 1]")
        self._subtask: ActorTask = task
        self._bound_values: Dict[str, Any] = dict(partial.keywords) if partial else {}
        unknown = set(self._bound_values) - set(task.python_interface.inputs)
        if unknown:
            raise TypeError(f"map({task.name}): partial binds {sorted(unknown)}, which are not inputs of the task")
        self.concurrency, self.min_success_ratio = concurrency, float(min_success_ratio)
        self.bound_inputs = sorted(self._bound_values)
        self.mapped_inputs = [k for k in task.python_interface.inputs if k not in self._bound_values]
        if not self.mapped_inputs:
            raise TypeError(f"map({task.name}): every input is bound by the partial; nothing is left to map over")
        optional_outputs = self.min_success_ratio < 1
        interface = transform_interface_to_list_interface(
            task.python_interface, set(self.bound_inputs), set(), optional_outputs
        )
        h = hashlib.md5(f"{','.join(self.bound_inputs)}:{concurrency}:{self.min_success_ratio}".encode()).hexdigest()[
            :10
        ]
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
    def subtask(self) -> ActorTask:
        return self._subtask

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
                "concurrency": self.concurrency,
                "min_success_ratio": self.min_success_ratio,
                "mapped_inputs": self.mapped_inputs,
                "bound_inputs": self.bound_inputs,
                "subtask": self._subtask.name,
            }
        }
        return execution_env(self._subtask.task_config, settings, spec)

    # ---- local execution: fan out over local replicas ----
    def dispatch_execute(self, ctx: FlyteContext, input_literal_map: LiteralMap) -> LiteralMap:
        """Splits the inputs (the same MapPlan the connector uses), runs the items on the environment's local
        replicas in parallel, and gathers their outputs in input order."""
        from flytekitplugins_actor.local import run_literals_on_replica

        try:
            plan = MapPlan(input_literal_map, self.mapped_inputs, self.bound_inputs)
        except MapInputError as e:
            raise ValueError(f"map({self._subtask.name}): {e}") from None
        n = plan.size
        workers = min(self.concurrency or self._subtask.task_config.replica_count, max(n, 1))
        results: List[Optional[literals_pb2.LiteralMap]] = [None] * n
        failures: Dict[int, BaseException] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="actor-map") as ex:
            # each item runs in a copy of the driver's flytekit context (a contextvar)
            futures = {
                ex.submit(
                    contextvars.copy_context().run,
                    run_literals_on_replica,
                    self._subtask,
                    LiteralMap.from_flyte_idl(plan.item_inputs(i)),
                ): i
                for i in range(n)
            }
            for f in concurrent.futures.as_completed(futures):
                i = futures[f]
                try:
                    results[i] = f.result().to_flyte_idl()
                except Exception as e:
                    failures[i] = e
        need = required_successes(n, self.min_success_ratio)
        if n - len(failures) < need:
            first = min(failures)
            raise MapFailed(
                f"map({self._subtask.name}): {n - len(failures)} of {n} items succeeded, {need} required "
                f"(min_success_ratio={self.min_success_ratio}); first failure, item {first}: {failures[first]!r}"
            ) from failures[first]
        return LiteralMap.from_flyte_idl(MapPlan.gather(list(self._subtask.python_interface.outputs), results))

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

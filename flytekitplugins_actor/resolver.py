"""A task resolver for actor tasks that cannot be imported by module name (defined in __main__ or a notebook)."""

from __future__ import annotations

from typing import List

import cloudpickle
from flytekit.core.base_task import TaskResolverMixin
from flytekit.core.python_auto_container import PythonAutoContainerTask


class PickledTaskResolver(TaskResolverMixin):
    """Loads a task from a cloudpickle file: loader args are ["pickled-task", <path>]."""

    @property
    def location(self) -> str:
        return "flytekitplugins_actor.resolver.pickled_task_resolver"

    def name(self) -> str:
        return "pickled_task_resolver"

    def load_task(self, loader_args: List[str]) -> PythonAutoContainerTask:
        if len(loader_args) != 2 or loader_args[0] != "pickled-task":
            raise ValueError(f"expected loader args ['pickled-task', <path>], got {loader_args!r}")
        with open(loader_args[1], "rb") as f:
            return cloudpickle.load(f)

    def loader_args(self, settings, t) -> List[str]:
        raise NotImplementedError("pickled tasks are written by the local runner, not serialized")

    def get_all_tasks(self):
        return []


pickled_task_resolver = PickledTaskResolver()

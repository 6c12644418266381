"""Caching with custom objects: `actor_cache` keys on an argument's `__hash__`/`__eq__`.

Port of "Example: Caching with Custom Objects" in the Union actor examples. The four calls all build
`MyObj(state=2)`: the 2 s `get_state` runs once in the replica, and the next three calls are cache hits.

    pyflyte run examples/caching_custom_object.py wf    # -> 2

Each real computation prints a `get_state: computing` line to the replica's log
(/tmp/flyte-actor-logs/<driver pid>/<replica>.log); tests count them. Local runs never build the ImageSpec.
"""

import os
from time import sleep

from flytekit import ImageSpec, workflow

from flytekitplugins_actor import ActorEnvironment, actor_cache

image = ImageSpec(
    registry=os.environ.get("DOCKER_REGISTRY", None),
    packages=["flytekitplugins-actor"],
)

actor = ActorEnvironment(
    name="my-actor",
    container_image=image,
    replica_count=1,
)


class MyObj:
    def __init__(self, state: int):
        self.state = state

    def __hash__(self):
        return hash(self.state)

    def __eq__(self, other):
        return self.state == other.state


@actor_cache
def get_state(obj: MyObj) -> int:
    print(f"get_state: computing state {obj.state} in pid {os.getpid()}", flush=True)
    sleep(2)
    return obj.state


@actor.task
def construct_and_get_value(state: int) -> int:
    obj = MyObj(state=state)
    return get_state(obj)


@workflow
def wf(state: int = 2) -> int:
    value = construct_and_get_value(state=state)
    value = construct_and_get_value(state=value)
    value = construct_and_get_value(state=value)
    value = construct_and_get_value(state=value)
    return value

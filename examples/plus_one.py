"""Multiple instances of the same task: four calls of `plus_one`, all on the same warm replica.

Port of the "Multiple instances of the same task" example of the Union actors docs.

    pyflyte run examples/plus_one.py wf --input 0     # -> 4

Local runs never build the ImageSpec.
"""

import os

from flytekit import ImageSpec, Resources, workflow

from flytekitplugins_actor import ActorEnvironment

image = ImageSpec(
    registry=os.environ.get("DOCKER_REGISTRY", None),
    packages=["flytekitplugins-actor"],
)

actor = ActorEnvironment(
    name="my-actor",
    replica_count=1,
    ttl_seconds=300,
    requests=Resources(cpu="2", mem="500Mi"),
    container_image=image,
)


@actor.task
def plus_one(input: int) -> int:
    return input + 1


@workflow
def wf(input: int = 0) -> int:
    a = plus_one(input=input)
    b = plus_one(input=a)
    c = plus_one(input=b)
    return plus_one(input=c)

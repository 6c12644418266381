"""Hello world: one actor task on a one-replica ActorEnvironment.

Port of the "Hello world" example of the Union actors docs (shared/seeds/actors.md).

    pyflyte run examples/hello_world.py wf

Local runs execute `say_hello` on a warm local replica process; they never build the ImageSpec
(it is only built when you register or run remotely).
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
    ttl_seconds=30,
    requests=Resources(
        cpu="2",
        mem="300Mi",
    ),
    container_image=image,
)


@actor.task
def say_hello() -> str:
    return "hello"


@workflow
def wf():
    say_hello()

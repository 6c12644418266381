"""Multiple tasks: two actor tasks of one environment, used from a workflow, a subworkflow and a launch plan.

Port of the "Multiple tasks" example of the Union actors docs. Every task execution runs in the same
ActorEnvironment (here: the same warm local replica).

    pyflyte run examples/multiple_tasks.py my_parent_wf --name world   # -> "HELLO HELLO hello world"

Local runs never build the ImageSpec.
"""

import os

from flytekit import ImageSpec, LaunchPlan, Resources, current_context, workflow

from flytekitplugins_actor import ActorEnvironment

image = ImageSpec(
    registry=os.environ.get("DOCKER_REGISTRY", None),
    packages=["flytekitplugins-actor"],
)

actor = ActorEnvironment(
    name="my-actor",
    replica_count=1,
    ttl_seconds=30,
    requests=Resources(cpu="1", mem="450Mi"),
    container_image=image,
)


@actor.task
def say_hello(name: str) -> str:
    return f"hello {name}"


@actor.task
def scream_hello(name: str) -> str:
    return f"HELLO {name}"


@workflow
def my_child_wf(name: str) -> str:
    return scream_hello(name=name)


my_child_wf_lp = LaunchPlan.get_default_launch_plan(current_context(), my_child_wf)


@workflow
def my_parent_wf(name: str) -> str:
    a = say_hello(name=name)
    b = my_child_wf(name=a)
    return my_child_wf_lp(name=b)

"""Custom PodTemplates: an ActorEnvironment configured by a PodTemplate; both tasks run in the same replica.

Port of the "Custom PodTemplates" example of the Union actors docs.

    pyflyte run examples/pod_template.py wf    # -> ("compile_time", "run_time")

`COMP_KEY_EX` comes from the pod template's primary container env, which the replica (not the driver)
gets; `RUN_KEY_EX` is set by the first task and read by the second, which proves both ran in one warm
process. `V1Container(image=ImageSpec(...))` needs kubernetes < 37 (pinned to 36.0.3 in constraints.txt).
Local runs never build the ImageSpec.
"""

import os

from flytekit import ImageSpec, PodTemplate, workflow
from kubernetes.client.models import (
    V1Container,
    V1EnvVar,
    V1PodSpec,
    V1ResourceRequirements,
)

from flytekitplugins_actor import ActorEnvironment

image = ImageSpec(
    registry=os.environ.get("DOCKER_REGISTRY", None),
    packages=["flytekitplugins-actor", "flytekitplugins-pod"],
)

pod_template = PodTemplate(
    primary_container_name="primary",
    pod_spec=V1PodSpec(
        containers=[
            V1Container(
                name="primary",
                image=image,
                resources=V1ResourceRequirements(
                    requests={
                        "cpu": "1",
                        "memory": "1Gi",
                    },
                    limits={
                        "cpu": "1",
                        "memory": "1Gi",
                    },
                ),
                env=[V1EnvVar(name="COMP_KEY_EX", value="compile_time")],
            ),
        ],
    ),
)

actor = ActorEnvironment(
    name="my-actor",
    replica_count=1,
    ttl_seconds=30,
    pod_template=pod_template,
)


@actor.task
def get_and_set() -> str:
    os.environ["RUN_KEY_EX"] = "run_time"
    return os.getenv("COMP_KEY_EX")


@actor.task
def check_set() -> str:
    return os.getenv("RUN_KEY_EX")


@workflow
def wf() -> tuple[str, str]:
    return get_and_set(), check_set()

"""Actor tasks the connector tests run. Replicas import this module by name (the connector's PYTHONPATH has it)."""

import os
import time
from typing import Optional

from flytekit.exceptions.user import FlyteRecoverableException

from flytekitplugins_actor import ActorEnvironment

env = ActorEnvironment(name="conn-test", replica_count=1, ttl_seconds=300)
env2 = ActorEnvironment(name="conn-map", replica_count=2, ttl_seconds=300)


def _count(path: Optional[str], label: str) -> None:
    """Appends one line per run: the side-effect counter that proves what ran (and what did not run twice)."""
    if path:
        with open(path, "a") as f:
            f.write(f"{label} {os.getpid()}\n")


@env.task
def add(a: int, b: int) -> int:
    return a + b


@env.task
def echo(s: str) -> str:
    return s


@env.task
def echo_identity() -> str:
    return "/".join(
        os.environ.get(k, "")
        for k in ("FLYTE_INTERNAL_EXECUTION_ID", "FLYTE_INTERNAL_TASK_NAME", "FLYTE_ATTEMPT_NUMBER")
    )


@env.task
def fail(message: str) -> int:
    raise ValueError(message)
    return 0  # flytekit requires a return statement


@env.task
def flaky(message: str) -> int:
    raise FlyteRecoverableException(message)
    return 0


@env.task
def fail_no_outputs(message: str):
    raise RuntimeError(message)


@env.task
def wait_for_file(path: str, counter: str, label: str) -> str:
    """Runs until `path` exists: lets a test hold a replica busy for exactly as long as it needs."""
    _count(counter, label)
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return label


@env.task
def die(counter: str) -> int:
    _count(counter, "die")
    os._exit(3)
    return 0


@env.task
def pid() -> int:
    return os.getpid()


@env2.task
def square(x: int, counter: str, gate: str) -> int:
    """Mapped: fails for negative x; waits for `gate` (if set) when x >= 100 so a test can kill mid-map."""
    _count(counter, f"item {x}")
    if x < 0:
        raise ValueError(f"negative input {x}")
    if gate and x >= 100:
        deadline = time.monotonic() + 120
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    return x * x


@env2.task
def where(x: int) -> str:
    return f"{x}:{os.environ.get('FLYTE_ACTOR_REPLICA', '')}"


@env.task
def inc1(x: int) -> int:
    """Trivial work on the one-replica environment (benchmarks)."""
    return x + 1


@env2.task
def inc2(x: int) -> int:
    """Trivial work on the two-replica environment (benchmarks)."""
    return x + 1


@env.task(sync=True)
def add_sync(a: int, b: int) -> int:
    return a + b


@env.task(sync=True)
def big_sync(n: int) -> str:
    return "x" * n


@env.task(sync=True)
def pid_sync() -> int:
    return os.getpid()


@env.task(sync=True)
def nap_sync(seconds: float, counter: str) -> int:
    """Longer than a small sync budget; naps in short steps so a cancel interrupts it at once."""
    _count(counter, "nap")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    return os.getpid()


env_ttl = ActorEnvironment(name="conn-ttl", replica_count=1, ttl_seconds=1)


@env_ttl.task
def pid_short_ttl() -> int:
    return os.getpid()


# An environment configured by a pod template (as examples/pod_template.py): flytekit then serializes no
# `container` but a k8s_pod whose primary container holds the args, image, env and resources.
from flytekit import PodTemplate, Resources, Secret  # noqa: E402
from flytekit.extras.accelerators import T4  # noqa: E402
from kubernetes.client.models import V1Container, V1EnvVar, V1PodSpec, V1ResourceRequirements, V1Toleration  # noqa: E402

pod_template = PodTemplate(
    primary_container_name="main",
    labels={"team": "ml"},
    annotations={"example.com/note": "from-pod-template"},
    pod_spec=V1PodSpec(
        containers=[
            V1Container(
                name="main",
                env=[V1EnvVar(name="COMP_KEY_EX", value="compile_time")],
                resources=V1ResourceRequirements(
                    requests={"cpu": "1", "memory": "1Gi"}, limits={"cpu": "1", "memory": "1Gi"}
                ),
            ),
            V1Container(name="sidecar", image="busybox:1.36", args=["sleep", "infinity"]),
        ],
        tolerations=[V1Toleration(key="dedicated", operator="Equal", value="ml", effect="NoSchedule")],
        node_selector={"pool": "ml"},
    ),
)
env_pod = ActorEnvironment(
    name="conn-pod",
    replica_count=1,
    ttl_seconds=300,
    pod_template=pod_template,
    environment={"ENV_KEY": "from-environment"},
)


@env_pod.task
def get_and_set(x: int) -> str:
    os.environ["RUN_KEY_EX"] = "run_time"
    return f"{os.getenv('COMP_KEY_EX')}/{os.getenv('ENV_KEY')}/{x}"


@env_pod.task
def check_set() -> str:
    return os.getenv("RUN_KEY_EX", "")


env_gpu = ActorEnvironment(
    name="conn-gpu",
    replica_count=1,
    ttl_seconds=300,
    requests=Resources(cpu="2", mem="4Gi", gpu="1"),
    limits=Resources(mem="8Gi"),
    accelerator=T4,
    secret_requests=[Secret(group="db", key="password")],
    interruptible=True,
)


@env_gpu.task
def gpu_task() -> int:
    return 1

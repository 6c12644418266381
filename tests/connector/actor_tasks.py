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
def echo_identity() -> str:
    return "/".join(os.environ.get(k, "") for k in ("FLYTE_INTERNAL_EXECUTION_ID", "FLYTE_INTERNAL_TASK_NAME", "FLYTE_ATTEMPT_NUMBER"))


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


env_ttl = ActorEnvironment(name="conn-ttl", replica_count=1, ttl_seconds=1)


@env_ttl.task
def pid_short_ttl() -> int:
    return os.getpid()

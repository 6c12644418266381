"""Actor tasks the connector's map tests run (replicas import this module by name, as actor_tasks)."""

import os
import sys

from flytekitplugins_actor import ActorEnvironment

map_env = ActorEnvironment(name="conn-map-faults", replica_count=2, ttl_seconds=300)


def _count(path: str, label: str) -> None:
    with open(path, "a") as f:
        f.write(f"{label} {os.getpid()}\n")


@map_env.task
def interrupt_on(x: int, bad: int, counter: str) -> int:
    """Item `bad` raises KeyboardInterrupt from the task's own code (nobody cancelled it)."""
    _count(counter, f"item {x}")
    if x == bad:
        raise KeyboardInterrupt("the task raised it")
    return x * 10


@map_env.task
def exit_on(x: int, bad: int) -> int:
    """Item `bad` calls sys.exit."""
    if x == bad:
        sys.exit(3)
    return x * 10

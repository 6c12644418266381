"""actor_cache inside a replica: a cached loader shared by two tasks of one environment."""

import os
import typing

from flytekitplugins_actor import ActorEnvironment, actor_cache

cache_env = ActorEnvironment(name="sdk-cache", replica_count=1, ttl_seconds=300)

LOADS = 0


@actor_cache
def load_model(name: str) -> str:
    global LOADS
    LOADS += 1
    return f"model-{name}"


@cache_env.task
def predict(x: int) -> typing.Tuple[int, int, str]:
    """(replica pid, model loads so far in this replica, model)"""
    model = load_model("m")
    return os.getpid(), LOADS, model


@cache_env.task
def predict_other_task(x: int) -> typing.Tuple[int, int, str]:
    model = load_model("m")
    return os.getpid(), LOADS, model

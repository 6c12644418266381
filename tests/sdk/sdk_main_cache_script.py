"""Run as a script: a __main__ actor task using an actor_cache'd function travels to the replica by cloudpickle.

Prints one JSON line: the value the cached function computed in the replica for two calls (equal when the cache
lives for the replica, not for one execution), and the replica pids.
"""

import json
import os
import uuid

from flytekitplugins_actor import ActorEnvironment, actor_cache

env = ActorEnvironment(name="sdk-main-cache", ttl_seconds=60)


@actor_cache
def load_token(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex}-{os.getpid()}"


@env.task
def use_token(name: str) -> str:
    return load_token(name)


if __name__ == "__main__":
    try:
        first, second = use_token(name="m"), use_token(name="m")
        out = {"first": first, "second": second, "driver_pid": os.getpid()}
    except Exception as e:  # report, so the test can show what went wrong
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)

"""Run as a script: its actor task lives in __main__, so it must travel to the replica by cloudpickle.

GREETING exists only when this file runs as __main__: a replica that imported the file by module name
instead would not have it, and the task would fail with a NameError.
"""

import json
import os

from flytekitplugins_actor import ActorEnvironment

env = ActorEnvironment(name="sdk-main-script", ttl_seconds=60)


def shout(s: str) -> str:
    return s.upper() + "!"


@env.task
def greet(name: str) -> str:
    return f"{shout(GREETING)} {name} pid={os.getpid()}"  # noqa: F821 -- defined below, in __main__ only


if __name__ == "__main__":
    GREETING = "hello from __main__"
    try:
        out = greet(name="actor")
    except Exception as e:  # report, so the test can show what the replica did
        out = f"{type(e).__name__}: {e}"
    print(json.dumps({"driver_pid": os.getpid(), "result": out}), flush=True)

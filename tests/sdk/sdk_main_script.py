"""Run as a script: its actor task lives in __main__, so it cannot be imported by name and travels by cloudpickle."""

import json
import os

from flytekitplugins_actor import ActorEnvironment

env = ActorEnvironment(name="sdk-main-script", ttl_seconds=60)
GREETING = "hello from __main__"


def shout(s: str) -> str:
    return s.upper() + "!"


@env.task
def greet(name: str) -> str:
    return f"{shout(GREETING)} {name} pid={os.getpid()}"


if __name__ == "__main__":
    out = greet(name="actor")
    print(json.dumps({"driver_pid": os.getpid(), "result": out}), flush=True)

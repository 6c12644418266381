"""Run as a driver: leaves files in an execution's temp dir and in replica_dir(), prints from a task, then exits
or blocks inside a task (for the test to interrupt it). argv: <mode: exit|block> <marker file for 'block'>."""

import os
import sys
import tempfile
import time

from flytekitplugins_actor import ActorEnvironment, replica_dir

env = ActorEnvironment(name="sdk-cleanup", ttl_seconds=60)


@env.task
def leave_files(n: int) -> str:
    with open(os.path.join(tempfile.gettempdir(), "scratch.bin"), "wb") as f:
        f.write(b"x" * n)
    with open(os.path.join(replica_dir(), "state.bin"), "wb") as f:
        f.write(b"y" * n)
    print(f"hello from the task, pid {os.getpid()}")
    return replica_dir()


@env.task
def block(marker: str) -> int:
    open(marker, "w").close()
    time.sleep(120)
    return 0


if __name__ == "__main__":
    print(leave_files(n=1000), flush=True)
    print("driver: the result is back", file=sys.stderr, flush=True)
    if sys.argv[1] == "block":
        block(marker=sys.argv[2])

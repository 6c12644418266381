"""Run as a driver process: starts two replicas, prints their pids, then waits to be killed."""

import json
import os
import sys

from sdk_map_tasks import barrier_env, barrier_pid  # noqa: F401

from flytekitplugins_actor import map as actor_map

if __name__ == "__main__":
    barrier_dir = sys.argv[1]
    pids = actor_map(barrier_pid)(barrier=[barrier_dir, barrier_dir], me=["a", "b"], other=["b", "a"])
    print(json.dumps({"driver_pid": os.getpid(), "replica_pids": pids}), flush=True)
    sys.stdin.read()  # until the test kills us

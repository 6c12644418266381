"""Actor tasks the Kubernetes end-to-end tests run, one environment per scenario so each has pods of its own.
Replica pods import this module by name (the stand-in's image has tests/connector on its PYTHONPATH)."""

import os
import socket
import time

from flytekitplugins_actor import ActorEnvironment

main = ActorEnvironment(name="k8s-main", replica_count=1, ttl_seconds=300)
fanout = ActorEnvironment(name="k8s-map", replica_count=2, ttl_seconds=300)
faults = ActorEnvironment(name="k8s-faults", replica_count=1, ttl_seconds=300)
short = ActorEnvironment(name="k8s-ttl", replica_count=1, ttl_seconds=1)
restart = ActorEnvironment(name="k8s-restart", replica_count=1, ttl_seconds=300)
restart_map = ActorEnvironment(name="k8s-restart-map", replica_count=2, ttl_seconds=300)


def _gate(path: str) -> str:
    """Says it runs (`<path>.started`), then waits (bounded) for the file `path` the test creates; returns the
    replica's pod IP (FLYTE_ACTOR_HOST)."""
    open(f"{path}.started", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.environ.get("FLYTE_ACTOR_HOST", "")


@main.task
def add(a: int, b: int) -> int:
    return a + b


@main.task
def host() -> str:
    """Where the replica runs: its pod IP and its pod name (HOSTNAME)."""
    return f"{os.environ.get('FLYTE_ACTOR_HOST')}/{socket.gethostname()}/{os.environ.get('HOSTNAME')}"


@main.task
def held(gate: str) -> str:
    return _gate(gate)


@fanout.task
def where(x: int) -> str:
    return f"{x}:{os.environ.get('FLYTE_ACTOR_HOST')}"


@fanout.task
def where_gated(x: int, gate: str) -> str:
    """`where`, once the test opens the gate."""
    return f"{x}:{_gate(gate)}"


@faults.task
def held_fault(gate: str) -> str:
    return _gate(gate)


@faults.task
def counted(gate: str, exit_code: int = 0) -> str:
    """Appends `start <pod IP>` to `<gate>.runs`, exits with `exit_code` if not 0 (the task killing its replica),
    else waits for the gate and appends `done <pod IP>`: the file tells how often it ran, where, and which run
    completed."""
    host = os.environ.get("FLYTE_ACTOR_HOST", "")
    with open(f"{gate}.runs", "a") as f:
        f.write(f"start {host}\n")
    if exit_code:
        os._exit(exit_code)
    _gate(gate)
    with open(f"{gate}.runs", "a") as f:
        f.write(f"done {host}\n")
    return host


@short.task
def quick() -> int:
    return 1


@restart.task
def counted_run(gate: str, counter: str) -> str:
    """Appends a line to `counter` per run (a second run would show), then waits for `gate`; returns the pod IP."""
    with open(counter, "a") as f:
        f.write("run\n")
    return _gate(gate)


@restart_map.task
def counted_square(x: int, gate: str, counter: str) -> int:
    """Appends `x` to `counter` per run; items from 100 up then wait for `gate` (in flight at a connector kill)."""
    with open(counter, "a") as f:
        f.write(f"{x}\n")
    if x >= 100:
        _gate(gate)
    return x * x

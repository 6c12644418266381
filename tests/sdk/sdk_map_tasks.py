"""Actor tasks for the map tests (and the driver-kill script)."""

import os
import sys
import time
import typing

from flytekit import workflow

from flytekitplugins_actor import ActorEnvironment
from flytekitplugins_actor import map as actor_map
from flytekitplugins_actor.replica.execution import CancelRequested

barrier_env = ActorEnvironment(name="sdk-map-pair", replica_count=2, ttl_seconds=300)


@barrier_env.task
def barrier_pid(barrier: str, me: str, other: str) -> int:
    """Arrives at a file barrier and waits for `other` to arrive too: completes only if both items run at once."""
    open(os.path.join(barrier, me), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(barrier, other)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{me} waited 30s for {other}: the items did not run concurrently")
        time.sleep(0.01)
    return os.getpid()


@barrier_env.task
def square_after(x: int, delay: float) -> int:
    time.sleep(delay)
    return x * x


@barrier_env.task
def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x * 10


@barrier_env.task
def add(x: int, y: int) -> int:
    return x + y


@barrier_env.task
def quot_rem(a: int, b: int) -> typing.Tuple[int, int]:
    return a // b, a % b


@barrier_env.task
def overlap_probe(probe_dir: str, me: str, hold: float) -> bool:
    """Marks itself running and watches for `hold` seconds for another item running at the same time."""
    from sdk_helpers import saw_overlap

    return saw_overlap(probe_dir, me, hold)


@workflow
def wf_map_add(xs: typing.List[int], y: int) -> typing.List[int]:
    import functools

    return actor_map(functools.partial(add, y=y))(x=xs)


@barrier_env.task
def die_on(x: int, bad: int) -> int:
    if x == bad:
        os._exit(9)
    return x * 10


@barrier_env.task
def exit_on(x: int, bad: int) -> int:
    """sys.exit in one item: that item's failure, nothing more."""
    if x == bad:
        sys.exit(3)
    return x * 10


@barrier_env.task
def interrupt_on(x: int, bad: int) -> int:
    """KeyboardInterrupt raised by one item's own code (nobody pressed Ctrl-C)."""
    if x == bad:
        raise KeyboardInterrupt("the task raised it")
    return x * 10


@barrier_env.task
def driver_pid(x: int) -> int:
    return os.getpid()


@barrier_env.task
def fail_or_hold(x: int, marks: str) -> int:
    """Item 0 fails at once; the others mark themselves running and run until cancelled (marking that too)."""
    if x == 0:
        raise ValueError("item 0 fails first")
    try:  # marked inside the try: a cancel that lands at once still leaves its mark
        open(os.path.join(marks, f"running-{x}"), "w").close()
        while True:
            time.sleep(0.02)
    except CancelRequested:  # the replica's cancel
        open(os.path.join(marks, f"cancelled-{x}"), "w").close()
        raise
    return x  # flytekit requires a return statement


@barrier_env.task
def hold(x: int, marks: str, stubborn: bool) -> int:
    """Marks itself running (with its replica's pid) and runs until cancelled; a stubborn one ignores cancels."""
    open(os.path.join(marks, f"running-{x}-{os.getpid()}"), "w").close()
    while True:
        try:
            while True:
                time.sleep(0.02)
        except CancelRequested:  # the replica's cancel
            open(os.path.join(marks, f"cancelled-{x}"), "w").close()
            if not stubborn:
                raise
    return x  # flytekit requires a return statement


@workflow
def wf_hold(xs: typing.List[int], marks: str, stubborn: bool) -> typing.List[int]:
    """Six items on two replicas that never finish on their own: for Ctrl-C."""
    import functools

    return actor_map(functools.partial(hold, marks=marks, stubborn=stubborn))(x=xs)

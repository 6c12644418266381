"""Trivial actor tasks the local benchmarks (bench_local.py) and the demo's cold-vs-warm timing run."""

import time

from flytekitplugins_actor import ActorEnvironment

one = ActorEnvironment(name="bench-one", replica_count=1, ttl_seconds=600)
two = ActorEnvironment(name="bench-two", replica_count=2, ttl_seconds=600)


@one.task
def noop(x: int) -> int:
    return x + 1


@two.task
def noop2(x: int) -> int:
    return x + 1


@one.task
def sleepy(x: int) -> int:
    time.sleep(0.02)
    return x + 1


@two.task
def sleepy2(x: int) -> int:
    time.sleep(0.02)
    return x + 1


from flytekit import task  # noqa: E402


@task
def plain(x: int) -> int:
    """Not an actor task: flytekit's own cost of a local call, in-process, for comparison."""
    return x + 1


from flytekit import workflow  # noqa: E402


@workflow
def wf_actor(x: int) -> int:
    """What users run: a workflow holding one actor task, called locally."""
    return noop(x=x)


@workflow
def wf_plain(x: int) -> int:
    """The same workflow with a plain @task: what the actor workflow is measured against."""
    return plain(x=x)


# ---- moving a big value between two tasks (bench_transfer.py) ----
from typing import List  # noqa: E402

big = ActorEnvironment(name="bench-big", replica_count=1, ttl_seconds=600)


@big.task
def make_floats(n: int) -> List[float]:
    return [float(i) for i in range(n)]


@big.task
def sum_floats(xs: List[float]) -> float:
    return sum(xs)


@task
def plain_make_floats(n: int) -> List[float]:
    return [float(i) for i in range(n)]


@task
def plain_sum_floats(xs: List[float]) -> float:
    return sum(xs)


@workflow
def wf_floats_actor(n: int) -> float:
    """1M floats from one actor task to another."""
    return sum_floats(xs=make_floats(n=n))


@workflow
def wf_floats_plain(n: int) -> float:
    return plain_sum_floats(xs=plain_make_floats(n=n))

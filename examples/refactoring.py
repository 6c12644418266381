"""Refactoring from regular tasks to actors: swap `@task` for `@actor.task`.

Port of "Refactoring from Regular Tasks to Actors" in the Union actor examples
(shared/seeds/actor-examples.md). Arguments that shape the container (image, resources) moved to the
ActorEnvironment; per-execution arguments (cache) stay on the task decorator.

    pyflyte run examples/refactoring.py distance_add_wf --point_a '[0, 0]' --point_b '[3, 4]'   # -> 6.5
    pyflyte run examples/refactoring.py is_even_wf --point_a '[1, 2, 3]'                      # -> [False, True, False]

`container_image` is only used when the task runs remotely; local runs use this virtualenv (which has scipy).
"""

from flytekit import Resources, workflow

import flytekitplugins_actor as fa
from flytekitplugins_actor import ActorEnvironment

actor = ActorEnvironment(
    name="myenv",
    replica_count=10,
    ttl_seconds=120,
    requests=Resources(mem="1Gi"),
    container_image="myrepo/myimage-with-scipy:latest",
)


@actor.task
def add_numbers(a: float, b: float) -> float:
    return a + b


@actor.task
def calculate_distance(point_a: list[int], point_b: list[int]) -> float:
    from scipy.spatial.distance import euclidean

    # scipy returns numpy.float64, which flytekit 1.16 rejects for a declared `float` output
    # (strict type check, with or without actors): convert it to a Python float.
    return float(euclidean(point_a, point_b))


@actor.task(cache=True, cache_version="v1")
def is_even(number: int) -> bool:
    return number % 2 == 0


@workflow
def distance_add_wf(point_a: list[int], point_b: list[int]) -> float:
    distance = calculate_distance(point_a=point_a, point_b=point_b)
    return add_numbers(a=distance, b=1.5)


@workflow
def is_even_wf(point_a: list[int]) -> list[bool]:
    # one task that fans the items out across the environment's replicas
    return fa.map(is_even)(number=point_a)

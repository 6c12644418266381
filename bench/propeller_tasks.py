"""The seeds' plus_one example (shared/seeds/actor-examples.md), on the async and the sync path, for
bench_propeller.py. Replicas import this module by name (the bench puts bench/ on the connector's PYTHONPATH)."""

from flytekit import Resources

from flytekitplugins_actor import ActorEnvironment

actor = ActorEnvironment(
    name="my-actor",
    replica_count=1,
    ttl_seconds=300,
    requests=Resources(cpu="2", mem="500Mi"),
)


@actor.task
def plus_one(input: int) -> int:
    return input + 1


@actor.task(sync=True)
def plus_one_sync(input: int) -> int:
    return input + 1

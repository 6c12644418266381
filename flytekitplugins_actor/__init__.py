"""Open-source actors for Flyte: task executions on warm replicas of an `ActorEnvironment`.

.. autosummary::
   ActorEnvironment
   ActorTask
   actor_cache
   replica_dir
   map
"""

from flytekitplugins_actor.actor_map import ActorMapTask, MapFailed, map
from flytekitplugins_actor.cache import actor_cache, replica_dir
from flytekitplugins_actor.environment import ActorEnvironment
from flytekitplugins_actor.errors import ActorError, ActorTaskFailed, ExecutionCancelled, ReplicaDied
from flytekitplugins_actor.task import ActorTask

__all__ = [
    "ActorEnvironment",
    "ActorTask",
    "ActorMapTask",
    "MapFailed",
    "actor_cache",
    "replica_dir",
    "map",
    "ActorError",
    "ActorTaskFailed",
    "ReplicaDied",
    "ExecutionCancelled",
]

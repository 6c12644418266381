"""Names shared by the SDK and the connector. No imports: `plugin_backend` may be loaded (as a flytekit plugin)
while `flytekitplugins_actor` itself is still importing."""

ACTOR_TASK_TYPE = "actor"
ACTOR_MAP_TASK_TYPE = "actor_map"
ACTOR_SYNC_TASK_TYPE = "actor_sync"
"""An actor task on the synchronous path (`@env.task(sync=True)`): propeller calls ExecuteTaskSync for it."""
CANCEL_GRACE_S = 3.0
"""How long a cancelled execution (a DeleteTask, or a map's item once the map is decided) may take to stop before
its replica is replaced."""
DEFAULT_TTL_SECONDS = 300
"""How long an idle pool keeps its replicas when an environment's `ttl_seconds` is None."""

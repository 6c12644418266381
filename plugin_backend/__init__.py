"""plugin_backend: the Flyte connector that runs actor tasks on warm replica pools.

`pyflyte serve connector` imports this package (entry point `flytekit.plugins: actor_connector`), which registers
the "actor", "actor_sync" and "actor_map" connectors. Replicas start on first use, never at import.
"""

from plugin_backend.errors import install_status_mapping

install_status_mapping()

try:
    from plugin_backend.connector import ActorConnector, ActorMapConnector  # noqa: F401  (registers both)
    from plugin_backend.sync_connector import ActorSyncConnector  # noqa: F401  (registers actor_sync)
except ImportError as e:  # pragma: no cover - the connector extra (prometheus_client, grpcio) is not installed
    from flytekit.loggers import logger

    logger.debug("actor connector not registered (install flytekitplugins-actor[connector]): %s", e)

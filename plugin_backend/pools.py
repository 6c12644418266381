"""The connector's warm pools, one per (namespace, service account, environment key, code version).

Executions from different namespaces or service accounts never share a replica, and a replica only ever imports
one code version. Pools idle past their environment's `ttl_seconds` are torn down by a reaper thread.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from flytekitplugins_actor.pool import SYSTEM_RETRIES, Execution, PoolRegistry, ReplicaPool
from flytekitplugins_actor.replica.backend import LocalProcessBackend, ReplicaBackend, ReplicaSpec
from flytekitplugins_actor.replica.execution import ExecutionSpec
from plugin_backend.pod_spec import PodReplicaSpec, replica_pod_spec
from plugin_backend.template import ActorTemplate

BACKEND_ENV = "FLYTE_ACTOR_BACKEND"
REPLICA_TMPDIR_ENV = "FLYTE_ACTOR_REPLICA_TMPDIR"
STATE_DIR_ENV = "FLYTE_ACTOR_STATE_DIR"
SYSTEM_RETRIES_ENV = "FLYTE_ACTOR_SYSTEM_RETRIES"


@dataclass(frozen=True)
class PoolKey:
    namespace: str
    service_account: str
    env_key: str
    code_version: str

    @functools.cached_property
    def code(self) -> str:
        return hashlib.sha256(self.code_version.encode()).hexdigest()[:12]

    @functools.cached_property
    def digest(self) -> str:
        parts = [self.namespace, self.service_account, self.env_key, self.code_version]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def backend_from_env() -> ReplicaBackend:
    """FLYTE_ACTOR_BACKEND=local (default: replica processes on this host) or kubernetes (replica pods)."""
    name = os.environ.get(BACKEND_ENV, "local").strip().lower()
    if name == "local":
        return LocalProcessBackend()
    if name in ("kubernetes", "k8s"):
        from plugin_backend.kubernetes import KubernetesBackend

        return KubernetesBackend.from_env()
    raise ValueError(f"{BACKEND_ENV}={name!r} is not a replica backend; use 'local' or 'kubernetes'")


def system_retries_from_env() -> int:
    """FLYTE_ACTOR_SYSTEM_RETRIES: how often an execution whose replica the platform took away is dispatched again
    (propeller's default, 3, when unset); a malformed value is refused at start, naming the variable."""
    raw = os.environ.get(SYSTEM_RETRIES_ENV, "").strip()
    if not raw:
        return SYSTEM_RETRIES
    if not raw.isdigit():
        raise ValueError(f"{SYSTEM_RETRIES_ENV}={raw!r}: expected an integer >= 0")
    return int(raw)


class PoolManager(PoolRegistry):
    """Creates pools on first use, finds them by key, and reaps the idle ones."""

    def __init__(self, backend: Optional[ReplicaBackend] = None, state_dir: Optional[str] = None):
        super().__init__()
        self.backend = backend or backend_from_env()
        self.system_retries = system_retries_from_env()
        self.state_dir = (
            state_dir
            or os.environ.get(STATE_DIR_ENV)
            or os.path.join(tempfile.gettempdir(), f"flyte-actor-connector-{os.getpid()}")
        )
        self.log_dir = os.path.join(self.state_dir, "logs")

    def pool_for(self, key: PoolKey, template: ActorTemplate) -> ReplicaPool:
        """The pool for a key, created (no replica started yet) if there is none: for callers about to submit."""
        return self._pool(key.digest, lambda: self._new_pool(key, template))

    def submit_for(self, key: PoolKey, template: ActorTemplate, spec: ExecutionSpec, **kwargs: Any) -> Execution:
        """Submits to the key's pool, creating it if needed; a pool reaped meanwhile is replaced, not failed."""
        return self.submit(key.digest, lambda: self._new_pool(key, template), spec, **kwargs)

    def _new_pool(self, key: PoolKey, template: ActorTemplate) -> ReplicaPool:
        """A pool for the key, adopting the live replicas a previous connector left for it (Kubernetes pods)."""
        pool = ReplicaPool(
            key.digest,
            self.backend,
            self._spec_maker(key, template),
            template.replica_count,
            template.ttl_seconds,
            name=template.env_name,
            system_retries=self.system_retries,
        )
        token, replicas = self.backend.live_replicas(key.digest)
        if token is not None and replicas:
            pool.adopt(token, replicas)
        return pool

    def find(self, key: PoolKey) -> Optional[ReplicaPool]:
        """The live pool for a key, without creating one."""
        return self.get(key.digest)

    def _spec_maker(self, key: PoolKey, template: ActorTemplate):
        cwd = None
        if template.command.distribution:  # fast-registered code unpacks into a directory of this pool's own
            cwd = os.path.join(self.state_dir, "pools", key.digest)
            os.makedirs(cwd, exist_ok=True)
        labels = {
            "flyte-actor/env": template.env_name,
            "flyte-actor/env-key": template.env_key,
            "flyte-actor/pool": key.digest,
            "flyte-actor/code": key.code,
        }
        env = dict(template.container_env)
        tmpdir = self._replica_tmpdir()
        if tmpdir:
            env.setdefault("TMPDIR", tmpdir)
        pod_spec = replica_pod_spec(template, env)

        def make_spec(name: str, token: str) -> ReplicaSpec:
            return PodReplicaSpec(
                name=name,
                token=token,
                env=env,
                labels=labels,
                cwd=cwd,
                image=template.image,
                log_dir=self.log_dir,
                pod_spec=pod_spec,
                namespace=key.namespace,
                service_account=key.service_account,
                primary_container=template.primary_container_name,
                pod_labels=dict(template.pod_labels),
                pod_annotations=dict(template.pod_annotations),
            )

        return make_spec

    def _replica_tmpdir(self) -> Optional[str]:
        """Scratch for local replicas when FLYTE_ACTOR_REPLICA_TMPDIR is set (e.g. /dev/shm: tmpfs makes and
        removes each execution's temp dirs ~4x faster than a disk). Opt-in: task temp files would then use RAM,
        and a container's /dev/shm is often 64 MiB. Pods keep their own /tmp."""
        configured = os.environ.get(REPLICA_TMPDIR_ENV)
        if not configured or not isinstance(self.backend, LocalProcessBackend):
            return None
        path = os.path.join(configured, f"flyte-actor-{os.getpid()}")
        os.makedirs(path, exist_ok=True)
        return path

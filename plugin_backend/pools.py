"""The connector's warm pools, one per (namespace, service account, environment key, code version).

Executions from different namespaces or service accounts never share a replica, and a replica only ever imports
one code version. Pools idle past their environment's `ttl_seconds` are torn down by a reaper thread.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from flytekitplugins_actor.pool import Execution, PoolRegistry, ReplicaPool
from flytekitplugins_actor.replica.backend import LocalProcessBackend, ReplicaBackend, ReplicaSpec
from flytekitplugins_actor.replica.execution import ExecutionSpec
from plugin_backend.template import ActorTemplate

BACKEND_ENV = "FLYTE_ACTOR_BACKEND"
REPLICA_TMPDIR_ENV = "FLYTE_ACTOR_REPLICA_TMPDIR"
STATE_DIR_ENV = "FLYTE_ACTOR_STATE_DIR"
GPU_NODE_LABEL_ENV = "FLYTE_ACTOR_K8S_GPU_NODE_LABEL"
DEFAULT_GPU_NODE_LABEL = "k8s.amazonaws.com/accelerator"  # propeller's default gpu-device-node-label


INTERRUPTIBLE_TOLERATIONS_ENV = "FLYTE_ACTOR_K8S_INTERRUPTIBLE_TOLERATIONS"
INTERRUPTIBLE_NODE_SELECTOR_ENV = "FLYTE_ACTOR_K8S_INTERRUPTIBLE_NODE_SELECTOR"


def _json_env(name: str, default: Any) -> Any:
    raw = os.environ.get(name)
    if not raw:
        return default
    value = json.loads(raw)
    if not isinstance(value, type(default)):
        raise ValueError(f"{name} must be a JSON {type(default).__name__}, got {raw!r}")
    return value


@dataclass
class PodReplicaSpec(ReplicaSpec):
    """A ReplicaSpec with the pod template's metadata, for the Kubernetes backend."""

    pod_labels: Dict[str, str] = field(default_factory=dict)
    pod_annotations: Dict[str, str] = field(default_factory=dict)


def replica_pod_spec(template: ActorTemplate, env: Dict[str, str]) -> Dict[str, Any]:
    """The replica's pod spec: the task's own k8s_pod spec when its environment has a pod template (its other
    containers, volumes, tolerations, node selectors... kept), else one built from its container; the primary
    container gets the template's image, `env` and resources. kubernetes.py swaps in the worker command."""
    pod_spec: Dict[str, Any] = copy.deepcopy(template.pod_spec) if template.pod_spec else {}
    containers = pod_spec.setdefault("containers", [])
    primary = next((c for c in containers if c.get("name") == template.primary_container_name), None)
    if primary is None:
        primary = {"name": template.primary_container_name}
        containers.insert(0, primary)
    primary["image"] = template.image
    value_from = [e for e in primary.get("env") or [] if e.get("value") is None and e.get("name") not in env]
    primary["env"] = [{"name": k, "value": v} for k, v in sorted(env.items())] + value_from
    if template.resources:
        primary["resources"] = copy.deepcopy(template.resources)
    else:
        primary.pop("resources", None)
    if template.interruptible:  # as propeller's interruptible-tolerations / interruptible-node-selector config
        pod_spec.setdefault("tolerations", []).extend(_json_env(INTERRUPTIBLE_TOLERATIONS_ENV, []))
        for k, v in _json_env(INTERRUPTIBLE_NODE_SELECTOR_ENV, {}).items():
            pod_spec.setdefault("nodeSelector", {}).setdefault(k, v)
    if template.accelerator:
        label = os.environ.get(GPU_NODE_LABEL_ENV, DEFAULT_GPU_NODE_LABEL)
        pod_spec.setdefault("nodeSelector", {}).setdefault(label, template.accelerator)
    return pod_spec


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


class PoolManager(PoolRegistry):
    """Creates pools on first use, finds them by key, and reaps the idle ones."""

    def __init__(self, backend: Optional[ReplicaBackend] = None, state_dir: Optional[str] = None):
        super().__init__()
        self.backend = backend or backend_from_env()
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
        return ReplicaPool(
            key.digest,
            self.backend,
            self._spec_maker(key, template),
            template.replica_count,
            template.ttl_seconds,
            name=template.env_name,
        )

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

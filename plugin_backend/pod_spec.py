"""Replica pods, built in one place: the environment's pod spec with propeller's defaults (`replica_pod_spec`, once
per pool), then each replica's pod and its token Secret (`replica_pod`, `token_secret`).

Connector-level defaults are read from the environment, as propeller reads its `k8s` plugin config:
FLYTE_ACTOR_K8S_DEFAULT_CPU / _DEFAULT_MEMORY (propeller's default-cpus / default-memory), _DEFAULT_ENV_VARS (JSON
object), _DEFAULT_TOLERATIONS (JSON list), _DEFAULT_NODE_SELECTOR (JSON object), _INTERRUPTIBLE_TOLERATIONS,
_INTERRUPTIBLE_NODE_SELECTOR and _GPU_NODE_LABEL.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, List, Optional

from flytekitplugins_actor.replica.backend import ReplicaSpec
from flytekitplugins_actor.replica.protocol import TOKEN_ENV

WORKER_PORT = 8777
MANAGED_BY = "flyte-actor-connector"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_REPLICA = "flyte-actor/replica"
LABEL_POOL = "flyte-actor/pool"
TOKEN_KEY = "token"
GPU_RESOURCE = "nvidia.com/gpu"
PRIMARY_ANNOTATION = "kubectl.kubernetes.io/default-container"
"""Which container `kubectl logs` shows: the replica's worker."""
ORPHAN_TIMEOUT_ENV = "FLYTE_ACTOR_ORPHAN_TIMEOUT_S"
ORPHAN_MARGIN_S = 60
"""A replica that hears from no connector for its environment's ttl_seconds plus this margin exits on its own."""

GPU_NODE_LABEL_ENV = "FLYTE_ACTOR_K8S_GPU_NODE_LABEL"
DEFAULT_GPU_NODE_LABEL = "k8s.amazonaws.com/accelerator"  # propeller's default gpu-device-node-label
INTERRUPTIBLE_TOLERATIONS_ENV = "FLYTE_ACTOR_K8S_INTERRUPTIBLE_TOLERATIONS"
INTERRUPTIBLE_NODE_SELECTOR_ENV = "FLYTE_ACTOR_K8S_INTERRUPTIBLE_NODE_SELECTOR"
DEFAULT_CPU_ENV = "FLYTE_ACTOR_K8S_DEFAULT_CPU"
DEFAULT_MEMORY_ENV = "FLYTE_ACTOR_K8S_DEFAULT_MEMORY"
DEFAULT_ENV_VARS_ENV = "FLYTE_ACTOR_K8S_DEFAULT_ENV_VARS"
DEFAULT_TOLERATIONS_ENV = "FLYTE_ACTOR_K8S_DEFAULT_TOLERATIONS"
DEFAULT_NODE_SELECTOR_ENV = "FLYTE_ACTOR_K8S_DEFAULT_NODE_SELECTOR"


def _json_env(name: str, default: Any) -> Any:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{name} must be a JSON {type(default).__name__}, got {raw!r}: {e}") from None
    if not isinstance(value, type(default)):
        raise ValueError(f"{name} must be a JSON {type(default).__name__}, got {raw!r}")
    return value


def _quantity_env(name: str, default: str) -> str:
    raw = os.environ.get(name) or default
    try:
        _q(raw)
    except ValueError:
        raise ValueError(f"{name} must be a Kubernetes quantity such as 500m or 1Gi, got {raw!r}") from None
    return raw


@dataclass(frozen=True)
class PodDefaults:
    """The connector's pod defaults, with propeller's default values (default-cpus 1000m, default-memory 1024Mi)."""

    cpu: str = "1000m"
    memory: str = "1024Mi"
    env: Dict[str, str] = field(default_factory=dict)
    tolerations: List[dict] = field(default_factory=list)
    node_selector: Dict[str, str] = field(default_factory=dict)
    interruptible_tolerations: List[dict] = field(default_factory=list)
    interruptible_node_selector: Dict[str, str] = field(default_factory=dict)
    gpu_node_label: str = DEFAULT_GPU_NODE_LABEL

    @classmethod
    def from_env(cls) -> "PodDefaults":
        """Reads and checks the FLYTE_ACTOR_K8S_* settings: a malformed one is refused naming the variable."""
        return cls(
            cpu=_quantity_env(DEFAULT_CPU_ENV, cls.cpu),
            memory=_quantity_env(DEFAULT_MEMORY_ENV, cls.memory),
            env={str(k): str(v) for k, v in _json_env(DEFAULT_ENV_VARS_ENV, {}).items()},
            tolerations=_json_env(DEFAULT_TOLERATIONS_ENV, []),
            node_selector={str(k): str(v) for k, v in _json_env(DEFAULT_NODE_SELECTOR_ENV, {}).items()},
            interruptible_tolerations=_json_env(INTERRUPTIBLE_TOLERATIONS_ENV, []),
            interruptible_node_selector=_json_env(INTERRUPTIBLE_NODE_SELECTOR_ENV, {}),
            gpu_node_label=os.environ.get(GPU_NODE_LABEL_ENV, DEFAULT_GPU_NODE_LABEL),
        )


def resolve_resources(resources: Dict[str, Dict[str, str]], defaults: PodDefaults) -> Dict[str, Dict[str, str]]:
    """Requests and limits that are always set, as propeller's flytek8s sets a task pod's: cpu and memory default
    to the connector's defaults; a missing request is the limit, a missing limit is the request, and a request
    above its limit is lowered to it. Extended resources (a GPU) keep request = limit."""
    requests = dict((resources or {}).get("requests") or {})
    limits = dict((resources or {}).get("limits") or {})
    for name, default in (("cpu", defaults.cpu), ("memory", defaults.memory)):
        request = requests.get(name) or limits.get(name) or default
        limit = limits.get(name) or request
        if _q(request) > _q(limit):
            request = limit
        requests[name], limits[name] = request, limit
    for name in set(requests) | set(limits):
        if name not in ("cpu", "memory", "ephemeral-storage"):  # extended resources: request must equal limit
            requests[name] = limits[name] = limits.get(name) or requests[name]
    return {"requests": dict(sorted(requests.items())), "limits": dict(sorted(limits.items()))}


def _q(value: str) -> Decimal:
    # imported here: every process that imports flytekit loads this package (its plugin entry point), and the
    # kubernetes client costs ~0.4 s to import; only a connector building pods needs it
    from kubernetes.utils.quantity import parse_quantity

    return parse_quantity(value)


def replica_pod_spec(
    template: Any, env: Dict[str, str], defaults: Optional[PodDefaults] = None, ttl_seconds: Optional[int] = None
) -> Dict[str, Any]:
    """An environment's replica pod spec: the task's own k8s_pod spec when its environment has a pod template (its
    other containers, volumes, tolerations, node selectors... kept), else one built from its container. The primary
    container gets the template's image, `env` over the connector's default env vars, and resources that are always
    set; GPU, interruptible and default tolerations and node selectors are added as propeller adds them."""
    defaults = defaults if defaults is not None else PodDefaults.from_env()
    pod_spec: Dict[str, Any] = copy.deepcopy(template.pod_spec) if template.pod_spec else {}
    containers = pod_spec.setdefault("containers", [])
    primary = next((c for c in containers if c.get("name") == template.primary_container_name), None)
    if primary is None:
        primary = {"name": template.primary_container_name}
        containers.insert(0, primary)
    primary["image"] = template.image
    values = {**defaults.env, **env}
    ttl = template.ttl_seconds if ttl_seconds is None else ttl_seconds
    values[ORPHAN_TIMEOUT_ENV] = str(int(ttl) + ORPHAN_MARGIN_S)
    value_from = [e for e in primary.get("env") or [] if e.get("value") is None and e.get("name") not in values]
    primary["env"] = [{"name": k, "value": v} for k, v in sorted(values.items())] + value_from
    primary["resources"] = resolve_resources(template.resources, defaults)
    tolerations = pod_spec.setdefault("tolerations", [])
    node_selector = pod_spec.setdefault("nodeSelector", {})
    tolerations.extend(t for t in defaults.tolerations if t not in tolerations)
    for k, v in defaults.node_selector.items():
        node_selector.setdefault(k, v)
    if template.interruptible:  # as propeller's interruptible-tolerations / interruptible-node-selector config
        tolerations.extend(t for t in defaults.interruptible_tolerations if t not in tolerations)
        for k, v in defaults.interruptible_node_selector.items():
            node_selector.setdefault(k, v)
    if GPU_RESOURCE in primary["resources"]["limits"]:  # GPU nodes are tainted so that only GPU pods land there
        gpu = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        if gpu not in tolerations:
            tolerations.append(gpu)
    if template.accelerator:
        node_selector.setdefault(defaults.gpu_node_label, template.accelerator)
    if not tolerations:
        del pod_spec["tolerations"]
    if not node_selector:
        del pod_spec["nodeSelector"]
    return pod_spec


@dataclass
class PodReplicaSpec(ReplicaSpec):
    """A ReplicaSpec with the pod template's metadata, for the Kubernetes backend."""

    pod_labels: Dict[str, str] = field(default_factory=dict)
    pod_annotations: Dict[str, str] = field(default_factory=dict)


def label_value(v: str) -> str:
    """A string as a valid label value (63 characters of [A-Za-z0-9-_.], alphanumeric at both ends)."""
    v = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(v))[:63]
    return v.strip("-_.") or "x"


def replica_labels(spec: ReplicaSpec) -> Dict[str, str]:
    """The labels that find a replica's pod and Secret: managed-by (the watch's selector), its replica and pool."""
    return {
        **{k: label_value(v) for k, v in getattr(spec, "pod_labels", {}).items()},
        **{k: label_value(v) for k, v in spec.labels.items()},
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_REPLICA: label_value(spec.name),
    }


def replica_pod(spec: ReplicaSpec, pod_name: str, secret_name: str, namespace: str) -> Dict[str, Any]:
    """A replica's pod: the environment's pod spec with the worker as its primary container's command, bound to the
    pod's IP (downward API), the pool token from the Secret, a TCP readiness probe on the control port."""
    pod_spec = copy.deepcopy(spec.pod_spec) if spec.pod_spec else {"containers": [{"name": spec.primary_container}]}
    containers = pod_spec.setdefault("containers", [])
    primary = next((c for c in containers if c.get("name") == spec.primary_container), None)
    if primary is None:
        primary = {"name": spec.primary_container}
        containers.insert(0, primary)
    primary["image"] = spec.image or primary.get("image")
    primary["command"] = ["python", "-m", "flytekitplugins_actor.replica.worker", "--port", str(WORKER_PORT)]
    primary.pop("args", None)
    own = set(spec.env) | {TOKEN_ENV, "FLYTE_ACTOR_HOST", "FLYTE_ACTOR_REPLICA_NAME"}
    env = [e for e in primary.get("env") or [] if e.get("name") not in own]
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    env += [
        {"name": "FLYTE_ACTOR_REPLICA_NAME", "value": spec.name},
        {"name": "FLYTE_ACTOR_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": TOKEN_KEY}}},
    ]
    primary["env"] = env
    primary["ports"] = [{"name": "actor-control", "containerPort": WORKER_PORT}]
    primary["readinessProbe"] = {"tcpSocket": {"port": WORKER_PORT}, "periodSeconds": 1, "failureThreshold": 3}
    pod_spec["restartPolicy"] = "Never"
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    annotations = {**(getattr(spec, "pod_annotations", {}) or {}), PRIMARY_ANNOTATION: spec.primary_container}
    metadata = {"name": pod_name, "namespace": namespace, "labels": replica_labels(spec), "annotations": annotations}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def token_secret(spec: ReplicaSpec, secret_name: str, namespace: str, pod: Dict[str, Any]) -> Dict[str, Any]:
    """The pool token's Secret, owned by its (already created) pod from birth: it goes when the pod goes, and a
    connector crash between the two creations leaves at most a pod that never starts, never a Secret."""
    owner = {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name,
            "namespace": namespace,
            "labels": replica_labels(spec),
            "ownerReferences": [owner],
        },
        "type": "Opaque",
        "stringData": {TOKEN_KEY: spec.token},
    }

"""Replica pods: the `kubernetes` replica backend (FLYTE_ACTOR_BACKEND=kubernetes).

Each replica is a pod running `python -m flytekitplugins_actor.replica.worker --port 8777` in the environment's
image, in the execution's namespace under its service account (pools are keyed by both). The pool token reaches
the pod through a Secret owned by the pod. Readiness comes from the pod's Ready condition and IP; loss from the
primary container's termination (OOMKilled, Error, exit code), pod failure, eviction or deletion.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import uuid
from typing import Any, Dict, Optional

from flytekitplugins_actor.replica.backend import Replica, ReplicaBackend, ReplicaSpec, ReplicaState
from flytekitplugins_actor.replica.protocol import TOKEN_ENV

WORKER_PORT = 8777
MANAGED_BY = "flyte-actor-connector"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "flyte-actor/connector-instance"
LABEL_REPLICA = "flyte-actor/replica"
TOKEN_KEY = "token"
READY_TIMEOUT_ENV = "FLYTE_ACTOR_K8S_READY_TIMEOUT_S"


def _label_value(v: str) -> str:
    v = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(v))[:63]
    return v.strip("-_.") or "x"


def _dns_name(v: str) -> str:
    v = "".join(c if c.isalnum() else "-" for c in v.lower())[:53].strip("-")
    return f"{v}-{uuid.uuid4().hex[:8]}"


class KubernetesReplica(Replica):
    """A replica pod, watched by a thread that polls its status until it is gone."""

    def __init__(self, spec: ReplicaSpec, backend: "KubernetesBackend"):
        super().__init__(spec)
        self.backend = backend
        self.namespace = spec.namespace or backend.namespace
        self.pod_name = _dns_name(spec.name)
        self.secret_name = f"{self.pod_name}-token"
        self._terminating = threading.Event()
        self._terminate_requested = False
        self._thread = threading.Thread(target=self._run, name=f"pod-{self.pod_name}", daemon=True)
        self._thread.start()

    @property
    def log_uri(self) -> str:
        return self.backend.log_template.format(
            namespace=self.namespace, pod=self.pod_name, container=self.spec.primary_container
        )

    # ---- lifecycle thread ----
    def _run(self) -> None:
        try:
            self._create()
        except Exception as e:
            self._set_dead(f"could not be created: {_api_reason(e)}")
            self._cleanup()
            return
        while True:
            try:
                pod = self.backend.api.read_namespaced_pod(self.pod_name, self.namespace)
            except Exception as e:
                if _status(e) == 404:
                    self._set_dead("was terminated (pod deleted)" if self._terminate_requested else "pod was deleted")
                    self._cleanup()
                    return
                pod = None  # API hiccup: keep watching
            if pod is not None:
                death = pod_death(pod, self.spec.primary_container)
                if death is not None:
                    reason, code = death
                    self._set_dead(reason, code)
                    self._delete_pod(0)
                    self._cleanup()
                    return
                if self.state is ReplicaState.STARTING and pod_ready(pod):
                    self._set_ready(f"{pod.status.pod_ip}:{WORKER_PORT}")
            if self._terminating.wait(self.backend.poll_interval):
                self._delete_pod(self._grace)  # the next read sees the pod go (404)
                self._terminating.clear()

    def _create(self) -> None:
        from kubernetes import client

        api, spec = self.backend.api, self.spec
        labels = {
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_INSTANCE: self.backend.instance,
            LABEL_REPLICA: _label_value(spec.name),
            **{k: _label_value(v) for k, v in spec.labels.items()},
        }
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name=self.secret_name, namespace=self.namespace, labels=labels),
            string_data={TOKEN_KEY: spec.token},
            type="Opaque",
        )
        api.create_namespaced_secret(self.namespace, secret)
        pod = self.backend.pod_manifest(spec, self.pod_name, self.secret_name, labels, self.namespace)
        created = api.create_namespaced_pod(self.namespace, pod)
        uid = getattr(getattr(created, "metadata", None), "uid", None)
        if uid:  # the Secret goes away with its pod
            owner = client.V1OwnerReference(api_version="v1", kind="Pod", name=self.pod_name, uid=uid)
            try:
                api.patch_namespaced_secret(
                    self.secret_name, self.namespace, {"metadata": {"ownerReferences": [owner.to_dict()]}}
                )
            except Exception:  # the pod exists but the start failed: delete it too, or nothing ever would
                try:
                    api.delete_namespaced_pod(self.pod_name, self.namespace, grace_period_seconds=0)
                except Exception as e:
                    if _status(e) != 404:
                        logging.getLogger(__name__).warning(
                            "replica pod %s/%s may be left running: %s", self.namespace, self.pod_name, _api_reason(e)
                        )
                raise

    def _delete_pod(self, grace: int) -> None:
        try:
            self.backend.api.delete_namespaced_pod(self.pod_name, self.namespace, grace_period_seconds=grace)
        except Exception:  # already gone (404) or the API is down: the watch loop notices either way
            pass

    def _cleanup(self) -> None:
        try:
            self.backend.api.delete_namespaced_secret(self.secret_name, self.namespace)
        except Exception:
            pass

    _grace = 5

    def terminate(self, grace_seconds: float = 5.0) -> None:
        self._grace = int(grace_seconds)
        self._terminate_requested = True
        if self.state is not ReplicaState.DEAD:
            self._terminating.set()


def pod_ready(pod: Any) -> bool:
    status = pod.status
    if status is None or status.phase != "Running" or not status.pod_ip:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def pod_death(pod: Any, container: str):
    """(reason, exit code) when the pod or its primary container is gone for good, else None."""
    status = pod.status
    if status is None:
        return None
    if getattr(pod.metadata, "deletion_timestamp", None) is not None and status.phase not in ("Running", "Pending"):
        return "pod was deleted", None
    for cs in status.container_statuses or []:
        if cs.name != container:
            continue
        term = cs.state.terminated if cs.state is not None else None
        if term is not None:
            reason = term.reason or "Error"
            detail = f" ({term.message.strip()})" if term.message else ""
            return f"container {container} terminated: {reason}, exit code {term.exit_code}{detail}", term.exit_code
        waiting = cs.state.waiting if cs.state is not None else None
        if waiting is not None and waiting.reason in (
            "ErrImagePull",
            "ImagePullBackOff",
            "InvalidImageName",
            "CreateContainerError",
        ):
            return f"container {container} cannot start: {waiting.reason}: {waiting.message or ''}".rstrip(": "), None
    if status.phase in ("Failed", "Succeeded"):
        return f"pod {status.phase.lower()}: {status.reason or ''} {status.message or ''}".strip(), None
    return None


def _status(e: Exception) -> Optional[int]:
    return getattr(e, "status", None)


def _api_reason(e: Exception) -> str:
    return f"{getattr(e, 'status', '')} {getattr(e, 'reason', '') or e}".strip()


class KubernetesBackend(ReplicaBackend):
    """Replicas as pods. `api` is a kubernetes CoreV1Api (in-cluster or kubeconfig when omitted)."""

    name = "kubernetes"
    ready_timeout_s: float = 600.0
    """A pod may take minutes to be ready: scheduling, node scale-up, pulling a large (GPU) image."""

    def __init__(
        self,
        api: Any = None,
        namespace: str = "default",
        poll_interval: float = 1.0,
        log_template: str = "k8s://{namespace}/{pod}/{container}",
        instance: Optional[str] = None,
        ready_timeout_s: Optional[float] = None,
    ):
        if api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api = client.CoreV1Api()
        self.api = api
        self.namespace = namespace
        self.poll_interval = poll_interval
        self.log_template = log_template
        self.instance = instance or uuid.uuid4().hex[:12]
        if ready_timeout_s is not None:
            self.ready_timeout_s = ready_timeout_s

    @classmethod
    def from_env(cls) -> "KubernetesBackend":
        backend = cls(
            namespace=os.environ.get("FLYTE_ACTOR_K8S_NAMESPACE", "default"),
            poll_interval=float(os.environ.get("FLYTE_ACTOR_K8S_POLL_S", "1.0")),
            log_template=os.environ.get("FLYTE_ACTOR_K8S_LOG_TEMPLATE", "k8s://{namespace}/{pod}/{container}"),
            ready_timeout_s=float(os.environ.get(READY_TIMEOUT_ENV, cls.ready_timeout_s)),
        )
        try:
            backend.delete_orphans()
        except Exception as e:  # e.g. no cluster-wide list permission: serve anyway, say what is left running
            logging.getLogger(__name__).warning(
                "could not delete replica pods of previous connector instances: %s", _api_reason(e)
            )
        return backend

    def start(self, spec: ReplicaSpec) -> Replica:
        return KubernetesReplica(spec, self)

    def delete_orphans(self) -> int:
        """Deletes replica pods a previous connector instance left: their executions already answer
        RETRYABLE_FAILED from storage, so letting them run on would run those executions twice."""
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_INSTANCE}!={self.instance}"
        pods = self.api.list_pod_for_all_namespaces(label_selector=selector).items
        for pod in pods:
            try:
                self.api.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
            except Exception:
                pass
        return len(pods)

    def pod_manifest(
        self, spec: ReplicaSpec, pod_name: str, secret_name: str, labels: Dict[str, str], namespace: str
    ) -> dict:
        """The replica pod: the environment's pod spec (image, resources, env) with the worker as its command."""
        pod_spec = copy.deepcopy(spec.pod_spec) if spec.pod_spec else {"containers": [{"name": spec.primary_container}]}
        containers = pod_spec.setdefault("containers", [])
        primary = next((c for c in containers if c.get("name") == spec.primary_container), None)
        if primary is None:
            primary = {"name": spec.primary_container}
            containers.insert(0, primary)
        primary["image"] = spec.image or primary.get("image")  # resources, volume mounts... stay as the spec has them
        primary["command"] = ["python", "-m", "flytekitplugins_actor.replica.worker", "--port", str(WORKER_PORT)]
        primary.pop("args", None)
        env = [e for e in primary.get("env") or [] if e.get("name") not in spec.env and e.get("name") != TOKEN_ENV]
        env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
        env += [
            {"name": "FLYTE_ACTOR_REPLICA_NAME", "value": spec.name},
            {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": TOKEN_KEY}}},
        ]
        primary["env"] = env
        primary["ports"] = [{"name": "actor-control", "containerPort": WORKER_PORT}]
        primary["readinessProbe"] = {"tcpSocket": {"port": WORKER_PORT}, "periodSeconds": 1}
        pod_spec["restartPolicy"] = "Never"
        if spec.service_account:
            pod_spec["serviceAccountName"] = spec.service_account
        metadata: Dict[str, Any] = {
            "name": pod_name,
            "namespace": namespace,
            "labels": {**{k: _label_value(v) for k, v in getattr(spec, "pod_labels", {}).items()}, **labels},
        }
        annotations = dict(getattr(spec, "pod_annotations", {}) or {})
        if annotations:
            metadata["annotations"] = annotations
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}

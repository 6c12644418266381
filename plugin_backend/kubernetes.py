"""Replica pods: the `kubernetes` replica backend (FLYTE_ACTOR_BACKEND=kubernetes).

Each replica is a pod running the worker in the environment's image, in the execution's namespace under its
service account (pools are keyed by both), built by plugin_backend.pod_spec. The pool token reaches the pod
through a Secret its pod owns. One label-selected watch per namespace (resumed from its last resource version,
relisted after 410 Gone) reports every replica pod's state; one supervisor thread deletes pods and keeps the
deadlines (a replica not ready for too long is lost). A restarted connector adopts the live replicas of its
previous instance (`live_replicas`), busy ones included (their pool re-attaches the execution they run, so a
connector restart loses no work), and deletes the ones no pool claims within their orphan timeout.

Deaths are classified (`DeathCause`): the container's own end (exit code, signal, OOMKilled) is TASK, or START
when it never was ready (image pull and config errors too); a pod deleted, evicted or lost with its node is
INFRASTRUCTURE. A dead replica whose end was not seen yet (a pod being deleted, a pod on a lost node) is followed
until the API server no longer has its pod or reports its containers terminated (`Replica.wait_exited`), for at most
`exit_confirm_s`: only then may its pool run the execution again. Such a pod is deleted gracefully, never forced, so
its object goes only once its kubelet (or the node lifecycle, for a node gone for good) confirms the end.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from flytekit.loggers import logger

from flytekitplugins_actor.replica.backend import DeathCause, Replica, ReplicaBackend, ReplicaSpec, ReplicaState
from flytekitplugins_actor.replica.protocol import TOKEN_ENV
from plugin_backend.pod_spec import (
    LABEL_MANAGED_BY,
    LABEL_POOL,
    MANAGED_BY,
    ORPHAN_TIMEOUT_ENV,
    PRIMARY_ANNOTATION,
    TOKEN_KEY,
    WORKER_PORT,
    PodDefaults,
    replica_pod,
    token_secret,
)

READY_TIMEOUT_ENV = "FLYTE_ACTOR_K8S_READY_TIMEOUT_S"
NOT_READY_GRACE_ENV = "FLYTE_ACTOR_K8S_NOT_READY_GRACE_S"
SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
MAX_RETRY_S = 30.0
"""The longest pause between attempts of a failing watch (doubling from one second)."""
START_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerError", "ErrImageNeverPull")
"""Waiting reasons that mean the container will not start without a change to the environment: fail fast."""
CONFIG_ERROR = "CreateContainerConfigError"
"""Also a start failure, but only once it lasts: the pod's Secret is created right after the pod."""
EXIT_CONFIRM_ENV = "FLYTE_ACTOR_K8S_EXIT_CONFIRM_S"
FOLLOW_MARGIN_S = 5.0
"""A dead replica's pod is followed this much longer than its pool waits for its end (the pool starts waiting a
moment after the death)."""


def _dns_name(v: str) -> str:
    v = "".join(c if c.isalnum() else "-" for c in v.lower())[:53].strip("-")
    return f"{v}-{uuid.uuid4().hex[:8]}"


def _api_reason(e: Exception) -> str:
    """An API error as the server words it (its Status message), else the exception."""
    body = getattr(e, "body", None)
    if body:
        try:
            return f"{e.status} {json.loads(body)['message']}"
        except (ValueError, KeyError, TypeError):
            pass
    status = getattr(e, "status", None)
    return f"{status} {getattr(e, 'reason', '')}".strip() if status else repr(e)


def _status(e: Exception) -> Optional[int]:
    return getattr(e, "status", None)


def _condition(pod: dict, kind: str) -> Optional[dict]:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def _env_value(pod: dict, container: str, name: str) -> Optional[dict]:
    for c in pod["spec"]["containers"]:
        if c["name"] == container:
            return next((e for e in c.get("env") or [] if e["name"] == name), None)
    return None


class KubernetesReplica(Replica):
    """A replica pod. Its state comes from its namespace's watch (`observe`) and the supervisor's clock (`tick`)."""

    def __init__(self, spec: ReplicaSpec, backend: "KubernetesBackend", pod_name: Optional[str] = None):
        super().__init__(spec)
        self.backend = backend
        self.namespace = spec.namespace or backend.namespace
        self.pod_name = pod_name or _dns_name(spec.name)
        self.secret_name = f"{self.pod_name}-token"
        self.created_rv: Optional[int] = None  # the pod's creation version: a relist older than it may miss it
        self._terminate_requested = False
        self._was_ready = False
        self._not_ready_since: Optional[float] = None
        self._config_error_since: Optional[float] = None
        self._deleting = False
        self._follow_until: Optional[float] = None  # dead, its end not seen yet: followed until then

    @property
    def log_uri(self) -> str:
        return self.backend.log_template.format(
            namespace=self.namespace, pod=self.pod_name, container=self.spec.primary_container
        )

    def terminate(self, grace_seconds: float = 5.0) -> None:
        """Deletes the pod (the kubelet sends SIGTERM, SIGKILL after the grace); the supervisor makes the call."""
        self._terminate_requested = True
        self._delete(int(grace_seconds))

    def _delete(self, grace: Optional[int]) -> None:
        """Asks for the pod's deletion, once: a dead replica's pod must not linger whoever noticed the death.
        `grace` None: the pod's own terminationGracePeriodSeconds."""
        with self._cond:
            if self._deleting:
                return
            self._deleting = True
        self.backend._delete_later(self, grace)

    # ---- state, from the watch and the clock ----
    def observe(self, pod: Optional[dict]) -> None:
        """A new state of the pod (None: it is gone)."""
        if self.state is ReplicaState.DEAD:
            self._observe_after_death(pod)
            return
        if pod is None:
            if self._terminate_requested:
                self._die("was terminated (pod deleted)", None, DeathCause.TASK, exited=True)
            else:
                self._die("pod was deleted by someone else", None, DeathCause.INFRASTRUCTURE, exited=True)
            return
        meta, status = pod["metadata"], pod.get("status") or {}
        if status.get("phase") == "Failed" and status.get("reason") == "Evicted":
            # read before its containers' end: the kubelet stopped them (node pressure), not the task
            evicted = f"pod was evicted: {status.get('message', '')}".rstrip(": ")
            self._die(evicted, None, DeathCause.INFRASTRUCTURE, exited=True)
            return
        if meta.get("deletionTimestamp"):
            if self._terminate_requested:
                self._die("was terminated (pod deleted)", None, DeathCause.TASK, delete=False)
                return
            disruption = _condition(pod, "DisruptionTarget")
            why = f" ({disruption.get('reason')})" if disruption else ""
            self._die(f"pod is being deleted by someone else{why}", None, DeathCause.INFRASTRUCTURE, delete=False)
            return
        primary = self.spec.primary_container
        self.waiting_reason = None  # recomputed from each state: a scheduled pod no longer waits for the scheduler
        for cs in status.get("containerStatuses") or []:
            if cs["name"] != primary:
                continue
            state = cs.get("state") or {}
            term, waiting = state.get("terminated"), state.get("waiting")
            if term is not None:
                detail = f" ({term['message'].strip()})" if term.get("message") else ""
                cause = DeathCause.TASK if self._was_ready else DeathCause.START
                reason = (
                    f"container {primary} terminated: {term.get('reason') or 'Error'}, exit code {term['exitCode']}"
                )
                self._die(reason + detail, term["exitCode"], cause, exited=True)
                return
            if waiting is not None and waiting.get("reason") in START_FAILURES:
                self._die(
                    f"cannot start: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": "),
                    None,
                    DeathCause.START,
                )
                return
            if waiting is not None and waiting.get("reason") == CONFIG_ERROR:
                self.waiting_reason = f"{CONFIG_ERROR}: {waiting.get('message', '')}"
                if self._config_error_since is None:
                    self._config_error_since = time.monotonic()
                return
            self._config_error_since = None
        if status.get("phase") in ("Failed", "Succeeded"):
            cause = DeathCause.TASK if self._was_ready else DeathCause.START
            self._die(
                f"pod {status['phase'].lower()}: {status.get('reason', '')} {status.get('message', '')}".rstrip(),
                None,
                cause,
                exited=True,
            )
            return
        scheduled = _condition(pod, "PodScheduled")
        if scheduled is not None and scheduled.get("status") == "False":
            self.waiting_reason = f"{scheduled.get('reason', 'Unschedulable')}: {scheduled.get('message', '')}".rstrip(
                ": "
            )
            return
        ready = _condition(pod, "Ready")
        if ready is not None and ready.get("status") == "True" and status.get("podIP"):
            self._not_ready_since = None
            self._was_ready = True
            self._set_ready(f"{status['podIP']}:{WORKER_PORT}")
        elif self._was_ready and self._not_ready_since is None:
            self._not_ready_since = time.monotonic()  # the node may be gone: tick() decides after the grace

    def _observe_after_death(self, pod: Optional[dict]) -> None:
        """A dead replica's pod, followed until its end is seen: the pod object gone (its kubelet confirmed the end,
        or the node lifecycle force-deleted it with its node), or its containers reported terminated."""
        if pod is None or _ended(pod, self.spec.primary_container):
            logger.info(f"replica pod {self.namespace}/{self.pod_name} is seen ended")
            self._set_exited()
            self.backend._forget(self)

    def tick(self, now: float) -> None:
        """Deadlines no event will announce: lost readiness (a lost node), a lasting config error, and the end of
        following a dead replica whose end was not seen."""
        if self.state is ReplicaState.DEAD:
            if self._follow_until is not None and now > self._follow_until:
                logger.warning(
                    f"replica pod {self.namespace}/{self.pod_name}: its end was not seen within "
                    f"{self.backend.exit_confirm_s:g}s of its death; no longer following it"
                )
                self.backend._forget(self)
            return
        since = self._not_ready_since
        if since is not None and now - since > self.backend.not_ready_grace_s:
            self._die(
                f"pod not ready for {now - since:.0f}s after it was ready (node lost or unresponsive)",
                None,
                DeathCause.INFRASTRUCTURE,
            )
        since = self._config_error_since
        if since is not None and now - since > self.backend.config_error_grace_s:
            self._die(f"cannot start: {self.waiting_reason}", None, DeathCause.START)

    def _die(
        self, reason: str, exit_code: Optional[int], cause: DeathCause, delete: bool = True, exited: bool = False
    ) -> None:
        """`exited`: the pod or its container is seen ended (not only being deleted, or on a node gone silent).
        A pod not seen ended stays followed (see `_observe_after_death`) and is deleted gracefully: forcing it
        would remove its object while its process may still run, on a node that stopped answering."""
        if self.state is ReplicaState.DEAD:
            return
        logger.info(f"replica pod {self.namespace}/{self.pod_name} {reason} ({cause.value})")
        if not exited:
            self._follow_until = time.monotonic() + self.backend.exit_confirm_s + FOLLOW_MARGIN_S
        self._set_dead(reason, exit_code, cause, exited=exited)
        if exited:
            self.backend._forget(self)
        if delete:
            self._delete(0 if exited or cause is DeathCause.START else None)


class _NamespaceWatch:
    """One label-selected watch of the replica pods of a namespace: list once, then watch from the list's resource
    version, resume from the last one seen; relist after 410 Gone."""

    def __init__(self, backend: "KubernetesBackend", namespace: str):
        self.backend, self.namespace = backend, namespace
        self.resource_version: Optional[str] = None
        self.thread = threading.Thread(target=self._run, name=f"k8s-watch-{namespace}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        backend, api = self.backend, self.backend.api
        delay = backend.retry_s
        while not backend._stop.is_set():
            try:
                if self.resource_version is None:
                    self._relist()
                w = watch.Watch()
                stream = w.stream(
                    api.list_namespaced_pod,
                    self.namespace,
                    label_selector=SELECTOR,
                    resource_version=self.resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=backend.watch_timeout_s,
                    _request_timeout=(10, backend.watch_timeout_s + 60),
                )
                for event in stream:  # deserialized (the client's 410 handling needs it); the raw dict is used
                    delay = backend.retry_s
                    obj = event["raw_object"]
                    self.resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    backend._observe(
                        self.namespace, obj["metadata"]["name"], None if event["type"] == "DELETED" else obj
                    )
                    if backend._stop.is_set():
                        w.stop()
            except ApiException as e:
                if e.status == 410:
                    logger.info(f"replica pod watch of {self.namespace}: resource version expired, relisting")
                    self.resource_version = None
                    continue
                logger.warning(
                    f"replica pod watch of {self.namespace} failed: {_api_reason(e)}; retrying in {delay:.0f}s"
                )
                backend._stop.wait(delay)
                delay = min(MAX_RETRY_S, delay * 2)  # e.g. 403: no RBAC in this namespace; do not hammer the API
            except Exception as e:  # connection reset, timeout, API server restart: resume from the last version
                logger.warning(f"replica pod watch of {self.namespace} interrupted: {e!r}; resuming in {delay:.0f}s")
                backend._stop.wait(delay)
                delay = min(MAX_RETRY_S, delay * 2)

    def _relist(self) -> None:
        resp = self.backend.api.list_namespaced_pod(
            self.namespace, label_selector=SELECTOR, _preload_content=False, _request_timeout=30
        )
        listing = json.loads(resp.data)
        version = listing["metadata"]["resourceVersion"]
        pods = {p["metadata"]["name"]: p for p in listing["items"]}
        for replica in self.backend._replicas_in(self.namespace):
            pod = pods.get(replica.pod_name)
            if pod is not None:
                replica.observe(pod)
            elif replica.created_rv is not None and _version_at_least(version, replica.created_rv):
                replica.observe(None)  # created before this listing, absent from it: deleted meanwhile
        self.resource_version = version


def _ended(pod: dict, primary: str) -> bool:
    """The pod's end is seen: a terminal phase, or its primary container reported terminated."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return True
    return any(
        cs["name"] == primary and (cs.get("state") or {}).get("terminated") is not None
        for cs in status.get("containerStatuses") or []
    )


def _finished(pod: dict) -> bool:
    """Ended or ending: nothing to adopt."""
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or bool(
        pod["metadata"].get("deletionTimestamp")
    )


def _version_at_least(version: str, created: int) -> bool:
    try:  # resource versions are opaque to clients; etcd's are integers, which is all this ordering needs
        return int(version) >= created
    except ValueError:
        return False


class KubernetesBackend(ReplicaBackend):
    """Replicas as pods. `api` is a kubernetes CoreV1Api (in-cluster config, else the kubeconfig, when omitted)."""

    ready_timeout_s: float = 600.0
    """A pod may take minutes to be ready: scheduling, node scale-up, pulling a large (GPU) image."""
    death_report_grace_s: float = 60.0
    """A lost node's pod is reported dead only after the kubelet's node-status grace (~40 s) plus not_ready_grace_s."""
    exit_confirm_s: float = 45.0
    """A pod deleted by someone else has its terminationGracePeriodSeconds (30 s by default) to stop before its
    kubelet confirms; a pod on a lost node goes when the node lifecycle force-deletes it. Past this bound the execution
    ends RETRYABLE_FAILED (still within 60 s of the death) instead of being dispatched again."""

    def __init__(
        self,
        api: Any = None,
        namespace: str = "default",
        log_template: str = "k8s://{namespace}/{pod}/{container}",
        ready_timeout_s: Optional[float] = None,
        not_ready_grace_s: float = 20.0,
        config_error_grace_s: float = 20.0,
        watch_timeout_s: int = 300,
        exit_confirm_s: Optional[float] = None,
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
        self.log_template = log_template
        if ready_timeout_s is not None:
            self.ready_timeout_s = ready_timeout_s
        if exit_confirm_s is not None:
            self.exit_confirm_s = exit_confirm_s
        self.not_ready_grace_s = not_ready_grace_s
        self.config_error_grace_s = config_error_grace_s
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = 1.0
        self._lock = threading.Lock()
        self._replicas: Dict[Tuple[str, str], KubernetesReplica] = {}
        self._watches: Dict[str, _NamespaceWatch] = {}
        self._unclaimed: Dict[str, List[Tuple[dict, float]]] = {}  # pool digest -> [(pod, deadline)]
        self._deletions: "queue.Queue[Tuple[str, str, Optional[int]]]" = queue.Queue()
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="k8s-replica-supervisor", daemon=True)
        self._supervisor.start()

    @classmethod
    def from_env(cls) -> "KubernetesBackend":
        """The connector's backend: settings from FLYTE_ACTOR_K8S_* (a malformed pod default is refused now, not
        at the first pod), then the inventory of the replica pods a previous connector left for adoption."""
        PodDefaults.from_env()
        backend = cls(
            namespace=os.environ.get("FLYTE_ACTOR_K8S_NAMESPACE", "default"),
            log_template=os.environ.get("FLYTE_ACTOR_K8S_LOG_TEMPLATE", "k8s://{namespace}/{pod}/{container}"),
            ready_timeout_s=float(os.environ.get(READY_TIMEOUT_ENV, cls.ready_timeout_s)),
            not_ready_grace_s=float(os.environ.get(NOT_READY_GRACE_ENV, "20")),
            exit_confirm_s=float(os.environ.get(EXIT_CONFIRM_ENV, cls.exit_confirm_s)),
        )
        try:
            backend.take_inventory()
        except Exception as e:  # e.g. no cluster-wide list permission: serve anyway, say what is not adopted
            logger.warning(f"could not list the replica pods of a previous connector instance: {_api_reason(e)}")
        return backend

    # ---- starting ----
    def start(self, spec: ReplicaSpec) -> Replica:
        """Creates the pod, then its token Secret owned by it; the namespace's watch reports the rest."""
        replica = KubernetesReplica(spec, self)
        ns = replica.namespace
        with self._lock:
            self._replicas[(ns, replica.pod_name)] = replica
        self._watch(ns)
        try:
            created = self.api.create_namespaced_pod(
                ns, replica_pod(spec, replica.pod_name, replica.secret_name, ns), _request_timeout=30
            )
        except Exception as e:
            self._forget(replica)
            raise RuntimeError(f"replica pod {ns}/{replica.pod_name} could not be created: {_api_reason(e)}") from None
        pod = {"metadata": {"name": created.metadata.name, "uid": created.metadata.uid}}
        replica.created_rv = (
            int(created.metadata.resource_version) if created.metadata.resource_version.isdigit() else None
        )
        try:
            self.api.create_namespaced_secret(ns, token_secret(spec, replica.secret_name, ns, pod), _request_timeout=30)
        except Exception as e:
            replica._die(
                f"could not be started: its token Secret was refused: {_api_reason(e)}", None, DeathCause.START
            )
        return replica

    def _watch(self, namespace: str) -> None:
        with self._lock:
            if namespace not in self._watches:
                self._watches[namespace] = _NamespaceWatch(self, namespace)

    def _replicas_in(self, namespace: str) -> List[KubernetesReplica]:
        with self._lock:
            return [r for (ns, _), r in self._replicas.items() if ns == namespace]

    def _observe(self, namespace: str, pod_name: str, pod: Optional[dict]) -> None:
        with self._lock:
            replica = self._replicas.get((namespace, pod_name))
        if replica is not None:
            replica.observe(pod)
            if pod is None:
                self._forget(replica)
        else:  # a pod of another connector, of a dead replica, or one waiting to be adopted
            self._update_unclaimed(namespace, pod_name, pod)

    def _forget(self, replica: KubernetesReplica) -> None:
        with self._lock:
            if self._replicas.get((replica.namespace, replica.pod_name)) is replica:
                del self._replicas[(replica.namespace, replica.pod_name)]

    # ---- the supervisor: deletions and deadlines ----
    def _delete_later(self, replica: KubernetesReplica, grace: Optional[int]) -> None:
        self._deletions.put((replica.namespace, replica.pod_name, grace))

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                ns, name, grace = self._deletions.get(timeout=1.0)
                self._delete_pod(ns, name, grace)
            except queue.Empty:
                pass
            now = time.monotonic()
            with self._lock:
                replicas = list(self._replicas.values())
            for r in replicas:
                r.tick(now)
            self._expire_unclaimed(now)

    def _delete_pod(self, namespace: str, name: str, grace: Optional[int]) -> None:
        """Deletes a pod: `grace` 0 removes its object at once (for a pod seen ended, or that never ran), None
        leaves it to the pod's terminationGracePeriodSeconds."""
        try:
            self.api.delete_namespaced_pod(name, namespace, grace_period_seconds=grace, _request_timeout=30)
        except Exception as e:
            if _status(e) != 404:
                logger.warning(f"could not delete replica pod {namespace}/{name}: {_api_reason(e)}")
                return
            with self._lock:
                replica = self._replicas.get((namespace, name))
            if replica is not None:
                replica.observe(None)
                self._forget(replica)

    # ---- adoption ----
    def take_inventory(self) -> int:
        """At start: the live replica pods of a previous connector wait to be claimed by their pool
        (`live_replicas`); dead or terminating ones are deleted. Returns how many wait."""
        resp = self.api.list_pod_for_all_namespaces(
            label_selector=SELECTOR, _preload_content=False, _request_timeout=30
        )
        waiting = 0
        for pod in json.loads(resp.data)["items"]:
            waiting += self._claimable(pod)
        return waiting

    def _claimable(self, pod: dict) -> int:
        meta = pod["metadata"]
        digest = (meta.get("labels") or {}).get(LABEL_POOL)
        ns, name = meta["namespace"], meta["name"]
        if not digest or _finished(pod):
            self._deletions.put((ns, name, 0))
            return 0
        primary = (meta.get("annotations") or {}).get(PRIMARY_ANNOTATION, "primary")
        timeout = (_env_value(pod, primary, ORPHAN_TIMEOUT_ENV) or {}).get("value") or "960"
        with self._lock:
            self._unclaimed.setdefault(digest, []).append((pod, time.monotonic() + float(timeout)))
        self._watch(ns)
        return 1

    def _update_unclaimed(self, namespace: str, name: str, pod: Optional[dict]) -> None:
        """Keeps a pod waiting for adoption current; one that ended meanwhile is deleted instead."""
        with self._lock:
            for digest, pods in self._unclaimed.items():
                for i, (p, deadline) in enumerate(pods):
                    if p["metadata"]["namespace"] == namespace and p["metadata"]["name"] == name:
                        if pod is None or _finished(pod):
                            del pods[i]
                            break
                        pods[i] = (pod, deadline)
                        return
                else:
                    continue
                break
            else:
                return
        if pod is not None:
            self._deletions.put((namespace, name, 0))

    def _expire_unclaimed(self, now: float) -> None:
        with self._lock:
            expired = [(d, p) for d, ps in self._unclaimed.items() for p, deadline in ps if deadline <= now]
            for d, p in expired:
                self._unclaimed[d] = [(q, t) for q, t in self._unclaimed[d] if q is not p]
        for _, pod in expired:
            logger.info(
                f"deleting replica pod {pod['metadata']['namespace']}/{pod['metadata']['name']}: no pool claimed it"
            )
            self._delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"], 0)

    def live_replicas(self, pool_digest: str) -> Tuple[Optional[str], List[Replica]]:
        """The pool token and the replicas a previous connector left for a pool, now this backend's (a pool calls
        it once, when it is created, and serves with that token). (None, []) when there are none."""
        with self._lock:
            pods = [p for p, _ in self._unclaimed.pop(pool_digest, [])]
        token: Optional[str] = None
        adopted: List[Replica] = []
        for pod in pods:
            meta = pod["metadata"]
            ns, name = meta["namespace"], meta["name"]
            primary = (meta.get("annotations") or {}).get(PRIMARY_ANNOTATION, "primary")
            try:
                ref = _env_value(pod, primary, TOKEN_ENV)["valueFrom"]["secretKeyRef"]
                secret = self.api.read_namespaced_secret(ref["name"], ns, _request_timeout=30)
                pod_token = base64.b64decode(secret.data[ref.get("key", TOKEN_KEY)]).decode()
            except Exception as e:
                logger.warning(f"replica pod {ns}/{name} cannot be adopted (no readable token: {e!r}); deleting it")
                self._deletions.put((ns, name, 0))
                continue
            if token is not None and pod_token != token:
                self._deletions.put((ns, name, 0))
                continue
            token = pod_token
            replica_name = (_env_value(pod, primary, "FLYTE_ACTOR_REPLICA_NAME") or {}).get("value") or name
            spec = ReplicaSpec(
                name=replica_name,
                token=pod_token,
                labels=dict(meta.get("labels") or {}),
                namespace=ns,
                service_account=pod["spec"].get("serviceAccountName"),
                primary_container=primary,
            )
            replica = KubernetesReplica(spec, self, pod_name=name)
            replica.secret_name = ref["name"]
            version = meta.get("resourceVersion", "")
            replica.created_rv = int(version) if version.isdigit() else None  # a relist after it must show it
            with self._lock:
                self._replicas[(ns, name)] = replica
            replica.observe(pod)
            adopted.append(replica)
        return token, adopted

    def shutdown(self) -> None:
        """Stops the watches and the supervisor (replica pods stay: a restarted connector adopts them)."""
        self._stop.set()
        self._supervisor.join(5)

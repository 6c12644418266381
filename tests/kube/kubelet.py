"""The stand-in's node: a scheduler and a kubelet in one thread. Each pod gets its own 127.a.b.N, its primary
container's command runs as a local process with its env resolved, its readiness probe is run for real, and its
status is reported as a kubelet reports it. Fault switches: OOM kill, node-pressure eviction, node loss, image pull
failure, unschedulable."""

from __future__ import annotations

import base64
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from kubernetes.utils.quantity import parse_quantity

from .store import ApiError, Store, now

PRIMARY_ANNOTATION = "kubectl.kubernetes.io/default-container"


@dataclass
class _Run:
    """What the kubelet holds for one pod: its IP, its process and probe state."""

    ip: str
    proc: Optional[subprocess.Popen] = None
    started: Optional[str] = None
    ready: bool = False
    probe_failures: int = 0
    next_probe: float = 0.0
    pull_failed_at: Optional[float] = None
    oom: bool = False
    evicted: Optional[str] = None  # the eviction manager's message, once it evicted the pod
    frozen_at: Optional[float] = None
    term_sent_at: Optional[float] = None
    exit: Optional[dict] = None
    log_path: str = ""


@dataclass
class Node:
    name: str = "stand-in-node"
    capacity: Dict[str, str] = field(default_factory=lambda: {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "0"})
    labels: Dict[str, str] = field(default_factory=lambda: {"kubernetes.io/hostname": "stand-in-node"})


class Kubelet:
    """Reconciles every pod in the store every `period` seconds."""

    def __init__(self, store: Store, workdir: str, base_env: Dict[str, str], period: float = 0.05):
        self.store, self.workdir, self.base_env, self.period = store, workdir, base_env, period
        self.node = Node()
        self.bad_images: set = set()
        self.node_loss_grace = 3.0
        self._runs: Dict[str, _Run] = {}
        self.errors: List[str] = []  # unexpected failures of the loop (tests may assert there are none)
        self._ips = _pod_ips()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stand-in-kubelet", daemon=True)
        store.on_delete.append(self._on_delete)

    def start(self) -> "Kubelet":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            self._kill(run, signal.SIGKILL)

    # ---- fault switches ----
    def oom_kill(self, pod_name: str) -> None:
        """The kernel's OOM killer: SIGKILL, reported as OOMKilled with exit code 137."""
        run = self._run_of(pod_name)
        run.oom = True
        self._kill(run, signal.SIGKILL)

    def evict(self, pod_name: str, resource: str = "memory") -> None:
        """The kubelet's eviction manager under node pressure (a hard threshold: no grace): the containers are
        killed, then the pod reports phase Failed, reason Evicted, and stays until someone deletes it."""
        run = self._run_of(pod_name)
        run.evicted = f"The node was low on resource: {resource}. Threshold quantity: 100Mi, available: 64Mi."
        self._kill(run, signal.SIGKILL)

    def lose_node(self, pod_name: str) -> None:
        """The pod's node stops answering: its process freezes and the node controller marks the pod not ready.
        After `node_loss_grace` the pod is marked for deletion (taint eviction; no kubelet will confirm it), after
        twice that the node lifecycle force-deletes it with its node, gone for good: its process is killed then, so it
        never wakes up to write anything."""
        run = self._run_of(pod_name)
        self._kill(run, signal.SIGSTOP)
        run.frozen_at = time.monotonic()
        pod = self._pod(pod_name)
        self._write_status(
            pod,
            lambda st: _set_condition(
                _set_condition(st, "Ready", False, "NodeLost"), "ContainersReady", False, "NodeLost"
            ),
        )

    def pid(self, pod_name: str) -> Optional[int]:
        """The pid of the pod's primary container process; None before it runs (or if it never will)."""
        run = self._run_of(pod_name, required=False)
        return run.proc.pid if run is not None and run.proc is not None else None

    def log(self, pod_name: str) -> str:
        """What the pod's primary container printed so far ('' before it runs)."""
        run = self._run_of(pod_name, required=False)
        try:
            with open(run.log_path, errors="replace") as f:
                return f.read()
        except (AttributeError, OSError):
            return ""

    def _pod(self, name: str) -> dict:
        pods = self.store.find("pods", lambda p: p["metadata"]["name"] == name)
        if not pods:
            raise KeyError(f"no pod {name}")
        return pods[0]

    def _run_of(self, pod_name: str, required: bool = True) -> Optional[_Run]:
        uid = self._pod(pod_name)["metadata"]["uid"]
        with self._lock:
            run = self._runs.get(uid)
        if run is None and required:
            raise KeyError(f"pod {pod_name} is not running on the node yet")
        return run

    # ---- the loop ----
    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            pods = self.store.find("pods", lambda p: True)
            for pod in pods:
                try:
                    self._reconcile(pod)
                except ApiError:
                    pass  # the pod changed or went meanwhile: the next round sees it
                except Exception:  # a stand-in bug: said, and the node keeps serving the other pods
                    self.errors.append(traceback.format_exc())
                    traceback.print_exc()
            live = {p["metadata"]["uid"] for p in pods}
            with self._lock:  # pods garbage-collected with their owner: their processes go too
                gone = [self._runs.pop(uid) for uid in list(self._runs) if uid not in live]
            for run in gone:
                self._kill(run, signal.SIGKILL)

    def _reconcile(self, pod: dict) -> None:
        uid, spec = pod["metadata"]["uid"], pod["spec"]
        with self._lock:
            run = self._runs.get(uid)
        if run is None:
            if pod["metadata"].get("deletionTimestamp"):  # never ran: nothing to stop
                self.store.remove("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
                return
            reason = self._unschedulable(spec)
            if reason is not None:
                self._write_status(pod, lambda st: _pending(st, reason))
                return
            run = _Run(
                ip=next(self._ips),
                log_path=os.path.join(self.workdir, f"{pod['metadata']['namespace']}.{pod['metadata']['name']}.log"),
            )
            with self._lock:
                self._runs[uid] = run
            self._bind(pod, run)
            return
        if run.frozen_at is not None:  # the node is gone: only the control plane acts now
            lost_for = time.monotonic() - run.frozen_at
            if lost_for > 2 * self.node_loss_grace:
                self._kill(run, signal.SIGKILL)
                self.store.remove("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
            elif lost_for > self.node_loss_grace and not pod["metadata"].get("deletionTimestamp"):
                self._mark_deleted(pod, 30)
            return
        if pod["metadata"].get("deletionTimestamp"):
            self._terminate(pod, run)
            return
        container = _primary(pod)
        if run.proc is None and run.exit is None:
            self._start(pod, run, container)
            return
        if run.proc is not None and run.exit is None and run.proc.poll() is not None:
            run.exit = self._exit_of(run)
            run.ready = False
            self._write_status(pod, lambda st: self._status(pod, run, st))
            return
        if run.exit is None:
            self._probe(pod, run, container)

    def _unschedulable(self, spec: dict) -> Optional[str]:
        if spec.get("nodeName"):
            return None
        selector = spec.get("nodeSelector") or {}
        if any(self.node.labels.get(k) != v for k, v in selector.items()):
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
        wanted: Dict[str, float] = {}
        for c in spec["containers"]:
            for k, v in ((c.get("resources") or {}).get("requests") or {}).items():
                wanted[k] = wanted.get(k, 0) + float(parse_quantity(v))
        short = sorted(k for k, v in wanted.items() if v > float(parse_quantity(self.node.capacity.get(k, "0"))))
        if short:
            return "0/1 nodes are available: " + ", ".join(f"1 Insufficient {k}" for k in short) + "."
        return None

    def _bind(self, pod: dict, run: _Run) -> None:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]

        def bind(p: dict) -> dict:
            p["spec"]["nodeName"] = self.node.name
            st = p.setdefault("status", {})
            st.pop("reason", None)
            st.pop("message", None)
            st.update(phase="Pending", hostIP="127.0.0.1", podIP=run.ip, podIPs=[{"ip": run.ip}], startTime=now())
            st["conditions"] = []
            for t, ok in (("PodScheduled", True), ("Initialized", True), ("ContainersReady", False), ("Ready", False)):
                _set_condition(st, t, ok, None if ok else "ContainersNotReady")
            st["containerStatuses"] = [
                _container_status(c, {"waiting": {"reason": "ContainerCreating"}}) for c in p["spec"]["containers"]
            ]
            return p

        self.store.update("pods", ns, name, bind)

    def _start(self, pod: dict, run: _Run, container: dict) -> None:
        if container["image"] in self.bad_images:
            failed_for = time.monotonic() - (run.pull_failed_at or time.monotonic())
            run.pull_failed_at = run.pull_failed_at or time.monotonic()
            reason = "ErrImagePull" if failed_for < 1.0 else "ImagePullBackOff"
            message = (
                f'Back-off pulling image "{container["image"]}"'
                if failed_for >= 1.0
                else (f'failed to pull and unpack image "{container["image"]}": not found')
            )
            self._write_status(pod, lambda st: _waiting(st, pod, reason, message))
            return
        try:
            env = self._env(pod, run, container)
        except LookupError as e:
            message = str(e)
            self._write_status(pod, lambda st: _waiting(st, pod, "CreateContainerConfigError", message))
            return
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        if not argv:
            self._write_status(pod, lambda st: _waiting(st, pod, "CreateContainerError", "no command specified"))
            return
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        elif shutil.which(argv[0], path=env.get("PATH")) is None:
            msg = f'exec: "{argv[0]}": executable file not found in $PATH'
            self._write_status(pod, lambda st: _waiting(st, pod, "CreateContainerError", msg))
            return
        cwd = container.get("workingDir") or self.workdir
        with open(run.log_path, "ab") as log:
            run.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run.started = now()
        self._write_status(pod, lambda st: self._status(pod, run, st))

    def _env(self, pod: dict, run: _Run, container: dict) -> Dict[str, str]:
        env = {**self.base_env, "HOSTNAME": pod["metadata"]["name"]}
        ns = pod["metadata"]["namespace"]
        for e in container.get("env") or []:
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = e.get("value", "")
                continue
            src = e["valueFrom"]
            if "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                try:
                    secret = self.store.get("secrets", ns, ref["name"])
                except ApiError:
                    raise LookupError(f'secret "{ref["name"]}" not found')
                if ref["key"] not in (secret.get("data") or {}):
                    raise LookupError(f"couldn't find key {ref['key']} in Secret {ns}/{ref['name']}")
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            elif "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                values = {"status.podIP": run.ip, "metadata.name": pod["metadata"]["name"], "metadata.namespace": ns}
                if path not in values:
                    raise LookupError(f"unsupported fieldPath {path}")
                env[e["name"]] = values[path]
            else:
                raise LookupError(f"unsupported valueFrom {sorted(src)}")
        return env

    def _probe(self, pod: dict, run: _Run, container: dict) -> None:
        probe = container.get("readinessProbe")
        if time.monotonic() < run.next_probe:
            return
        run.next_probe = time.monotonic() + float((probe or {}).get("periodSeconds", 10))
        if probe is None:
            ok = True
        else:
            port = probe["tcpSocket"]["port"]
            try:
                with socket.create_connection((run.ip, int(port)), timeout=0.5):
                    ok = True
            except OSError:
                ok = False
        run.probe_failures = 0 if ok else run.probe_failures + 1
        threshold = int((probe or {}).get("failureThreshold", 3))
        ready = ok or (run.ready and run.probe_failures < threshold)
        if ready != run.ready:
            run.ready = ready
            self._write_status(pod, lambda st: self._status(pod, run, st))

    def _terminate(self, pod: dict, run: _Run) -> None:
        """A deleted pod: SIGTERM, SIGKILL after its grace period, then the object goes."""
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        if run.proc is None or run.exit is not None or run.proc.poll() is not None:
            self.store.remove("pods", ns, name)
            return
        if run.term_sent_at is None:
            run.term_sent_at = time.monotonic()
            self._kill(run, signal.SIGTERM)
        elif time.monotonic() - run.term_sent_at > float(pod["metadata"].get("deletionGracePeriodSeconds", 30)):
            self._kill(run, signal.SIGKILL)

    def _mark_deleted(self, pod: dict, grace: int) -> None:
        def mark(p: dict) -> dict:
            p["metadata"]["deletionTimestamp"] = now()
            p["metadata"]["deletionGracePeriodSeconds"] = grace
            _set_condition(p["status"], "DisruptionTarget", True, "DeletionByTaintManager")
            return p

        self.store.update("pods", pod["metadata"]["namespace"], pod["metadata"]["name"], mark)

    def _on_delete(self, resource: str, obj: dict) -> None:
        if resource != "pods":
            return
        with self._lock:
            run = self._runs.pop(obj["metadata"]["uid"], None)
        if run is not None and run.proc is not None and run.proc.poll() is None:
            self._kill(run, signal.SIGKILL)
            run.proc.wait(10)

    @staticmethod
    def _kill(run: _Run, sig: int) -> None:
        if run.proc is None:
            return
        try:
            os.killpg(run.proc.pid, sig)
            if sig == signal.SIGKILL:
                os.killpg(run.proc.pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _exit_of(run: _Run) -> dict:
        rc = run.proc.returncode
        code = 128 - rc if rc < 0 else rc
        reason = "OOMKilled" if run.oom else ("Completed" if code == 0 else "Error")
        return {"exitCode": code, "reason": reason, "startedAt": run.started, "finishedAt": now()}

    def _status(self, pod: dict, run: _Run, st: dict) -> dict:
        """Phase, conditions and container statuses as the kubelet reports them."""
        primary = _primary(pod)["name"]
        statuses = []
        for c in pod["spec"]["containers"]:
            if c["name"] != primary:
                statuses.append(_container_status(c, {"running": {"startedAt": run.started}}, ready=True))
            elif run.exit is not None:
                statuses.append(_container_status(c, {"terminated": dict(run.exit)}))
            else:
                statuses.append(_container_status(c, {"running": {"startedAt": run.started}}, ready=run.ready))
        st["containerStatuses"] = statuses
        if run.exit is not None and run.evicted is not None:
            st.update(phase="Failed", reason="Evicted", message=run.evicted)
            _set_condition(st, "DisruptionTarget", True, "TerminationByKubelet", run.evicted)
            reason = "PodFailed"
        elif run.exit is not None:
            st["phase"] = "Succeeded" if run.exit["exitCode"] == 0 else "Failed"
            reason = "PodCompleted"
        else:
            st["phase"] = "Running"
            reason = None if run.ready else "ContainersNotReady"
        _set_condition(st, "ContainersReady", run.ready, reason)
        _set_condition(st, "Ready", run.ready, reason)
        return st

    def _write_status(self, pod: dict, change) -> None:
        def apply(p: dict) -> dict:
            p["status"] = change(p.setdefault("status", {})) or p["status"]
            return p

        self.store.update("pods", pod["metadata"]["namespace"], pod["metadata"]["name"], apply)


def _pod_ips() -> Iterator[str]:
    """Pod IPs in 127/8 (Linux routes all of it to lo): a random 127.a.b.0/24 start per node, so stand-ins of
    test runs sharing the machine (replicas all listen on port 8777) do not collide; never 127.0.0.1."""
    rng = random.SystemRandom()
    a, b = rng.randrange(1, 255), rng.randrange(0, 255)
    while True:
        for n in range(2, 255):
            yield f"127.{a}.{b}.{n}"
        b = (b + 1) % 256


def _primary(pod: dict) -> dict:
    name = (pod["metadata"].get("annotations") or {}).get(PRIMARY_ANNOTATION)
    containers: List[dict] = pod["spec"]["containers"]
    return next((c for c in containers if c["name"] == name), containers[0])


def _container_status(c: dict, state: dict, ready: bool = False) -> dict:
    return {
        "name": c["name"],
        "image": c["image"],
        "imageID": "" if "waiting" in state else f"stand-in://{c['image']}",
        "ready": ready,
        "restartCount": 0,
        "started": "running" in state,
        "state": state,
    }


def _set_condition(st: dict, kind: str, ok: bool, reason: Optional[str], message: Optional[str] = None) -> dict:
    conditions = st.setdefault("conditions", [])
    status = "True" if ok else "False"
    current = next((c for c in conditions if c["type"] == kind), None)
    if current is not None and current["status"] == status and current.get("reason") == reason:
        return st
    cond = {"type": kind, "status": status, "lastTransitionTime": now()}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    conditions[:] = [c for c in conditions if c["type"] != kind] + [cond]
    return st


def _pending(st: dict, message: str) -> dict:
    st["phase"] = "Pending"
    st["qosClass"] = st.get("qosClass", "Burstable")
    return _set_condition(st, "PodScheduled", False, "Unschedulable", message)


def _waiting(st: dict, pod: dict, reason: str, message: str) -> dict:
    primary = _primary(pod)
    st["containerStatuses"] = [
        _container_status(
            c,
            {"waiting": {"reason": reason, "message": message}}
            if c is primary
            else {"waiting": {"reason": "ContainerCreating"}},
        )
        for c in pod["spec"]["containers"]
    ]
    return st

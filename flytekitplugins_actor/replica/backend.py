"""The replica backend interface: how a pool starts, watches and stops its replicas.

Implementations: local processes (`LocalProcessBackend`, here) and Kubernetes pods (plugin_backend.kubernetes).
Starting is asynchronous: `start` returns a `Replica` at once, which becomes ready (has an address) or dead later.
"""

from __future__ import annotations

import abc
import enum
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from flytekit.loggers import logger

from flytekitplugins_actor.replica.protocol import TOKEN_ENV
from flytekitplugins_actor.replica.supervisor import Supervisor


class ReplicaState(enum.Enum):
    """A replica's life as its backend sees it: starting, then ready (it has an address) or dead (a ReplicaDeath)."""

    STARTING = "starting"
    """Started (a process spawned, a pod created) but not yet answering on its control port."""
    READY = "ready"
    """Answering on its control port: the pool may hand it executions."""
    DEAD = "dead"
    """Gone for good; `Replica.death` says how and whose fault it was."""


class DeathCause(enum.Enum):
    """Whose fault a replica's death is: it decides whether its execution may be dispatched again."""

    TASK = "task"
    """The replica's own process ended it (exit code, signal, OOM kill): the execution that ran there failed."""
    INFRASTRUCTURE = "infrastructure"
    """The platform took it away (node lost, evicted, preempted, pod deleted by someone else): not the task's fault."""
    START = "start"
    """It never became ready (image pull, config error, crash at start-up)."""


@dataclass(frozen=True)
class ReplicaDeath:
    """Why a replica is gone: a first-class state, not a None. `reason` reads like 'killed by signal SIGKILL'."""

    replica: str
    reason: str
    exit_code: Optional[int] = None
    cause: DeathCause = DeathCause.TASK

    def __str__(self) -> str:
        return f"replica {self.replica} {self.reason}"


@dataclass
class ReplicaSpec:
    """Everything a backend needs to start one replica of a pool."""

    name: str
    token: str
    env: Dict[str, str] = field(default_factory=dict)
    labels: Dict[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None
    image: Optional[str] = None
    log_dir: Optional[str] = None
    pod_spec: Optional[dict] = None  # serialized pod spec with the primary container (Kubernetes backend)
    primary_container: str = "primary"
    namespace: Optional[str] = None  # where the replica runs (Kubernetes backend); None = the backend's default
    service_account: Optional[str] = None  # the identity the replica runs as (Kubernetes backend)


class Replica(abc.ABC):
    """One replica as its backend sees it."""

    def __init__(self, spec: ReplicaSpec):
        self.spec = spec
        self.name = spec.name
        self._cond = threading.Condition()
        self._state = ReplicaState.STARTING
        self._address: Optional[str] = None
        self._death: Optional[ReplicaDeath] = None
        self._exited = False  # its backend saw its process (pod) end, not only a death recorded for it
        self._death_callbacks: List = []
        self.waiting_reason: Optional[str] = None
        """Why a starting replica waits, as its platform says (e.g. the scheduler's Unschedulable message)."""

    def add_death_callback(self, fn) -> None:
        """Calls fn(death) once the replica is dead (at once if it already is)."""
        with self._cond:
            if self._death is None:
                self._death_callbacks.append(fn)
                return
        fn(self._death)

    @property
    def state(self) -> ReplicaState:
        return self._state

    @property
    def address(self) -> Optional[str]:
        return self._address

    @property
    def death(self) -> Optional[ReplicaDeath]:
        return self._death

    @property
    @abc.abstractmethod
    def log_uri(self) -> str:
        """Where the replica's log can be read (a file path locally, a pod log reference on Kubernetes)."""

    def _set_ready(self, address: str) -> None:
        with self._cond:
            if self._state is ReplicaState.STARTING:
                self._address, self._state = address, ReplicaState.READY
            self._cond.notify_all()

    def _set_dead(
        self,
        reason: str,
        exit_code: Optional[int] = None,
        cause: DeathCause = DeathCause.TASK,
        exited: bool = False,
    ) -> None:
        """Records the replica's death (the first one recorded wins) and runs the death callbacks. `exited`: the
        backend saw the replica's process end (a death may be recorded before, e.g. by `abandon`)."""
        with self._cond:
            if exited:
                self._set_exited_locked()
            if self._death is not None:
                return
            self._death = ReplicaDeath(self.name, reason, exit_code, cause)
            self._state = ReplicaState.DEAD
            callbacks, self._death_callbacks = self._death_callbacks, []
            self._cond.notify_all()
        for fn in callbacks:
            try:
                fn(self._death)
            except Exception:
                logger.exception("replica %s: a death callback failed", self.name)

    def _set_exited(self) -> None:
        """Records that the backend saw the replica's process (pod) end, after its death was recorded."""
        with self._cond:
            self._set_exited_locked()

    def _set_exited_locked(self) -> None:
        if not self._exited:
            self._exited = True
            self._cond.notify_all()

    @property
    def exited(self) -> bool:
        """The backend saw the replica's process (pod) end: nothing of it runs any more."""
        return self._exited

    def abandon(self, reason: str, cause: DeathCause) -> None:
        """Gives the replica up for `reason` (e.g. it never became ready, or the platform took it away): records
        that as its death, then stops it at once. A death already recorded stays the one reported."""
        self._set_dead(reason, None, cause)
        self.terminate(0)

    def wait_ready(self, timeout: Optional[float] = None) -> ReplicaState:
        """Blocks until the replica is ready or dead (or the timeout passes); returns the state."""
        with self._cond:
            self._cond.wait_for(lambda: self._state is not ReplicaState.STARTING, timeout)
            return self._state

    def wait_dead(self, timeout: Optional[float] = None) -> Optional[ReplicaDeath]:
        with self._cond:
            self._cond.wait_for(lambda: self._death is not None, timeout)
            return self._death

    def wait_exited(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the backend has seen the replica's process end (nothing of it runs any more), or the
        timeout passes; returns whether it has. The pool runs an execution again only after this."""
        with self._cond:
            return self._cond.wait_for(lambda: self._exited, timeout)

    @abc.abstractmethod
    def terminate(self, grace_seconds: float = 5.0) -> None:
        """Stops the replica (SIGTERM, then SIGKILL after the grace period); returns without waiting."""


class ReplicaBackend(abc.ABC):
    """Starts replicas for pools: local processes or Kubernetes pods."""

    ready_timeout_s: float = 120.0
    """How long a started replica may take to become ready before it counts as a failed start."""
    death_report_grace_s: float = 5.0
    """How long after a replica stopped answering its backend may take to report the death (and its cause), or to
    see its process end: the pool waits that long before it decides on its own."""
    exit_confirm_s: float = 10.0
    """After a replica died of the platform (DeathCause.INFRASTRUCTURE), how long its backend may take to see its
    process end (`Replica.wait_exited`): the pool dispatches the execution again only then, else it ends it
    REPLICA_DIED, since two runs of one execution must never overlap. A local process is seen ending at once."""

    @abc.abstractmethod
    def start(self, spec: ReplicaSpec) -> Replica:
        """Starts a replica without waiting for it to be ready."""

    def live_replicas(self, pool_key: str) -> "Tuple[Optional[str], List[Replica]]":
        """The token and the live replicas a previous process left for a pool, for the pool to adopt (a restarted
        connector's warm pools). None and no replicas by default: local replicas die with their parent."""
        return None, []


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        return f"was killed by signal {sig} (exit code {returncode})"
    return f"exited with code {returncode}"


class LocalProcessReplica(Replica):
    """A replica that is a child process of this one. It exits when this process dies (its stdin closes)."""

    def __init__(self, spec: ReplicaSpec, supervisor: Supervisor):
        super().__init__(spec)
        self._supervisor = supervisor
        log_dir = spec.log_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "flyte-actor-logs")
        os.makedirs(log_dir, exist_ok=True)
        self._log_path = os.path.join(log_dir, f"{spec.name}.log")
        ready_r, ready_w = os.pipe()
        env = {**os.environ, **spec.env, TOKEN_ENV: spec.token, "FLYTE_ACTOR_REPLICA_NAME": spec.name}
        cmd = [
            sys.executable,
            "-m",
            "flytekitplugins_actor.replica.worker",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--name",
            spec.name,
            "--ready-fd",
            str(ready_w),
            "--watch-stdin",
        ]
        with open(self._log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.cwd or os.getcwd(),
                pass_fds=(ready_w,),
                start_new_session=True,
            )
        os.close(ready_w)
        threading.Thread(target=self._watch, args=(ready_r,), name=f"watch-{spec.name}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_uri(self) -> str:
        return self._log_path

    def _watch(self, ready_r: int) -> None:
        with os.fdopen(ready_r, "r") as ready:
            line = ready.readline()
        if line:
            info = json.loads(line)
            self._set_ready(f"127.0.0.1:{info['port']}")
        returncode = self.process.wait()
        self._set_dead(describe_exit(returncode), returncode, exited=True)

    def terminate(self, grace_seconds: float = 5.0) -> None:
        """SIGTERM to the replica's process group (the task's own subprocesses too), SIGKILL after the grace."""
        if self.process.poll() is not None:
            return
        if grace_seconds <= 0:
            self._signal(signal.SIGKILL)
            return
        self._signal(signal.SIGTERM)
        self._supervisor.call_later(grace_seconds, self._kill_if_alive)

    def _kill_if_alive(self) -> None:
        if self.process.poll() is None:
            logger.warning("replica %s did not stop on SIGTERM within its grace: killing it", self.name)
            self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:  # the replica leads its own session (start_new_session), so its group is its pid
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class LocalProcessBackend(ReplicaBackend):
    """Replicas as processes on this host: the default for local runs and the connector's embedded backend."""

    def __init__(self) -> None:
        self.supervisor = Supervisor("actor-local-replicas")
        """Sends the SIGKILL of a terminate whose grace ran out (one thread for all replicas, only while needed)."""

    def start(self, spec: ReplicaSpec) -> Replica:
        return LocalProcessReplica(spec, self.supervisor)

"""The pool under faults: refused submits, backends that cannot start replicas, reaping races, vanished peers,
cancels, and task subprocesses when a replica is stopped. Real replica processes throughout."""

import contextlib
import logging
import os
import signal
import sys
import threading
import time as _time
import uuid

import pytest
import sdk_worker_tasks as tasks
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.core.utils import write_proto_to_file
from flytekit.loggers import logger
from sdk_helpers import pid_alive
from waiting import RESOLVER, wait_until

from flytekitplugins_actor import pool as pool_module
from flytekitplugins_actor.pool import Execution, ExecutionState, InvalidTransition, PoolRegistry, ReplicaPool
from flytekitplugins_actor.replica.backend import (
    DeathCause,
    LocalProcessBackend,
    ReplicaBackend,
    ReplicaSpec,
    ReplicaState,
)
from flytekitplugins_actor.replica.command import ExecutionCommand
from flytekitplugins_actor.replica.execution import ExecutionSpec
from flytekitplugins_actor.replica.protocol import ProtocolError, ReplicaClient

pytestmark = pytest.mark.timeout(120)


def execution(tmp, task, **inputs) -> ExecutionSpec:
    execution_id = uuid.uuid4().hex
    d = os.path.join(str(tmp), execution_id)
    os.makedirs(d)
    lm = TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), inputs, task.python_interface.inputs)
    write_proto_to_file(lm.to_flyte_idl(), os.path.join(d, "inputs.pb"))
    command = ExecutionCommand.build(
        inputs=os.path.join(d, "inputs.pb"),
        output_prefix=os.path.join(d, "out"),
        raw_output_data_prefix=os.path.join(d, "raw"),
        resolver=RESOLVER,
        resolver_args=["task-module", task.task_function.__module__, "task-name", task.task_function.__name__],
    )
    return ExecutionSpec(execution_id, command.to_args(), {})


def make_pool(tmp, backend=None, size=1, ttl=300, replica_token=None, env=None, **kwargs):
    env = {"PYTHONPATH": os.pathsep.join(os.path.abspath(p or ".") for p in sys.path), **(env or {})}

    def make_spec(name, token):
        return ReplicaSpec(
            name=name,
            token=replica_token or token,
            env=env,
            cwd=os.getcwd(),
            log_dir=os.path.join(str(tmp), "logs"),
        )

    return ReplicaPool(
        f"k-{uuid.uuid4().hex[:6]}", backend or LocalProcessBackend(), make_spec, size, ttl, name="faults", **kwargs
    )


@pytest.fixture
def pool_log():
    """What the pool logs through flytekit's logger (which does not propagate to the root logger)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture
def pool(tmp_path):
    p = make_pool(tmp_path)
    yield p
    p.shutdown()


def test_a_submit_the_replica_refuses_fails_that_execution_and_keeps_the_replica(pool, tmp_path):
    first = pool.submit(execution(tmp_path, tasks.pid))
    assert first.wait(60) and first.state is ExecutionState.SUCCEEDED
    bad = ExecutionSpec(uuid.uuid4().hex, ["pyflyte-execute", "--inputs", "x", "--bogus-option", "y"], {})
    refused = pool.submit(bad)
    assert refused.wait(30)
    assert refused.state is ExecutionState.FAILED
    assert refused.error.code == "SubmitRefused" and "--bogus-option" in refused.error.message
    after = pool.submit(execution(tmp_path, tasks.pid))
    assert after.wait(60) and after.state is ExecutionState.SUCCEEDED
    assert after.replica == first.replica  # the same warm replica: it was not restarted
    assert pool.stats()["deaths"] == 0


class _BrokenBackend(ReplicaBackend):
    """A backend whose API refuses to start anything (e.g. a quota or a bad image reference)."""

    name = "broken"

    def __init__(self):
        self.attempts = 0

    def start(self, spec):
        self.attempts += 1
        raise RuntimeError("quota exceeded")


def test_a_backend_that_cannot_start_replicas_fails_waiting_executions_instead_of_looping(tmp_path):
    backend = _BrokenBackend()
    pool = make_pool(tmp_path, backend=backend)
    try:
        e = pool.submit(execution(tmp_path, tasks.pid))
        assert e.wait(30), "the execution must not wait forever on a pool that cannot start replicas"
        assert e.state is ExecutionState.REPLICA_DIED
        assert "could not start" in e.death.reason and "quota exceeded" in e.death.reason
        assert backend.attempts == 3
    finally:
        pool.shutdown()


def test_reaping_never_cancels_an_execution_submitted_meanwhile(tmp_path):
    registry = PoolRegistry()
    created = []

    def create():
        created.append(make_pool(tmp_path, ttl=0))
        return created[-1]

    try:
        first = registry.submit("env", create, execution(tmp_path, tasks.pid))
        assert first.wait(60) and first.state is ExecutionState.SUCCEEDED
        old = created[0]
        assert old.close_if_expired()  # the reaper's decision, taken atomically
        # a submit that still finds the closed pool in the registry gets a new pool, never a cancel
        later = registry.submit("env", create, execution(tmp_path, tasks.pid))
        assert later.wait(60) and later.state is ExecutionState.SUCCEEDED
        assert len(created) == 2 and registry.get("env") is created[1]
    finally:
        registry.shutdown()


def test_abort_wakes_a_wait_blocked_on_a_replica(pool, tmp_path):
    marker = tmp_path / "started"
    release = tmp_path / "release"
    e = pool.submit(execution(tmp_path, tasks.wait_for_file, path=str(release), started=str(marker)))
    wait_until(marker.exists, 60)
    replica = pool.replicas[0]
    client = ReplicaClient(replica.address, pool.token)
    errors = []

    def blocked_wait():
        try:
            client.request("wait", execution_id=e.id)
        except ProtocolError as err:
            errors.append(err)

    t = threading.Thread(target=blocked_wait)
    t.start()
    wait_until(lambda: t.is_alive(), 5)
    client.abort()
    t.join(10)
    assert not t.is_alive() and errors, "abort must unblock the waiting request"
    release.write_text("go")
    assert e.wait(60) and e.state is ExecutionState.SUCCEEDED  # the replica itself was unaffected
    client.close()


def test_stopping_a_replica_stops_the_subprocesses_its_task_started(pool, tmp_path):
    pidfile = tmp_path / "child"
    e = pool.submit(execution(tmp_path, tasks.spawn_sleeper, path=str(pidfile)))
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), 60)
    child = int(pidfile.read_text())
    assert pid_alive(child)
    replica = pool.replicas[0]
    replica.terminate(0.5)
    assert replica.wait_dead(30) is not None
    wait_until(lambda: not pid_alive(child), 30, what=f"task subprocess {child} outlived its replica")
    assert e.wait(30) and e.state in (ExecutionState.FAILED, ExecutionState.REPLICA_DIED)


def test_cancel_of_an_execution_taken_from_the_queue_but_not_yet_submitted(tmp_path):
    gate = threading.Event()
    reached = threading.Event()

    def hold(execution):  # runs on the slot thread between the queue and the replica
        reached.set()
        gate.wait(30)

    pool = make_pool(tmp_path)
    try:
        counter = tmp_path / "runs"
        e = pool.submit(execution(tmp_path, tasks.count_run, path=str(counter)), before_dispatch=hold)
        assert reached.wait(60)
        canceller = threading.Thread(target=pool.cancel, args=(e.id,), kwargs={"grace_seconds": 5})
        canceller.start()
        wait_until(lambda: e.cancel_requested, 10)
        gate.set()
        canceller.join(30)
        assert e.wait(30) and e.state is ExecutionState.CANCELLED
        assert not counter.exists(), "a cancelled execution must not run"
        assert pool.replicas and pool.replicas[0].state is ReplicaState.READY  # no restart was needed
    finally:
        pool.shutdown()


# ---- the pool's state machine ----
def test_an_invalid_transition_raises_instead_of_being_applied():
    e = Execution(spec=ExecutionSpec("x", [], {}))
    e._transition(ExecutionState.RUNNING)
    e._transition(ExecutionState.SUCCEEDED)
    for to in (ExecutionState.RUNNING, ExecutionState.QUEUED, ExecutionState.FAILED):
        with pytest.raises(InvalidTransition, match="SUCCEEDED"):
            e._transition(to)
    assert e.state is ExecutionState.SUCCEEDED


def test_a_busy_refusal_requeues_without_stale_dispatch_state_or_a_double_count(pool, tmp_path):
    first = pool.submit(execution(tmp_path, tasks.pid))
    assert first.wait(60) and first.state is ExecutionState.SUCCEEDED
    old = pool.replicas[0]
    # someone else keeps the replica busy: the pool's next submit is refused BUSY
    release, started = tmp_path / "release", tmp_path / "started"
    squatter = execution(tmp_path, tasks.wait_for_file, path=str(release), started=str(started))
    with contextlib.closing(ReplicaClient(old.address, pool.token)) as c:
        c.request("submit", execution_id=squatter.execution_id, args=squatter.args, env={})
    wait_until(started.exists, 30)
    second = pool.submit(execution(tmp_path, tasks.pid))
    assert second.wait(60) and second.state is ExecutionState.SUCCEEDED
    assert second.replica != old.name and second.log_uri != old.log_uri  # where it really ran
    assert second.warm is False  # a fresh replica: not the refused warm one
    stats = pool.stats()
    assert (stats["cold"], stats["warm"]) == (2, 0), stats  # the refused dispatch is not counted
    release.write_text("go")


def test_on_done_runs_outside_the_pool_lock_and_its_failure_is_logged(pool, tmp_path, pool_log):
    seen = []

    def uses_the_pool(execution):  # another thread needs the pool's lock while the callback runs
        t = threading.Thread(target=lambda: seen.append(pool.stats()["queued"]))
        t.start()
        t.join(10)
        seen.append(not t.is_alive())

    def fails(execution):
        raise RuntimeError("callback bug")

    a = pool.submit(execution(tmp_path, tasks.pid), on_done=uses_the_pool)
    b = pool.submit(execution(tmp_path, tasks.pid), on_done=fails)
    assert a.wait(60) and b.wait(60)
    wait_until(lambda: len(seen) == 2, 30)
    assert seen[1] is True, "a thread taking the pool's lock was blocked while on_done ran"
    assert b.state is ExecutionState.SUCCEEDED  # a failing callback changes nothing
    wait_until(lambda: any("callback" in r.getMessage() and r.exc_info for r in pool_log), 10)
    assert pool.submit(execution(tmp_path, tasks.pid)).wait(60)  # the pool carries on


def test_the_reaper_survives_a_pool_that_fails_and_reaps_the_others(tmp_path, pool_log):
    registry = PoolRegistry()
    registry.reap_interval_s = 0.05
    bad = make_pool(tmp_path, ttl=0)

    def broken():
        raise RuntimeError("a broken pool")

    bad.close_if_expired = broken
    try:
        assert registry.submit("bad", lambda: bad, execution(tmp_path, tasks.pid)).wait(60)
        for key in ("good-1", "good-2"):  # the reaper thread keeps reaping, round after failing round
            good = make_pool(tmp_path, ttl=0)
            assert registry.submit(key, lambda: good, execution(tmp_path, tasks.pid)).wait(60)
            wait_until(lambda: registry.get(key) is None, 30, what=f"the reaper stopped reaping ({key})")
        assert registry.get("bad") is bad
        assert any("could not check pool" in r.getMessage() for r in pool_log)
    finally:
        registry.shutdown()


# ---- cancel ----
def test_cancel_returns_at_once_and_the_grace_is_the_supervisors(pool, tmp_path):
    release, started = tmp_path / "release", tmp_path / "started"
    e = pool.submit(execution(tmp_path, tasks.ignore_cancel, path=str(release), started=str(started)))
    wait_until(started.exists, 60)
    pool.cancel(e.id, grace_seconds=60)
    assert e.state is ExecutionState.RUNNING and e.cancel_requested  # cancel did not wait out the grace
    release.write_text("go")  # the task ignores the cancel and finishes within the grace: its result stands
    assert e.wait(30) and e.state is ExecutionState.SUCCEEDED
    assert pool.stats()["deaths"] == 0


def test_a_task_that_ignores_cancel_loses_its_replica_after_the_grace(pool, tmp_path):
    release, started = tmp_path / "release", tmp_path / "started"
    e = pool.submit(execution(tmp_path, tasks.ignore_cancel, path=str(release), started=str(started)))
    wait_until(started.exists, 60)
    old = pool.replicas[0]
    pool.cancel(e.id, grace_seconds=0.5)
    assert e.wait(30) and e.state is ExecutionState.CANCELLED
    assert old.wait_dead(30) is not None
    after = pool.submit(execution(tmp_path, tasks.pid))
    assert after.wait(60) and after.state is ExecutionState.SUCCEEDED and after.replica != old.name


def test_cancel_of_a_sleeping_task_keeps_the_replica_warm(pool, tmp_path):
    started = tmp_path / "started"
    e = pool.submit(execution(tmp_path, tasks.sleep_long, started=str(started)))
    wait_until(started.exists, 60)
    old = pool.replicas[0]
    pool.cancel(e.id, grace_seconds=30)
    assert e.wait(20) and e.state is ExecutionState.CANCELLED
    after = pool.submit(execution(tmp_path, tasks.pid))
    assert after.wait(60) and after.replica == old.name and after.warm
    assert pool.stats()["deaths"] == 0


# ---- misconfiguration is loud ----
def test_a_replica_that_refuses_the_pool_token_fails_the_execution_clearly(tmp_path, pool_log):
    pool = make_pool(tmp_path, replica_token="another-pools-token")
    try:
        e = pool.submit(execution(tmp_path, tasks.pid))
        assert e.wait(60)
        assert e.state is ExecutionState.FAILED, (e.state, e.death)
        assert e.error.code == "Unauthenticated" and not e.error.recoverable
        assert "misconfiguration" in e.error.message and "FLYTE_ACTOR_TOKEN" in e.error.message
        assert any(r.levelno >= logging.ERROR and "refused the pool's token" in r.getMessage() for r in pool_log)
    finally:
        pool.shutdown()


# ---- replicas the platform takes away ----
def _running(pool, tmp_path):
    """Submits a task that counts its runs, then waits for a release file; returns once it runs on a replica."""
    runs, release = tmp_path / "runs", tmp_path / "release"
    e = pool.submit(execution(tmp_path, tasks.count_then_wait, path=str(runs), release=str(release)))
    wait_until(lambda: runs.exists() and runs.read_text().count("run") == 1, 60)
    return e, runs, release, pool.replicas[0]


def test_an_execution_whose_replica_the_platform_took_runs_again_elsewhere(tmp_path):
    pool = make_pool(tmp_path, system_retries=1)
    try:
        e, runs, release, first = _running(pool, tmp_path)
        taken = _time.monotonic()
        first.abandon("was evicted (node drained)", DeathCause.INFRASTRUCTURE)
        wait_until(lambda: runs.read_text().count("run") == 2, 60)  # dispatched again, to a new replica
        release.write_text("go")
        assert e.wait(60) and e.state is ExecutionState.SUCCEEDED, (e.state, e.death)
        assert e.replica != first.name and e.system_retries == 1
        assert e.queued_at >= taken  # queued again: the dispatch latency counts from then, not the first submit
    finally:
        pool.shutdown()


def test_the_system_retry_budget_ends_in_replica_died_naming_replica_and_cause(tmp_path):
    pool = make_pool(tmp_path, system_retries=0)
    try:
        e, runs, _, replica = _running(pool, tmp_path)
        replica.abandon("was evicted (node drained)", DeathCause.INFRASTRUCTURE)
        assert e.wait(60) and e.state is ExecutionState.REPLICA_DIED
        assert e.death.replica == replica.name and e.death.cause is DeathCause.INFRASTRUCTURE
        assert "evicted" in str(e.death) and "infrastructure" in str(e.death) and "0 system retries" in str(e.death)
        assert runs.read_text().count("run") == 1
    finally:
        pool.shutdown()


def test_a_spent_budget_ends_the_execution_without_waiting_for_the_old_run_to_be_seen_ended(tmp_path):
    pool = make_pool(tmp_path, system_retries=0)
    pool.backend.exit_confirm_s = 60.0  # no retry can follow: waiting for the end would only delay the answer
    e, runs, release, first = _running(pool, tmp_path)
    try:
        first._set_dead("pod not ready for 60s after it was ready (node lost)", None, DeathCause.INFRASTRUCTURE)
        assert e.wait(30) and e.state is ExecutionState.REPLICA_DIED, (e.state, e.death)
        assert "gave up after 0 system retries of 0" in e.death.reason and not first.exited
    finally:
        release.write_text("go")
        first.terminate(0)
        pool.shutdown()


def test_a_system_retry_waits_for_the_old_run_to_end_and_nothing_of_it_is_left_under_the_prefix(tmp_path):
    pool = make_pool(tmp_path, system_retries=1)
    pool.backend.exit_confirm_s = 30.0
    try:
        e, runs, release, first = _running(pool, tmp_path)
        out = ExecutionCommand.parse(e.spec.args).output_prefix
        # a pod deleted by someone else: the platform reports it, then the replica gets its SIGTERM
        first._set_dead("pod was deleted by someone else", None, DeathCause.INFRASTRUCTURE)
        first.terminate(30)
        wait_until(lambda: runs.read_text().count("run") == 2, 60)
        assert first.wait_exited(0), "the retry started while the old replica still ran"
        release.write_text("go")
        assert e.wait(60) and e.state is ExecutionState.SUCCEEDED, (e.state, e.death)
        assert os.path.exists(os.path.join(out, "outputs.pb"))
        assert not os.path.exists(os.path.join(out, "error.pb")), "the terminated run wrote error.pb over the retry"
    finally:
        pool.shutdown()


def test_an_infrastructure_death_whose_replica_is_not_seen_ended_is_not_run_twice(tmp_path):
    pool = make_pool(tmp_path, system_retries=3)
    pool.backend.exit_confirm_s = 1.0
    e, runs, release, first = _running(pool, tmp_path)
    try:
        # e.g. a node gone silent: the platform gave the replica up, but nobody saw its process end
        first._set_dead("pod not ready for 60s after it was ready (node lost)", None, DeathCause.INFRASTRUCTURE)
        assert e.wait(30) and e.state is ExecutionState.REPLICA_DIED, (e.state, e.death)
        assert e.death.cause is DeathCause.INFRASTRUCTURE and "not dispatched again" in e.death.reason
        assert e.system_retries == 0 and runs.read_text().count("run") == 1
    finally:
        release.write_text("go")
        first.terminate(0)
        pool.shutdown()


def test_a_replica_that_dies_of_its_task_is_not_retried(pool, tmp_path):
    e, runs, _, replica = _running(pool, tmp_path)
    os.kill(replica.pid, signal.SIGKILL)  # e.g. the OOM killer: the task's doing
    assert e.wait(60) and e.state is ExecutionState.REPLICA_DIED
    assert e.death.cause is DeathCause.TASK and "SIGKILL" in e.death.reason
    assert runs.read_text().count("run") == 1


# ---- keepalive and bounded waits ----
def test_idle_replicas_are_kept_alive_past_their_orphan_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_module, "KEEPALIVE_S", 0.2)
    pool = make_pool(tmp_path, env={"FLYTE_ACTOR_ORPHAN_TIMEOUT_S": "1.5"})
    try:
        first = pool.submit(execution(tmp_path, tasks.pid))
        assert first.wait(60) and first.state is ExecutionState.SUCCEEDED
        replica = pool.replicas[0]
        wait_until(lambda: pool.stats()["keepalives"] >= 15, 60)  # pings spanning twice the orphan timeout
        assert replica.death is None
        again = pool.submit(execution(tmp_path, tasks.pid))
        assert again.wait(60) and again.replica == replica.name and again.warm
    finally:
        pool.shutdown()


def test_a_replica_that_stops_answering_mid_execution_is_noticed_within_a_wait_round(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_module, "WAIT_ROUND_S", 0.3)
    monkeypatch.setattr(pool_module, "IO_MARGIN_S", 0.7)
    pool = make_pool(tmp_path)
    try:
        release, started = tmp_path / "release", tmp_path / "started"
        e = pool.submit(execution(tmp_path, tasks.wait_for_file, path=str(release), started=str(started)))
        wait_until(started.exists, 60)
        replica = pool.replicas[0]
        os.kill(replica.pid, signal.SIGSTOP)  # frozen, connection open: what a lost node looks like from here
        assert e.wait(30), "a wait on a peer that stopped answering must not block forever"
        assert e.state is ExecutionState.REPLICA_DIED and "stopped answering" in e.death.reason
        assert replica.wait_dead(30) is not None  # the pool replaced it
    finally:
        pool.shutdown()


def test_a_lost_node_reported_after_the_wait_round_timed_out_still_gets_its_system_retry(
    tmp_path, monkeypatch, pool_log
):
    monkeypatch.setattr(pool_module, "WAIT_ROUND_S", 0.3)
    monkeypatch.setattr(pool_module, "IO_MARGIN_S", 0.7)
    pool = make_pool(tmp_path, system_retries=1)
    pool.backend.death_report_grace_s = 60.0  # as on Kubernetes: node-status grace plus not-ready grace
    try:
        e, runs, release, first = _running(pool, tmp_path)
        os.kill(first.pid, signal.SIGSTOP)  # a node gone silent: the connection stays open, nothing answers
        waiting = lambda: any("waiting up to 60s" in r.getMessage() for r in pool_log)  # noqa: E731
        wait_until(lambda: waiting() or e.state.terminal, 30)
        assert e.state is ExecutionState.RUNNING, (e.state, e.death)  # the pool did not decide the cause itself
        first._set_dead("pod not ready for 60s after it was ready (node lost)", None, DeathCause.INFRASTRUCTURE)
        os.kill(first.pid, signal.SIGKILL)  # the node's end: its backend sees the process end
        wait_until(lambda: runs.read_text().count("run") == 2, 60)
        release.write_text("go")
        assert e.wait(60) and e.state is ExecutionState.SUCCEEDED, (e.state, e.death)
        assert e.system_retries == 1 and e.replica != first.name
    finally:
        pool.shutdown()


class _GatedBackend(LocalProcessBackend):
    """Local replicas whose start blocks until the test opens the gate (a slow API call, a process spawn)."""

    def __init__(self):
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def start(self, spec):
        self.entered.set()
        assert self.gate.wait(60)
        return super().start(spec)


def test_stats_count_a_replica_still_being_started_by_its_backend(tmp_path):
    backend = _GatedBackend()
    pool = make_pool(tmp_path, backend=backend)
    try:
        spec = execution(tmp_path, tasks.pid)
        submitter = threading.Thread(target=pool.submit, args=(spec,))
        submitter.start()
        assert backend.entered.wait(60)
        assert pool.stats()["starting"] == 1 and pool.stats()["replicas"] == 0
        backend.gate.set()
        submitter.join(60)
        e = pool.get(spec.execution_id)
        assert e.wait(60) and e.state is ExecutionState.SUCCEEDED
        assert pool.stats()["starting"] == 0
    finally:
        backend.gate.set()
        pool.shutdown()


# ---- re-attach: a pool adopting replicas that hold an execution of a previous process ----


def _orphaned_replica(tmp_path, token):
    """A replica as a previous connector left it: started for a pool that is gone, driven by its own client."""
    spec = ReplicaSpec(
        name=f"prev-{uuid.uuid4().hex[:6]}",
        token=token,
        env={"PYTHONPATH": os.pathsep.join(os.path.abspath(p or ".") for p in sys.path)},
        cwd=os.getcwd(),
        log_dir=os.path.join(str(tmp_path), "logs"),
    )
    replica = LocalProcessBackend().start(spec)
    assert replica.wait_ready(60) is ReplicaState.READY
    return replica


def _submit_directly(replica, token, spec: ExecutionSpec) -> None:
    with contextlib.closing(ReplicaClient(replica.address, token, timeout=10)) as c:
        assert c.request("submit", execution_id=spec.execution_id, args=spec.args, env=spec.env)["ok"]


def _health(replica, token) -> dict:
    with contextlib.closing(ReplicaClient(replica.address, token, timeout=10)) as c:
        return c.request("health")


@contextlib.contextmanager
def _adopting_pool(tmp_path, token, replica):
    """A new pool that adopts `replica` with the previous process's token (as a restarted connector's pool does)."""
    pool = make_pool(tmp_path)
    try:
        pool.adopt(token, [replica])
        yield pool
    finally:
        pool.shutdown()


def _ended_on_an_orphan(tmp_path, task, token="prev-token", **inputs):
    """A replica a previous process left, on which `task` ran to its end with no pool to collect it: (replica, spec)."""
    replica = _orphaned_replica(tmp_path, token)
    spec = execution(tmp_path, task, **inputs)
    _submit_directly(replica, token, spec)
    wait_until(lambda: spec.execution_id in _health(replica, token)["uncollected"], 60, "the uncollected end")
    return replica, spec


def _running_on_an_orphan(tmp_path, token="prev-token"):
    """A replica a previous process left, running `count_then_wait`: (replica, token, spec, runs file, release)."""
    runs, release = tmp_path / "runs", tmp_path / "release"
    replica = _orphaned_replica(tmp_path, token)
    spec = execution(tmp_path, tasks.count_then_wait, path=str(runs), release=str(release))
    _submit_directly(replica, token, spec)
    wait_until(lambda: runs.exists(), 60, "the task running on the orphaned replica")
    return replica, token, spec, runs, release


def test_an_adopted_replica_running_an_execution_is_re_attached_and_its_end_collected(tmp_path):
    replica, token, spec, runs, release = _running_on_an_orphan(tmp_path)
    with _adopting_pool(tmp_path, token, replica) as pool:
        e = pool.get(spec.execution_id)
        assert e is not None and e.reattached and e.dispatched and e.warm
        assert e.state is ExecutionState.RUNNING and e.replica == replica.name and e.log_uri == replica.log_uri
        done = []
        assert pool.submit(spec, on_done=done.append) is e  # idempotent: a re-attached one is never submitted again
        assert pool.submit(spec, on_done=done.append) is e and not done  # only the first submit's on_done is kept
        assert pool.stats()["busy"] == 1 and pool.stats()["reattached"] == 1
        release.write_text("go")
        assert e.wait(60) and e.state is ExecutionState.SUCCEEDED, (e.state, e.error, e.death)
        wait_until(lambda: done == [e], 10, "the first submit's on_done")  # runs right after the state is set
        assert runs.read_text().count("run") == 1
        after = pool.submit(execution(tmp_path, tasks.pid))  # then the slot serves the queue, on the same replica
        assert after.wait(60) and after.state is ExecutionState.SUCCEEDED and after.replica == replica.name
        assert after.warm and pool.stats()["cold"] == 0 and pool.stats()["replicas"] == 1


def test_an_execution_that_ended_while_no_pool_watched_is_collected_by_the_adopting_pool(tmp_path):
    token, runs = "prev-token", tmp_path / "runs"
    replica, spec = _ended_on_an_orphan(tmp_path, tasks.count_run, token, path=str(runs))
    with _adopting_pool(tmp_path, token, replica) as pool:
        e = pool.get(spec.execution_id)
        assert e is not None and e.reattached
        assert e.wait(30) and e.state is ExecutionState.SUCCEEDED, (e.state, e.error)
        done = []
        assert pool.submit(spec, on_done=done.append) is e and done == [e]  # ended already: its on_done runs now
        assert runs.read_text().count("run") == 1
        after = pool.submit(execution(tmp_path, tasks.pid))  # the slot's next request: its end counts as received
        assert after.wait(60) and after.replica == replica.name
        assert spec.execution_id not in _health(replica, token)["uncollected"]  # a later adoption will not see it


def test_a_failed_execution_ended_while_no_pool_watched_is_collected_with_its_error(tmp_path):
    token = "prev-token"
    replica, spec = _ended_on_an_orphan(tmp_path, tasks.user_error, token)
    with _adopting_pool(tmp_path, token, replica) as pool:
        e = pool.get(spec.execution_id)
        assert e.wait(30) and e.state is ExecutionState.FAILED
        assert e.error is not None and e.error.origin.value == "USER", e.error


def test_cancel_of_a_re_attached_execution_reaches_its_replica_and_keeps_it(tmp_path):
    token, started = "prev-token", tmp_path / "started"
    replica = _orphaned_replica(tmp_path, token)
    spec = execution(tmp_path, tasks.sleep_long, started=str(started))
    _submit_directly(replica, token, spec)
    wait_until(started.exists, 60, "the task running on the orphaned replica")
    with _adopting_pool(tmp_path, token, replica) as pool:
        e = pool.cancel(spec.execution_id, grace_seconds=30)
        assert e is not None and e.reattached
        assert e.wait(30) and e.state is ExecutionState.CANCELLED
        assert pool.stats()["deaths"] == 0 and replica.state is ReplicaState.READY  # interrupted, not replaced


def test_a_re_attached_execution_whose_replica_the_platform_took_is_not_dispatched_again(tmp_path):
    replica, token, spec, runs, release = _running_on_an_orphan(tmp_path)
    with _adopting_pool(tmp_path, token, replica) as pool:
        e = pool.get(spec.execution_id)
        replica.abandon("was evicted (node drained)", DeathCause.INFRASTRUCTURE)
        assert e.wait(30) and e.state is ExecutionState.REPLICA_DIED
        assert "re-attached after a connector restart" in e.death.reason, e.death
        assert runs.read_text().count("run") == 1


def _inline_execution(tmp, x: int) -> ExecutionSpec:
    """`echo`-like execution whose inputs travel inline: its inputs file is written only if the pool must."""
    spec = execution(tmp, tasks.repeat, text="x", times=1)
    inputs_path = ExecutionCommand.parse(spec.args).inputs
    os.unlink(inputs_path)
    lm = TypeEngine.dict_to_literal_map(
        FlyteContextManager.current_context(), {"text": "ab", "times": x}, tasks.repeat.python_interface.inputs
    )

    def write(data: bytes) -> None:
        with open(inputs_path, "wb") as f:
            f.write(data)

    spec.inputs_pb, spec.inputs_file = lm.to_flyte_idl().SerializeToString(), write
    return spec


@pytest.mark.parametrize("protocol", [1, 2])
def test_inline_inputs_reach_a_replica_of_either_protocol_version(tmp_path, protocol):
    """A replica image with an older version of this package (protocol 1) ignores inputs_pb and reads the file its
    command names: the pool writes that file for it, and only for it."""
    v1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protocol_v1_replica")
    env = {"PYTHONPATH": os.pathsep.join([v1, *sys.path]), "FLYTE_ACTOR_TEST_PROTOCOL_V1": "1"} if protocol == 1 else {}
    pool = make_pool(tmp_path, env=env)
    try:
        spec = _inline_execution(tmp_path, 3)
        e = pool.submit(spec)
        assert e.wait(60) and e.state is ExecutionState.SUCCEEDED, (e.state, e.error)
        assert os.path.exists(ExecutionCommand.parse(spec.args).inputs) == (protocol == 1)
        (slot,) = pool._slots
        assert slot.protocol == protocol
    finally:
        pool.shutdown()


# ---- a caller that runs its execution itself (run_here: a local run's single call) ----
def test_run_here_runs_on_the_calling_thread_when_a_replica_is_idle_and_queues_otherwise(pool, tmp_path):
    warm = pool.submit(execution(tmp_path, tasks.pid))  # starts the replica: it is idle once this has ended
    assert warm.wait(60) and warm.state is ExecutionState.SUCCEEDED
    dispatched_on = []
    here = pool.submit(
        execution(tmp_path, tasks.pid),
        run_here=True,
        before_dispatch=lambda e: dispatched_on.append(threading.current_thread()),
    )
    assert here.state is ExecutionState.SUCCEEDED  # ended by the time submit returned
    assert dispatched_on == [threading.current_thread()] and here.replica == warm.replica
    # the replica is busy: run_here queues, and the slot thread runs it once the replica is free
    release, started = tmp_path / "release", tmp_path / "started"
    busy = pool.submit(execution(tmp_path, tasks.wait_for_file, path=str(release), started=str(started)))
    wait_until(started.exists, 60, "the long execution to start")
    dispatched_on.clear()
    queued = pool.submit(
        execution(tmp_path, tasks.pid),
        run_here=True,
        before_dispatch=lambda e: dispatched_on.append(threading.current_thread()),
    )
    assert queued.state is ExecutionState.QUEUED
    release.touch()
    assert busy.wait(60) and queued.wait(60) and queued.state is ExecutionState.SUCCEEDED
    assert dispatched_on and dispatched_on[0] is not threading.current_thread()
    assert pool.stats()["deaths"] == 0


def test_a_caller_interrupted_while_running_its_execution_gives_the_replica_up_and_the_pool_goes_on(pool, tmp_path):
    warm = pool.submit(execution(tmp_path, tasks.pid))
    assert warm.wait(60) and warm.state is ExecutionState.SUCCEEDED

    def interrupt(_execution):  # as Ctrl-C would, in the middle of the caller's exchange with the replica
        raise KeyboardInterrupt

    spec = execution(tmp_path, tasks.pid)
    with pytest.raises(KeyboardInterrupt):
        pool.submit(spec, run_here=True, before_dispatch=interrupt)
    interrupted = pool.get(spec.execution_id)
    # the slot thread takes over: the execution ends (never left RUNNING), the replica is replaced
    assert interrupted.wait(60) and interrupted.state is ExecutionState.REPLICA_DIED
    assert "did not complete" in str(interrupted.death)
    after = pool.submit(execution(tmp_path, tasks.pid), run_here=True)
    assert after.wait(60) and after.state is ExecutionState.SUCCEEDED and after.replica != warm.replica

"""The pool under faults: refused submits, backends that cannot start replicas, reaping races, vanished peers,
cancels, and task subprocesses when a replica is stopped. Real replica processes throughout."""

import os
import sys
import threading
import uuid

import pytest
import sdk_worker_tasks as tasks
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.core.utils import write_proto_to_file
from sdk_helpers import pid_alive, wait_until

from flytekitplugins_actor.pool import ExecutionState, PoolRegistry, ReplicaPool
from flytekitplugins_actor.replica.backend import LocalProcessBackend, ReplicaBackend, ReplicaSpec, ReplicaState
from flytekitplugins_actor.replica.command import ExecutionCommand
from flytekitplugins_actor.replica.execution import ExecutionSpec
from flytekitplugins_actor.replica.protocol import ProtocolError, ReplicaClient

pytestmark = pytest.mark.timeout(120)

RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"


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


def make_pool(tmp, backend=None, size=1, ttl=300):
    env = {"PYTHONPATH": os.pathsep.join(os.path.abspath(p or ".") for p in sys.path)}

    def make_spec(name, token):
        return ReplicaSpec(name=name, token=token, env=env, cwd=os.getcwd(), log_dir=os.path.join(str(tmp), "logs"))

    return ReplicaPool(
        f"k-{uuid.uuid4().hex[:6]}", backend or LocalProcessBackend(), make_spec, size, ttl, name="faults"
    )


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
    wait_until(lambda: not pid_alive(child), 30, message=f"task subprocess {child} outlived its replica")
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

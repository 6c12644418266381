"""End to end through a real `pyflyte serve connector`: single actor executions, as propeller drives them."""

import os
import signal
import time

import actor_tasks as t
import grpc
import pytest
from flyteidl.admin import agent_pb2
from harness import PHASE, Attempt, literal_map, output_value, serialize
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def _lines(path):
    return open(path).read().split("\n")[:-1] if os.path.exists(path) else []


def test_list_agents_serves_actor_and_actor_map(server):
    agents = server.metadata_stub.ListAgents(agent_pb2.ListAgentsRequest(), timeout=5).agents
    types = {c.name for a in agents for c in a.supported_task_categories}
    assert {"actor", "actor_map"} <= types


def test_success_writes_outputs_and_links_the_replica_log(propeller, base):
    a = Attempt(base, t.add, literal_map(t.add, a=1, b=2))
    meta = propeller.create(a)
    assert len(meta) < 1024
    r = propeller.wait(meta)
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", int) == 3
    assert r.log_links and r.log_links[0].uri.startswith("file://")
    assert os.path.exists(r.log_links[0].uri[len("file://") :])


def test_identity_env_is_derived_from_the_task_execution_id(propeller, base):
    a = Attempt(base, t.echo_identity, literal_map(t.echo_identity), retry=2)
    r = propeller.wait(propeller.create(a))
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", str) == f"{a.exec_name}/{a.template.id.name}/2"


def test_user_error_fails_with_the_exception_message(propeller, base):
    a = Attempt(base, t.fail, literal_map(t.fail, message="boom-1234"))
    r = propeller.wait(propeller.create(a))
    assert r.phase == PHASE.FAILED
    assert "boom-1234" in r.message and "ValueError" in r.message


def test_recoverable_user_error_is_retryable(propeller, base):
    a = Attempt(base, t.flaky, literal_map(t.flaky, message="try-again-77"))
    r = propeller.wait(propeller.create(a))
    assert r.phase == PHASE.RETRYABLE_FAILED
    assert "try-again-77" in r.message


def test_error_pb_fails_a_task_without_outputs(propeller, base):
    a = Attempt(base, t.fail_no_outputs, literal_map(t.fail_no_outputs, message="no-outputs-but-failed"))
    assert not a.template.interface.outputs.variables
    r = propeller.wait(propeller.create(a))
    assert r.phase == PHASE.FAILED
    assert "no-outputs-but-failed" in r.message
    assert os.path.exists(os.path.join(a.dir, "error.pb"))


def test_create_is_idempotent_per_attempt(propeller, base):
    counter, gate = os.path.join(base, "count"), os.path.join(base, "gate")
    open(gate, "w").close()
    inputs = literal_map(t.wait_for_file, path=gate, counter=counter, label="x")
    a = Attempt(base, t.wait_for_file, inputs, exec_name="idem")
    metas = {propeller.create(a) for _ in range(3)}
    assert len(metas) == 1
    assert propeller.wait(metas.pop()).phase == PHASE.SUCCEEDED
    assert propeller.create(a) is not None  # a late repeat: still the same execution, not a new run
    assert propeller.wait(propeller.create(a)).phase == PHASE.SUCCEEDED
    assert len(_lines(counter)) == 1
    retry = Attempt(base, t.wait_for_file, inputs, exec_name="idem", retry=1)  # the next attempt does run
    assert propeller.wait(propeller.create(retry)).phase == PHASE.SUCCEEDED
    assert len(_lines(counter)) == 2


def test_busy_replica_queues_executions_fifo(propeller, base):
    counter, gate = os.path.join(base, "count"), os.path.join(base, "gate")
    attempts = [
        Attempt(base, t.wait_for_file, literal_map(t.wait_for_file, path=gate, counter=counter, label=lbl))
        for lbl in "ABC"
    ]
    first = propeller.create(attempts[0])
    propeller.wait(first, phases={PHASE.RUNNING})
    started = time.monotonic()
    rest = [propeller.create(a) for a in attempts[1:]]
    assert time.monotonic() - started < 1.0, "create must queue, not wait for a replica"
    assert [propeller.get(m).phase for m in rest] == [PHASE.QUEUED, PHASE.QUEUED]
    open(gate, "w").close()
    for m in [first, *rest]:
        assert propeller.wait(m).phase == PHASE.SUCCEEDED
    assert [line.split()[0] for line in _lines(counter)] == ["A", "B", "C"]


def test_delete_drops_queued_and_aborts_running(propeller, base):
    counter, gate = os.path.join(base, "count"), os.path.join(base, "gate")
    running = Attempt(base, t.wait_for_file, literal_map(t.wait_for_file, path=gate, counter=counter, label="running"))
    queued = Attempt(base, t.wait_for_file, literal_map(t.wait_for_file, path=gate, counter=counter, label="queued"))
    m_running = propeller.create(running)
    propeller.wait(m_running, phases={PHASE.RUNNING})
    wait_until(lambda: _lines(counter), 30, "the task to start on its replica")
    m_queued = propeller.create(queued)
    assert propeller.get(m_queued).phase == PHASE.QUEUED
    propeller.delete(m_queued)
    propeller.delete(m_running)
    assert propeller.get(m_running).phase == PHASE.ABORTED
    for m in (m_queued, m_running):  # repeated and late deletes are quiet
        propeller.delete(m)
        propeller.delete(m)
    after = Attempt(base, t.add, literal_map(t.add, a=2, b=3))  # the replica is free (or replaced) for the next one
    assert propeller.wait(propeller.create(after)).phase == PHASE.SUCCEEDED
    assert [line.split()[0] for line in _lines(counter)] == ["running"]


def test_replica_exit_is_retryable_and_replaced(propeller, base):
    counter = os.path.join(base, "count")
    a = Attempt(base, t.die, literal_map(t.die, counter=counter))
    r = propeller.wait(propeller.create(a))
    assert r.phase == PHASE.RETRYABLE_FAILED
    assert "replica conn-test-" in r.message and "exited with code 3" in r.message
    b = Attempt(base, t.add, literal_map(t.add, a=20, b=22))
    assert propeller.wait(propeller.create(b)).phase == PHASE.SUCCEEDED
    assert output_value(b.outputs(), "o0", int) == 42


def _replica_pid(resource):
    """The pid of the replica GetTask says runs the execution, from the 'listening ... (pid N)' line of its log."""
    log = resource.log_links[0].uri[len("file://") :]
    first = open(log).read().split("listening on")[-1]
    return int(first.split("(pid ")[1].split(")")[0])


def test_replica_sigkill_is_retryable_and_replaced(propeller, base):
    gate, counter = os.path.join(base, "gate"), os.path.join(base, "count")
    a = Attempt(base, t.wait_for_file, literal_map(t.wait_for_file, path=gate, counter=counter, label="k"))
    meta = propeller.create(a)
    running = propeller.wait(meta, phases={PHASE.RUNNING})
    started = wait_until(lambda: os.path.exists(counter) and open(counter).read().split(), 30, "the task to start")
    replica_pid = _replica_pid(running)
    assert started[1] == str(replica_pid)
    os.kill(replica_pid, signal.SIGKILL)
    r = propeller.wait(meta)
    assert r.phase == PHASE.RETRYABLE_FAILED
    assert "SIGKILL" in r.message and "replica conn-test-" in r.message
    again = Attempt(base, t.pid, literal_map(t.pid))
    assert propeller.wait(propeller.create(again)).phase == PHASE.SUCCEEDED
    assert output_value(again.outputs(), "o0", int) != replica_pid


def test_namespaces_and_service_accounts_never_share_replicas(propeller, base):
    pids = set()
    for ns, sa in [("team-a", "default"), ("team-b", "default"), ("team-a", "other")]:
        a = Attempt(base, t.pid, literal_map(t.pid), namespace=ns, service_account=sa)
        started = time.monotonic()
        meta = propeller.create(a)
        assert time.monotonic() - started < 1.0, "create never waits for a cold replica"
        assert propeller.get(meta).phase in (PHASE.INITIALIZING, PHASE.QUEUED, PHASE.RUNNING, PHASE.SUCCEEDED)
        assert propeller.wait(meta).phase == PHASE.SUCCEEDED
        pids.add(output_value(a.outputs(), "o0", int))
    assert len(pids) == 3


def _invalid(template_edit):
    def edit(base):
        tt = serialize(t.add)
        template_edit(tt)
        return Attempt(base, t.add, literal_map(t.add, a=1, b=1), template=tt)

    return edit


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_invalid(lambda tt: tt.ClearField("custom")), "custom is missing"),
        (_invalid(lambda tt: setattr(tt, "task_type_version", 7)), "version 7 is unknown"),
        (_invalid(lambda tt: tt.ClearField("container")), "no container"),
        (_invalid(lambda tt: tt.custom["spec"].update({"replica_count": "many"})), "replica_count"),
        (_invalid(lambda tt: tt.custom.update({"type": "pod"})), "custom.type"),
    ],
)
def test_invalid_templates_are_refused_with_invalid_argument(propeller, base, edit, expected):
    with pytest.raises(grpc.RpcError) as e:
        propeller.create(edit(base))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in e.value.details() and "Traceback" not in e.value.details()


def test_unrendered_args_are_refused(server, base):
    a = Attempt(base, t.add, literal_map(t.add, a=1, b=1))
    a.template.container.args[1] = "{{.input}}"
    with pytest.raises(grpc.RpcError) as e:
        server.stub.CreateTask(a.request(), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "placeholders" in e.value.details()


def test_metrics_expose_pools_queues_dispatches_and_deaths(server, propeller, base):
    a = Attempt(base, t.add, literal_map(t.add, a=1, b=1))
    assert propeller.wait(propeller.create(a)).phase == PHASE.SUCCEEDED
    text = server.metrics()
    for name in (
        "flyte_actor_queue_depth{",
        "flyte_actor_pool_size{",
        "flyte_actor_replicas{",
        'state="busy"',
        'state="idle"',
        "flyte_actor_dispatches_total{",
        'kind="warm"',
        'kind="cold"',
        "flyte_actor_replica_deaths_total{",
        "flyte_actor_dispatch_latency_seconds_bucket{",
    ):
        assert name in text, name


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone, only not yet reaped
    except FileNotFoundError:
        return False


def test_pool_idle_past_ttl_is_torn_down(propeller, base):
    a = Attempt(base, t.pid_short_ttl, literal_map(t.pid_short_ttl))
    assert propeller.wait(propeller.create(a)).phase == PHASE.SUCCEEDED
    replica_pid = output_value(a.outputs(), "o0", int)
    wait_until(lambda: not _alive(replica_pid), 15, "the idle pool's replica to be torn down after ttl_seconds=1")
    b = Attempt(base, t.pid_short_ttl, literal_map(t.pid_short_ttl))
    assert propeller.wait(propeller.create(b)).phase == PHASE.SUCCEEDED  # a new pool serves the next one
    assert output_value(b.outputs(), "o0", int) != replica_pid


def test_pod_template_environment_runs_with_the_pod_templates_env(propeller, base):
    """An environment with a pod_template serializes a k8s_pod, not a container, and propeller renders no
    placeholders in it: the connector renders them and the replica gets the primary container's env."""
    a = Attempt(base, t.get_and_set, literal_map(t.get_and_set, x=7))
    assert not a.template.HasField("container") and a.template.HasField("k8s_pod")
    meta = propeller.create(a)
    assert len(meta) < 1024
    r = propeller.wait(meta)
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", str) == "compile_time/from-environment/7"
    b = Attempt(base, t.check_set, literal_map(t.check_set))  # the same warm replica ran both tasks
    r = propeller.wait(propeller.create(b))
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(b.outputs(), "o0", str) == "run_time"

"""The synchronous path (task type actor_sync), driven over gRPC as propeller 1.16.8 drives a sync connector:
one ExecuteTaskSync stream per attempt (header, then inputs), one terminal answer with the outputs inline."""

import os

import actor_tasks as t
import pytest
from flyteidl.admin import agent_pb2
from harness import PHASE, Attempt, ConnectorServer, Propeller, literal_map, output_value
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def _value(resource, name, python_type):
    return output_value(resource.outputs, name, python_type)


def test_sync_tasks_serialize_as_actor_sync_with_the_same_custom():
    from harness import serialize

    sync, plain = serialize(t.add_sync), serialize(t.add)
    assert sync.type == "actor_sync" and plain.type == "actor"
    assert sync.custom == plain.custom and sync.task_type_version == 0
    assert t.add_sync.sync and not t.add.sync


def test_sync_runs_locally_exactly_as_actor():
    assert t.add_sync(a=2, b=40) == 42


def test_list_agents_marks_actor_sync_as_sync(server):
    agents = server.metadata_stub.ListAgents(agent_pb2.ListAgentsRequest(), timeout=5).agents
    sync = {c.name for a in agents if a.is_sync for c in a.supported_task_categories}
    not_sync = {c.name for a in agents if not a.is_sync for c in a.supported_task_categories}
    assert "actor_sync" in sync and {"actor", "actor_map"} <= not_sync


def test_sync_answers_succeeded_with_inline_outputs_in_one_call(propeller, base):
    a = Attempt(base, t.add_sync, literal_map(t.add_sync, a=1, b=2))
    r = propeller.execute_sync(a)
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert _value(r, "o0", int) == 3
    assert output_value(a.outputs(), "o0", int) == 3  # outputs.pb is written too
    assert r.log_links and r.log_links[0].uri.startswith("file://")


def test_sync_and_async_executions_of_one_environment_share_replicas(propeller, base):
    a = Attempt(base, t.pid, literal_map(t.pid))
    assert propeller.wait(propeller.create(a)).phase == PHASE.SUCCEEDED
    s = Attempt(base, t.pid_sync, literal_map(t.pid_sync))
    r = propeller.execute_sync(s)
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert _value(r, "o0", int) == output_value(a.outputs(), "o0", int)


def test_repeated_execute_task_sync_of_one_attempt_runs_once(propeller, base):
    counter = os.path.join(base, "count")
    a = Attempt(base, t.nap_sync, literal_map(t.nap_sync, seconds=0.0, counter=counter), exec_name="sync-idem")
    first = propeller.execute_sync(a)
    assert first.phase == PHASE.SUCCEEDED, first.message
    again = propeller.execute_sync(a)  # propeller retries a Create whose answer it lost: same execution
    assert again.phase == PHASE.SUCCEEDED and _value(again, "o0", int) == _value(first, "o0", int)
    assert len(open(counter).read().splitlines()) == 1


def test_user_error_on_the_sync_path_fails_with_its_message(propeller, base):
    from harness import serialize

    tt = serialize(t.fail)
    tt.type = "actor_sync"
    a = Attempt(base, t.fail, literal_map(t.fail, message="sync-boom-99"), template=tt)
    r = propeller.execute_sync(a)
    assert r.phase == PHASE.FAILED and "sync-boom-99" in r.message


def _overruns(server, reason: str) -> float:
    """The connector's flyte_actor_sync_overruns_total for environment conn-test and `reason` (0 if never)."""
    prefix = f'flyte_actor_sync_overruns_total{{env="conn-test",reason="{reason}"}} '
    return next((float(x[len(prefix) :]) for x in server.metrics().splitlines() if x.startswith(prefix)), 0.0)


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """A connector whose sync budget (0.25 s) is shorter than any replica start (importing flytekit alone: ~0.7 s)."""
    s = ConnectorServer(str(tmp_path_factory.mktemp("tight")), env={"FLYTE_ACTOR_SYNC_BUDGET_S": "0.25"}).start()
    yield s
    s.stop()


def test_sync_on_a_cold_pool_answers_retryable_failed_saying_it_is_starting(tight, tmp_path):
    propeller, base = Propeller(tight), str(tmp_path)
    a = Attempt(base, t.add_sync, literal_map(t.add_sync, a=1, b=1))
    r = propeller.execute_sync(a)
    assert r.phase == PHASE.RETRYABLE_FAILED, r.message
    assert "pool still starting" in r.message and "FLYTE_ACTOR_SYNC_BUDGET_S" in r.message
    assert _overruns(tight, "pool_starting") >= 1
    assert not os.path.exists(os.path.join(a.dir, "outputs.pb"))
    # the replicas kept starting: a retry (propeller's next attempt) finds the pool warm and succeeds in the budget
    retries = iter(range(1, 1000))

    def retry():
        n = next(retries)
        r = propeller.execute_sync(
            Attempt(base, t.add_sync, literal_map(t.add_sync, a=1, b=1), exec_name=a.exec_name, retry=n)
        )
        return r if r.phase == PHASE.SUCCEEDED else None

    r = wait_until(retry, 60, "a retry on the warmed pool to succeed", interval=0.1)
    assert _value(r, "o0", int) == 2


def test_sync_task_longer_than_the_budget_is_cancelled_and_retryable(tight, tmp_path):
    propeller, base = Propeller(tight), str(tmp_path)
    warm = Attempt(base, t.pid, literal_map(t.pid))
    assert Propeller(tight).wait(propeller.create(warm)).phase == PHASE.SUCCEEDED
    counter = os.path.join(base, "count")
    wait_until(  # a new attempt each try: a repeated attempt gets its first answer again
        lambda: (
            propeller.execute_sync(Attempt(base, t.nap_sync, literal_map(t.nap_sync, seconds=0.0, counter=""))).phase
            == PHASE.SUCCEEDED
        ),
        30,
        "nap_sync imported and warm",
        interval=0.1,
    )
    too_long = _overruns(tight, "too_long")
    a = Attempt(base, t.nap_sync, literal_map(t.nap_sync, seconds=30.0, counter=counter))
    r = propeller.execute_sync(a, timeout=20)
    assert r.phase == PHASE.RETRYABLE_FAILED, r.message
    assert "too long for the sync path" in r.message and "sync=True" in r.message
    assert _overruns(tight, "too_long") == too_long + 1
    assert len(open(counter).read().splitlines()) == 1  # it did start
    after = Attempt(base, t.pid, literal_map(t.pid))  # cancelled, not left running: the replica is free again
    assert propeller.wait(propeller.create(after), timeout=20).phase == PHASE.SUCCEEDED


def test_sync_must_be_a_bool():
    with pytest.raises(TypeError, match="sync must be a bool"):
        t.env.task(sync="yes")


def test_a_sync_template_the_connector_cannot_serve_gets_invalid_argument(propeller, base):
    import grpc

    a = Attempt(base, t.add_sync, literal_map(t.add_sync, a=1, b=2))
    a.template.task_type_version = 7
    with pytest.raises(grpc.RpcError) as e:
        propeller.execute_sync(a)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version 7 is unknown" in e.value.details() and "Traceback" not in e.value.details()
    b = Attempt(base, t.add_sync, literal_map(t.add_sync, a=1, b=2))
    b.template.container.args[1] = "{{.input}}"
    with pytest.raises(grpc.RpcError) as e:
        propeller.execute_sync(b)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "placeholders" in e.value.details()


def test_sync_outputs_over_1_mib_go_by_reference_not_inline(propeller, base):
    n = 5 * 1024 * 1024  # inline, the answer would exceed gRPC's 4 MiB receive limit (propeller's and ours)
    a = Attempt(base, t.big_sync, literal_map(t.big_sync, n=n))
    r = propeller.execute_sync(a)
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert not r.outputs.literals  # propeller reads outputs.pb when the answer has none
    assert len(output_value(a.outputs(), "o0", str)) == n
    small = Attempt(base, t.big_sync, literal_map(t.big_sync, n=10))
    assert _value(propeller.execute_sync(small), "o0", str) == "x" * 10


def test_a_sync_call_propeller_gives_up_on_is_cancelled_at_once_not_at_the_budget(server, propeller, base):
    """The module's connector has the default 10 s budget; this caller's deadline is 1.5 s (a propeller whose
    timeouts.ExecuteTaskSync is too short). The execution must not keep the environment's only replica busy."""
    import time

    import grpc

    counter = os.path.join(base, "count")
    a = Attempt(base, t.nap_sync, literal_map(t.nap_sync, seconds=30.0, counter=counter))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        propeller.execute_sync(a, timeout=1.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = Attempt(base, t.pid, literal_map(t.pid))
    assert propeller.wait(propeller.create(after), timeout=30).phase == PHASE.SUCCEEDED
    assert time.monotonic() - started < 7.0, "the abandoned execution held the replica until the 10 s budget"
    assert len(open(counter).read().splitlines()) == 1
    prefix = 'flyte_actor_sync_overruns_total{env="conn-test",reason="abandoned"} '
    assert any(x.startswith(prefix) for x in server.metrics().splitlines())

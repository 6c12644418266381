"""Unit tests of the connector's pure parts: template validation, resource meta, identity, map split/gather."""

import functools

import actor_tasks as t
import pytest
from flyteidl.core import literals_pb2
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate
from harness import Attempt, literal_map
from waiting import wait_until

from flytekitplugins_actor.actor_map import map as actor_map
from flytekitplugins_actor.map_model import MapDecision, MapPhase
from plugin_backend.errors import InvalidActorRequest, InvalidResourceMeta, InvalidTaskTemplate
from plugin_backend.identity import identity_of
from plugin_backend.map_run import plan_of
from plugin_backend.meta import ActorResourceMeta
from plugin_backend.template import DEFAULT_TTL_SECONDS, parse_template

pytestmark = pytest.mark.timeout(60)


def _template(task, base, **inputs):
    a = Attempt(base, task, literal_map(task, **inputs))
    return a, TaskTemplate.from_flyte_idl(a.template)


def test_union_sdk_shape_is_accepted(tmp_path):
    a, tt = _template(t.add, str(tmp_path), a=1, b=2)
    tt.custom["spec"] = {
        "container_image": "img",
        "replica_count": 2.0,
        "ttl_seconds": 30.0,
        "parallelism": 1.0,
        "backlog_length": 5.0,
    }
    parsed = parse_template(tt, "actor")
    assert parsed.replica_count == 2 and parsed.ttl_seconds == 30 and parsed.image == "img"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"replica_count": 0}, "replica_count=0"),
        ({"replica_count": True}, "replica_count=True"),
        ({"ttl_seconds": -1}, "ttl_seconds=-1"),
        ({"parallelism": 0}, "parallelism=0"),
    ],
)
def test_malformed_spec_is_refused(tmp_path, spec, expected):
    a, tt = _template(t.add, str(tmp_path), a=1, b=2)
    tt.custom["spec"].update(spec)
    with pytest.raises(InvalidTaskTemplate, match=expected):
        parse_template(tt, "actor")


def test_map_template_needs_a_map_spec(tmp_path):
    m = actor_map(functools.partial(t.square, counter="", gate=""), concurrency=3, min_success_ratio=0.5)
    a, tt = _template(m, str(tmp_path), x=[1, 2])
    parsed = parse_template(tt, "actor_map")
    assert parsed.map.mapped_inputs == ("x",) and set(parsed.map.bound_inputs) == {"counter", "gate"}
    assert parsed.map.concurrency == 3 and parsed.map.required_successes(4) == 2
    del tt.custom["spec"]["map"]
    with pytest.raises(InvalidTaskTemplate, match="spec.map is missing"):
        parse_template(tt, "actor_map")


def test_resource_meta_is_small_and_self_describing(tmp_path):
    meta = ActorResourceMeta(
        "e" * 80, "s3://bucket/" + "p" * 400, "actor_map", "env-name", "k" * 15, "ns-" * 20, "sa" * 30, "c" * 12
    )
    data = meta.encode()
    assert len(data) < 1024
    assert ActorResourceMeta.decode(data) == meta
    with pytest.raises(InvalidResourceMeta):
        ActorResourceMeta.decode(b"not json")


def test_execution_id_is_stable_per_attempt_and_distinct_across_retries(tmp_path):
    a = Attempt(str(tmp_path), t.add, literal_map(t.add, a=1, b=2), exec_name="abc", retry=0)
    b = Attempt(str(tmp_path), t.add, literal_map(t.add, a=1, b=2), exec_name="abc", retry=1)
    ida = identity_of(TaskExecutionMetadata.from_flyte_idl(a.metadata), "t")
    assert ida.execution_id == identity_of(TaskExecutionMetadata.from_flyte_idl(a.metadata), "t").execution_id
    idb = identity_of(TaskExecutionMetadata.from_flyte_idl(b.metadata), "t")
    assert ida.execution_id != idb.execution_id
    assert ida.env["FLYTE_INTERNAL_EXECUTION_ID"] == "abc" and idb.env["FLYTE_ATTEMPT_NUMBER"] == "1"
    assert ida.namespace == "flytesnacks-development"
    local = identity_of(None, "t")
    assert local.execution_id.startswith("local-") and local.execution_id != identity_of(None, "t").execution_id


def test_map_plan_splits_and_gathers_in_order(tmp_path):
    m = actor_map(functools.partial(t.square, counter="c", gate=""))
    a, tt = _template(m, str(tmp_path), x=[5, 6, 7])
    plan = plan_of(a.inputs, parse_template(tt, "actor_map").map)
    assert plan.size == 3
    item = plan.item_inputs(1)
    assert (
        item.literals["x"].scalar.primitive.integer == 6
        and item.literals["counter"].scalar.primitive.string_value == "c"
    )
    outs = [
        literals_pb2.LiteralMap(
            literals={
                "o0": literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(integer=v)))
            }
        )
        for v in (25, 49)
    ]
    gathered = plan.gather(["o0"], [outs[0], None, outs[1]])
    lits = gathered.literals["o0"].collection.literals
    assert [lits[0].scalar.primitive.integer, lits[2].scalar.primitive.integer] == [25, 49]
    assert lits[1].scalar.HasField("none_type")


def test_mapped_lists_of_different_lengths_are_refused(tmp_path):
    from plugin_backend.template import MapSpec

    inputs = literals_pb2.LiteralMap()
    for name, n in (("a", 2), ("b", 3)):
        inputs.literals[name].collection.literals.extend([literals_pb2.Literal()] * n)
    with pytest.raises(InvalidActorRequest, match="different lengths"):
        plan_of(inputs, MapSpec(("a", "b"), (), "s"))


def test_template_record_round_trips_for_restarts(tmp_path):
    import json

    m = actor_map(functools.partial(t.square, counter="", gate=""), concurrency=2, min_success_ratio=0.5)
    a, tt = _template(m, str(tmp_path), x=[1])
    parsed = parse_template(tt, "actor_map")
    from plugin_backend.template import ActorTemplate

    again = ActorTemplate.from_record(json.loads(json.dumps(parsed.to_record())))
    assert again == parsed


class _FakePool:
    """A pool whose first run of each item ends CANCELLED (as when the pool is closed under the map)."""

    size = 1

    def __init__(self):
        self.runs = []
        self.forgotten = []

    def submit(self, spec, on_done=None, **_):
        from flytekitplugins_actor.pool import Execution, ExecutionState
        from plugin_backend import store

        i = int(spec.execution_id.rsplit(".", 1)[1])
        e = Execution(spec=spec)
        if i in self.runs:
            prefix = spec.args[spec.args.index("--output-prefix") + 1]
            store.write_bytes(
                store.join(prefix, "outputs.pb"),
                literals_pb2.LiteralMap(
                    literals={
                        "o0": literals_pb2.Literal(
                            scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(integer=i * i))
                        )
                    }
                ).SerializeToString(),
            )
            e.state = ExecutionState.SUCCEEDED
        else:
            e.state = ExecutionState.CANCELLED
        self.runs.append(i)
        on_done(e)
        return e

    def forget(self, execution_id):
        self.forgotten.append(execution_id)

    def cancel(self, execution_id, grace_seconds=0.0):
        pass


def _map_run(tmp_path, pool, x, write_error=None):
    from plugin_backend import store
    from plugin_backend.map_run import MapRun

    m = actor_map(functools.partial(t.square, counter="", gate=""))
    a, tt = _template(m, str(tmp_path), x=x)
    template = parse_template(tt, "actor_map")
    return MapRun("m1", template, plan_of(a.inputs, template.map), store.ExecutionRecord(a.dir), {}, lambda: pool)


def test_map_items_cancelled_under_the_map_are_dispatched_again(tmp_path):
    pool = _FakePool()
    run = _map_run(tmp_path, pool, [2, 3]).start()
    assert run.finished.wait(10), "the map never finished: a cancelled item left it waiting forever"
    assert run.phase is MapPhase.SUCCEEDED, run.message
    assert sorted(pool.runs) == [0, 0, 1, 1]
    from plugin_backend import store

    outputs = literals_pb2.LiteralMap.FromString(store.read_bytes(run.record.path("outputs.pb")))
    lits = outputs.literals["o0"].collection.literals
    assert [lit.scalar.primitive.integer for lit in lits] == [0, 1]


def test_map_failure_is_decided_even_when_its_error_document_cannot_be_written(tmp_path, mocker):
    run = _map_run(tmp_path, _FakePool(), [2])
    mocker.patch("plugin_backend.map_run.write_error_document", side_effect=OSError("storage down"))
    run._conclude(MapDecision(MapPhase.FAILED, "1 of 1 items failed", recoverable=True))
    assert run.phase is MapPhase.FAILED and run.message == "1 of 1 items failed" and run.recoverable


class _FakeManager:
    """A PoolManager stand-in behind ActorService's public constructor: submit_for answers from `submits` (an
    Execution, or an exception to raise), find returns `pool`."""

    def __init__(self, submits, pool=None):
        self.submits, self.pool, self.submitted = list(submits), pool, 0

    def submit_for(self, key, template, spec, **kwargs):
        self.submitted += 1
        result = self.submits.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result

    def find(self, key):
        return self.pool

    def pools(self):
        return []

    def shutdown(self):
        pass


def _stored_execution(tmp_path, manager):
    """An execution created by a previous connector process: only its request record is in storage."""
    from plugin_backend import store
    from plugin_backend.meta import ActorResourceMeta
    from plugin_backend.service import ActorService

    a, tt = _template(t.add, str(tmp_path), a=1, b=2)
    template = parse_template(tt, "actor")
    store.ExecutionRecord(a.dir).create_request(
        {
            "execution_id": "x1",
            "kind": "actor",
            "namespace": "ns",
            "service_account": "sa",
            "env": {},
            "template": template.to_record(),
        }
    )
    meta = ActorResourceMeta("x1", a.dir, "actor", template.env_name, template.env_key, "ns", "sa", "c")
    return ActorService(manager), meta, template


def _execution(template, state):
    from flytekitplugins_actor.pool import Execution
    from flytekitplugins_actor.replica.execution import ExecutionSpec

    return Execution(spec=ExecutionSpec("x1", template.args, {}), state=state)


def test_adoption_whose_start_fails_leaves_no_broken_entry(tmp_path):
    from flyteidl.core.execution_pb2 import TaskExecution

    from flytekitplugins_actor.pool import ExecutionState

    manager = _FakeManager([RuntimeError("pool for add kept closing")])
    svc, meta, template = _stored_execution(tmp_path, manager)
    with pytest.raises(RuntimeError, match="kept closing"):
        svc.get(meta)
    assert svc.entries() == 0  # not a ready entry without an execution
    manager.submits.append(_execution(template, ExecutionState.SUCCEEDED))  # the next GetTask adopts it again
    assert svc.get(meta).phase == TaskExecution.SUCCEEDED
    assert manager.submitted == 2


def test_delete_forgets_the_cancelled_execution_in_its_pool(tmp_path):
    from flyteidl.core.execution_pb2 import TaskExecution

    from flytekitplugins_actor.pool import ExecutionState

    pool = _FakePool()
    svc, meta, template = _stored_execution(tmp_path, _FakeManager([], pool))
    execution = _execution(template, ExecutionState.RUNNING)
    svc.manager.submits.append(execution)

    def cancel(execution_id, grace_seconds=0.0):
        execution.state = ExecutionState.CANCELLED
        execution._done.set()

    pool.cancel = cancel
    assert svc.get(meta).phase == TaskExecution.RUNNING  # adopted: queued again on the (fake) pool
    svc.delete(meta)
    assert pool.forgotten == ["x1"]  # a never-idle pool does not keep it
    assert svc.get(meta).phase == TaskExecution.ABORTED


def test_an_execution_that_stops_after_delete_answered_is_forgotten_later_without_a_thread(tmp_path, mocker):
    import threading

    from flyteidl.core.execution_pb2 import TaskExecution

    from flytekitplugins_actor.pool import ExecutionState

    pool = _FakePool()
    svc, meta, template = _stored_execution(tmp_path, _FakeManager([], pool))
    execution = _execution(template, ExecutionState.RUNNING)
    svc.manager.submits.append(execution)
    pool.cancel = lambda execution_id, grace_seconds=0.0: None  # its replica is still being restarted to stop it
    assert svc.get(meta).phase == TaskExecution.RUNNING
    threads = threading.active_count()
    svc.delete(meta)
    assert threading.active_count() == threads  # no fire-and-forget thread waits for it
    assert svc.get(meta).phase == TaskExecution.ABORTED and pool.forgotten == []
    execution.state = ExecutionState.REPLICA_DIED  # the restart ends it
    execution._done.set()
    mocker.patch("plugin_backend.service.GC_INTERVAL_S", 0.0)
    assert svc.get(meta).phase == TaskExecution.ABORTED
    assert pool.forgotten == ["x1"]


def test_getters_never_create_a_pool(tmp_path):
    from flyteidl.core.execution_pb2 import TaskExecution

    from flytekitplugins_actor.pool import ExecutionState

    svc, meta, template = _stored_execution(tmp_path, _FakeManager([], pool=None))
    svc.manager.submits.append(_execution(template, ExecutionState.QUEUED))
    status = svc.get(meta)  # its pool is gone (find answers None): QUEUED, and nothing is created
    assert status.phase == TaskExecution.QUEUED
    svc.delete(meta)
    assert svc.manager.submitted == 1


def test_map_abort_cancels_and_forgets_every_item_in_flight(tmp_path):
    class CancelPool(_FakePool):
        def __init__(self):
            super().__init__()
            self.cancelled = []

        def cancel(self, execution_id, grace_seconds=0.0):  # as the pool's: returns at once, escalates later
            self.cancelled.append((execution_id, grace_seconds))

    pool = CancelPool()
    run = _map_run(tmp_path, pool, list(range(8)))
    assert run.tally.take(8) == list(range(8))  # all eight in flight
    run._cancel_inflight()
    assert sorted(pool.cancelled) == sorted((f"m1.{i}", run.CANCEL_GRACE_S) for i in range(8))
    assert sorted(pool.forgotten) == sorted(f"m1.{i}" for i in range(8)) and not run.tally.inflight


def test_pod_template_task_parses_from_its_primary_container_and_round_trips(tmp_path):
    import json

    from plugin_backend.template import ActorTemplate

    a, tt = _template(t.get_and_set, str(tmp_path), x=1)
    parsed = parse_template(tt, "actor")
    assert parsed.needs_render and parsed.primary_container_name == "main"
    assert parsed.container_env["COMP_KEY_EX"] == "compile_time"
    assert all("args" not in c for c in parsed.pod_spec["containers"] if c["name"] == "main")  # records stay small
    rendered = parsed.rendered(
        {
            "input": "/in.pb",
            "outputprefix": "/out",
            "rawoutputdataprefix": "/raw",
            "checkpointoutputprefix": "/ck",
            "prevcheckpointprefix": '""',
        }
    )
    assert rendered.command.inputs == "/in.pb" and not rendered.needs_render
    assert ActorTemplate.from_record(json.loads(json.dumps(rendered.to_record()))) == rendered
    a.template.config["primary_container_name"] = "nope"
    with pytest.raises(InvalidTaskTemplate, match="no primary container named 'nope'"):
        parse_template(TaskTemplate.from_flyte_idl(a.template), "actor")


def test_union_sdk_nulls_mean_the_defaults(tmp_path):
    a, tt = _template(t.add, str(tmp_path), a=1, b=2)
    tt.custom["spec"] = {
        "container_image": None,
        "replica_count": None,
        "ttl_seconds": None,
        "parallelism": None,
        "backlog_length": None,
    }
    parsed = parse_template(tt, "actor")
    assert parsed.replica_count == 1 and parsed.ttl_seconds == DEFAULT_TTL_SECONDS
    assert parsed.image == a.template.container.image  # a null image falls back to the container's


def test_the_pool_reaper_survives_a_pool_that_cannot_say_whether_it_expired(tmp_path):

    from flytekitplugins_actor.pool import ReplicaPool
    from flytekitplugins_actor.replica.backend import LocalProcessBackend
    from plugin_backend.pools import PoolManager

    manager = PoolManager(LocalProcessBackend(), state_dir=str(tmp_path))
    manager.reap_interval_s = 0.02
    try:

        def pool(key, ttl):
            return manager._pool(key, lambda: ReplicaPool(key, manager.backend, lambda n, tok: None, 1, ttl))

        pool("bad", None)  # what a null ttl_seconds used to become: expired() raises TypeError
        pool("short-1", 0)
        wait_until(lambda: manager.get("short-1") is None, 10, "the expired pool to be reaped beside the bad one")
        pool("short-2", 0)  # the reaper is still alive for pools that come later
        wait_until(lambda: manager.get("short-2") is None, 10, "a later expired pool to be reaped too")
        assert manager.get("bad") is not None
    finally:
        manager.shutdown()


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan"])
def test_a_bad_sync_budget_is_refused_naming_the_variable(monkeypatch, raw):
    from plugin_backend.sync_connector import SYNC_BUDGET_ENV, sync_budget_s

    monkeypatch.setenv(SYNC_BUDGET_ENV, raw)
    with pytest.raises(ValueError, match=f"{SYNC_BUDGET_ENV}='{raw}' on the connector is invalid"):
        sync_budget_s()
    monkeypatch.setenv(SYNC_BUDGET_ENV, "2.5")
    assert sync_budget_s() == 2.5


def test_importing_flytekit_does_not_load_the_kubernetes_client():
    """Every process that imports flytekit (drivers, replicas, pyflyte-execute) loads this package through its
    plugin entry point: the kubernetes client (~0.4 s to import) must wait until a connector builds a pod."""
    import subprocess
    import sys

    code = "import sys, flytekit, plugin_backend; print(sorted(m for m in sys.modules if m.startswith('kubernetes')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_system_retry_budget_comes_from_the_environment_and_a_malformed_one_is_refused(monkeypatch):
    from flytekitplugins_actor.pool import SYSTEM_RETRIES
    from plugin_backend.pools import SYSTEM_RETRIES_ENV, system_retries_from_env

    monkeypatch.delenv(SYSTEM_RETRIES_ENV, raising=False)
    assert system_retries_from_env() == SYSTEM_RETRIES == 3  # propeller's default
    monkeypatch.setenv(SYSTEM_RETRIES_ENV, "0")
    assert system_retries_from_env() == 0
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv(SYSTEM_RETRIES_ENV, bad)
        with pytest.raises(ValueError, match=f"FLYTE_ACTOR_SYSTEM_RETRIES='{bad}'"):
            system_retries_from_env()

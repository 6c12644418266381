"""The contract details a real propeller 1.16.8 exposes, driven over gRPC against a real `pyflyte serve connector`:
templates in Union SDK's exact shape (unset fields as null), map outputs by reference, and request limits."""

import os

import actor_tasks as t
import pytest
from harness import PHASE, Attempt, literal_map, output_value
from test_actor_connector import _alive
from waiting import wait_until

from flytekitplugins_actor.actor_map import map as actor_map

pytestmark = pytest.mark.timeout(120)


def _union_shaped(task, env_name: str, version: str, **spec):
    """The template of `task` with `custom` exactly as Union's SDK writes it: unset spec fields are null."""
    from harness import serialize

    tt = serialize(task)
    image = tt.container.image
    tt.ClearField("custom")
    tt.custom.update(
        {
            "name": env_name,
            "version": version,
            "type": "actor",
            "spec": {
                "container_image": image,
                "replica_count": 1,
                "ttl_seconds": None,
                "parallelism": 1,
                "backlog_length": None,
                **spec,
            },
        }
    )
    return tt


def test_union_shaped_template_with_nulls_runs_and_idle_pools_are_still_reaped(propeller, base):
    tt = _union_shaped(t.pid, "union-env", "0123456789abcde")
    assert tt.custom["spec"]["ttl_seconds"] is None and tt.custom["spec"]["backlog_length"] is None
    a = Attempt(base, t.pid, literal_map(t.pid), template=tt)
    r = propeller.wait(propeller.create(a))
    assert r.phase == PHASE.SUCCEEDED, r.message
    union_replica = output_value(a.outputs(), "o0", int)
    again = Attempt(base, t.pid, literal_map(t.pid), template=tt)  # null TTL means the default: the pool stays warm
    assert propeller.wait(propeller.create(again)).phase == PHASE.SUCCEEDED
    assert output_value(again.outputs(), "o0", int) == union_replica
    # the pool reaper still runs after serving the null-TTL environment: a short-TTL pool is torn down
    short = Attempt(base, t.pid_short_ttl, literal_map(t.pid_short_ttl))
    assert propeller.wait(propeller.create(short)).phase == PHASE.SUCCEEDED
    short_replica = output_value(short.outputs(), "o0", int)
    wait_until(lambda: not _alive(short_replica), 15, "the ttl_seconds=1 pool to be torn down by the reaper")
    assert _alive(union_replica)


def test_union_shaped_template_with_missing_spec_fields_runs(propeller, base):
    tt = _union_shaped(t.add, "union-env-min", "fedcba987654321")
    for k in ("replica_count", "ttl_seconds", "parallelism", "backlog_length"):
        del tt.custom["spec"][k]
    a = Attempt(base, t.add, literal_map(t.add, a=20, b=22), template=tt)
    r = propeller.wait(propeller.create(a))
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", int) == 42


def _scratch(tmp_path):
    """A directory for many small files: tmpfs when the machine has it (100,000 item dirs on a disk are slow)."""
    import tempfile

    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return tempfile.mkdtemp(prefix="actor-bigmap-", dir="/dev/shm")
    return str(tmp_path)


def test_a_100000_item_map_answers_succeeded_by_reference_under_64_kb(propeller, tmp_path):
    """A map whose items' results are all in storage (as after a connector restart) decides at once; GetTask
    answers SUCCEEDED without inline outputs, and propeller reads outputs.pb."""
    import shutil

    from flyteidl.core import literals_pb2

    n = 100_000
    m = actor_map(t.inc1)
    scratch = _scratch(tmp_path)
    try:
        a = Attempt(scratch, m, literal_map(m, x=list(range(n))))
        for i in range(n):
            item = os.path.join(a.dir, "items", str(i))
            os.makedirs(item)
            lit = literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(integer=i + 1)))
            with open(os.path.join(item, "outputs.pb"), "wb") as f:
                f.write(literals_pb2.LiteralMap(literals={"o0": lit}).SerializeToString())
        meta = propeller.create(a)
        r = propeller.wait(meta, task_type="actor_map", timeout=90)
        assert r.phase == PHASE.SUCCEEDED, r.message
        assert not r.outputs.literals
        assert r.ByteSize() < 64 * 1024, r.ByteSize()
        gathered = a.outputs().literals["o0"].collection.literals
        assert len(gathered) == n and gathered[-1].scalar.primitive.integer == n
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_inputs_over_the_4_mib_grpc_limit_get_an_error_naming_the_limit(server, base):
    """flytekit's `pyflyte serve connector` keeps gRPC's default 4 MiB receive limit (documented in the README's
    Limits and docs/deploy.md): the refusal names the limit, and nothing is created."""
    import grpc

    a = Attempt(base, t.echo, literal_map(t.echo, s="x" * (4 * 1024 * 1024 + 1)))
    with pytest.raises(grpc.RpcError) as e:
        server.stub.CreateTask(a.request(), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4194304" in e.value.details()
    assert not os.path.exists(os.path.join(a.dir, "_actor.request.json"))


def test_an_empty_output_prefix_is_refused_and_nothing_is_written_at_the_root(server, base):
    import grpc

    root_record = "/_actor.request.json"
    existed = os.path.exists(root_record)
    a = Attempt(base, t.add, literal_map(t.add, a=1, b=2))
    req = a.request()
    req.output_prefix = ""
    with pytest.raises(grpc.RpcError) as e:
        server.stub.CreateTask(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output_prefix=''" in e.value.details() and "Traceback" not in e.value.details()
    assert existed or not os.path.exists(root_record)


def _raw_meta(**fields):
    import json

    meta = {
        "execution_id": "e1",
        "output_prefix": "/tmp/none",
        "kind": "actor",
        "env": "conn-test",
        "env_key": "k",
        "namespace": "ns",
        "service_account": "default",
        "code": "c",
        "v": 1,
    }
    meta.update(fields)
    return json.dumps(meta).encode()


@pytest.mark.parametrize(
    "meta, expected",
    [
        (_raw_meta(execution_id=5), "execution_id=5"),
        (_raw_meta(output_prefix=["x"]), "output_prefix=['x']"),
        (_raw_meta(output_prefix=""), "output_prefix is empty"),
        (_raw_meta(v="1"), "v='1'"),
        (b"[1, 2]", "not an object"),
        (b"\xff", "not an actor execution's"),
    ],
)
def test_malformed_resource_metas_get_invalid_argument_naming_the_field(propeller, meta, expected):
    import grpc

    for call in (propeller.get, propeller.delete):
        with pytest.raises(grpc.RpcError) as e:
            call(meta)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert expected in e.value.details() and "Traceback" not in e.value.details()


def test_delete_task_never_creates_directories(propeller, tmp_path):
    target = tmp_path / "never" / "created"
    propeller.delete(_raw_meta(execution_id="ghost", output_prefix=str(target)))
    propeller.delete(_raw_meta(execution_id="ghost", output_prefix=str(target)))
    assert not (tmp_path / "never").exists()

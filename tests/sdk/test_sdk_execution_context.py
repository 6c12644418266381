"""A replica builds the execution context itself (no per-execution setup work): the task must see what a fresh
`pyflyte-execute` process gives it, for the same command and identity env."""

import json
import os
import secrets
import subprocess
import sys
import uuid

import pytest
import sdk_local_tasks as t
from flyteidl.core import literals_pb2
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.core.utils import load_proto_from_file, write_proto_to_file
from sdk_helpers import subprocess_env
from waiting import VENV_BIN

from flytekitplugins_actor.replica.backend import LocalProcessBackend, ReplicaSpec, ReplicaState
from flytekitplugins_actor.replica.command import ExecutionCommand
from flytekitplugins_actor.replica.identity import identity_env
from flytekitplugins_actor.replica.protocol import ReplicaClient

pytestmark = pytest.mark.timeout(120)

IDENTITY = identity_env("proj", "dev", "exec-1", "tproj", "tdev", "sdk_local_tasks.describe_context", "v7", attempt=1)


def _command(d: str, payload: str) -> ExecutionCommand:
    ctx = FlyteContextManager.current_context()
    lm = TypeEngine.dict_to_literal_map(ctx, {"payload": payload}, t.describe_context.python_interface.inputs)
    os.makedirs(d)
    write_proto_to_file(lm.to_flyte_idl(), os.path.join(d, "inputs.pb"))
    return ExecutionCommand.build(
        inputs=os.path.join(d, "inputs.pb"),
        output_prefix=os.path.join(d, "out"),
        raw_output_data_prefix=os.path.join(d, "raw"),
        checkpoint_path=os.path.join(d, "checkpoint"),
        resolver="flytekit.core.python_auto_container.default_task_resolver",
        resolver_args=["task-module", "sdk_local_tasks", "task-name", "describe_context"],
    )


def _described(d: str) -> dict:
    lm = load_proto_from_file(literals_pb2.LiteralMap, os.path.join(d, "out", "outputs.pb"))
    seen = json.loads(lm.literals["o0"].scalar.primitive.string_value)
    for key in ("raw_output_prefix", "output_metadata_prefix"):  # the same layout under each run's own dir
        seen[key] = os.path.relpath(seen[key], d)
    with open(os.path.join(d, "checkpoint", "_dst_cp"), "rb") as f:  # where SyncCheckpoint.write puts it
        seen["checkpoint"] = f.read().decode()
    return seen


def test_a_replica_gives_a_task_the_context_pyflyte_execute_gives_it(tmp_path):
    env = subprocess_env(TMPDIR=str(tmp_path), **IDENTITY)
    fresh = _command(str(tmp_path / "fresh"), "p1")
    p = subprocess.run(
        [os.path.join(VENV_BIN, "pyflyte-execute"), *fresh.to_args()[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert p.returncode == 0, p.stderr[-3000:]

    token = secrets.token_hex(16)
    paths = os.pathsep.join(os.path.abspath(x or ".") for x in sys.path)
    spec = ReplicaSpec(name="ctx-1", token=token, log_dir=str(tmp_path / "logs"), env={"PYTHONPATH": paths})
    replica = LocalProcessBackend().start(spec)
    try:
        assert replica.wait_ready(60) is ReplicaState.READY, open(replica.log_uri).read()
        client = ReplicaClient(replica.address, token, timeout=10)
        seen = []
        for i in range(2):  # the second one on a recycled, prepared dir
            d = str(tmp_path / f"replica-{i}")
            eid = uuid.uuid4().hex
            client.request("submit", execution_id=eid, args=_command(d, "p1").to_args(), env=IDENTITY)
            reply = client.request("wait", execution_id=eid, timeout=60)
            assert reply["state"] == "succeeded", reply
            seen.append(_described(d))
        client.close()
    finally:
        replica.terminate(5.0)
        replica.wait_dead(10)
    expected = _described(str(tmp_path / "fresh"))
    assert expected["execution_id"] == ["proj", "dev", "exec-1"] and expected["checkpoint"] == "p1", expected
    assert seen == [expected, expected]


def test_local_copies_go_without_the_event_loop_and_keep_flytekits_errors(tmp_path):
    from flytekit.exceptions.user import FlyteDataNotFoundException

    from flytekitplugins_actor.replica.sandbox import _fast_file_access_class

    fa = _fast_file_access_class()(local_sandbox_dir=str(tmp_path / "sandbox"), raw_output_prefix=str(tmp_path))
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "outputs.pb").write_bytes(b"out")
    (engine / "sub").mkdir()
    (engine / "sub" / "deck.html").write_text("deck")
    assert fa.put_data(str(engine), f"file://{tmp_path}/prefix", is_multipart=True) == f"file://{tmp_path}/prefix"
    assert (tmp_path / "prefix" / "outputs.pb").read_bytes() == b"out"
    assert (tmp_path / "prefix" / "sub" / "deck.html").read_text() == "deck"
    (engine / "outputs.pb").unlink()  # the replica recycles its dir: what was delivered stays
    assert (tmp_path / "prefix" / "outputs.pb").read_bytes() == b"out"
    fa.put_data(str(tmp_path / "prefix" / "outputs.pb"), str(tmp_path / "again" / "outputs.pb"))  # a retry
    (tmp_path / "x.pb").write_bytes(b"new")
    fa.put_data(str(tmp_path / "x.pb"), str(tmp_path / "again" / "outputs.pb"))
    assert (tmp_path / "again" / "outputs.pb").read_bytes() == b"new"
    fa.get_data(str(tmp_path / "prefix" / "outputs.pb"), str(tmp_path / "work" / "inputs.pb"))
    assert (tmp_path / "work" / "inputs.pb").read_bytes() == b"out"
    with pytest.raises(FlyteDataNotFoundException):  # a missing input fails as under pyflyte-execute
        fa.get_data(str(tmp_path / "missing.pb"), str(tmp_path / "work" / "other.pb"))

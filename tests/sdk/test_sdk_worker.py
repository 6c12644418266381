"""The replica worker, driven over its control protocol: a real worker process, real pyflyte-execute args."""

import os
import secrets
import socket
import sys
import threading
import uuid

import pytest
import sdk_worker_tasks as tasks
from flyteidl.core import errors_pb2, literals_pb2
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.core.utils import load_proto_from_file, write_proto_to_file
from flytekit.models.literals import LiteralMap
from sdk_helpers import pid_alive
from waiting import RESOLVER, wait_until

from flytekitplugins_actor.replica.backend import LocalProcessBackend, ReplicaSpec, ReplicaState
from flytekitplugins_actor.replica.command import ExecutionCommand
from flytekitplugins_actor.replica.error import CANCELLED
from flytekitplugins_actor.replica.execution import ExecutionSpec
from flytekitplugins_actor.replica.protocol import (
    INLINE_LIMIT_BYTES,
    PROTOCOL_VERSION,
    AuthenticationError,
    MessageReader,
    ProtocolError,
    RefusalCode,
    ReplicaClient,
    ReplyLost,
    RequestRefused,
    decode_bytes,
    send_message,
)

pytestmark = pytest.mark.timeout(120)


class Worker:
    """A real replica worker process and a client for it."""

    def __init__(self, tmp, token=None, env=None):
        self.tmp = tmp
        self.token = token or secrets.token_hex(16)
        self.tmpdir = os.path.join(tmp, "replica-tmp")
        os.makedirs(self.tmpdir)
        spec = ReplicaSpec(
            name=f"wt-{uuid.uuid4().hex[:6]}",
            token=self.token,
            log_dir=os.path.join(tmp, "logs"),
            cwd=os.getcwd(),
            env={
                "PYTHONPATH": os.pathsep.join(os.path.abspath(p or ".") for p in sys.path),
                "TMPDIR": self.tmpdir,
                **(env or {}),
            },
        )
        self.replica = LocalProcessBackend().start(spec)
        assert self.replica.wait_ready(60) is ReplicaState.READY, open(self.replica.log_uri).read()
        self.client = ReplicaClient(self.replica.address, self.token, timeout=10)

    def request(self, op, **fields):
        return self.client.request(op, **fields)

    def args(self, task, execution_id=None, module=None, name=None, distribution=None, dest_dir=None, **inputs):
        """pyflyte-execute args for `task` with `inputs`, as a pod's container would get them."""
        execution_id = execution_id or uuid.uuid4().hex
        d = os.path.join(self.tmp, "executions", execution_id)
        os.makedirs(d, exist_ok=True)
        ctx = FlyteContextManager.current_context()
        lm = TypeEngine.dict_to_literal_map(ctx, inputs, task.python_interface.inputs if task else {})
        write_proto_to_file(lm.to_flyte_idl(), os.path.join(d, "inputs.pb"))
        out = os.path.join(d, "out")
        command = ExecutionCommand.build(
            inputs=os.path.join(d, "inputs.pb"),
            output_prefix=out,
            raw_output_data_prefix=os.path.join(d, "raw"),
            resolver=RESOLVER,
            resolver_args=[
                "task-module",
                module or task.task_function.__module__,
                "task-name",
                name or task.task_function.__name__,
            ],
            distribution=distribution,
            dest_dir=dest_dir,
        )
        return execution_id, command.to_args(), out

    def run(self, task, env=None, **inputs):
        """Submits one execution, waits for it, returns (reply, output prefix)."""
        execution_id, args, out = self.args(task, **inputs)
        reply = self.request("submit", execution_id=execution_id, args=args, env=env or {})
        assert reply["state"] in ("accepted", "running", "succeeded", "failed")
        return self.request("wait", execution_id=execution_id, timeout=60), out

    def close(self):
        self.client.close()
        self.replica.terminate(2)
        self.replica.wait_dead(10)


def raw_request(worker, **message):
    """One request on a fresh connection, every field sent as given."""
    host, port = worker.replica.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        send_message(s, {"token": worker.token, **message})
        return MessageReader(s).read()


def output(out):
    lm = LiteralMap.from_flyte_idl(load_proto_from_file(literals_pb2.LiteralMap, os.path.join(out, "outputs.pb")))
    return lm.literals["o0"].scalar.primitive.value


def error_doc(out):
    doc = errors_pb2.ErrorDocument()
    with open(os.path.join(out, "error.pb"), "rb") as f:
        doc.ParseFromString(f.read())
    return doc.error


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(str(tmp_path_factory.mktemp("worker")))
    yield w
    w.close()


# ---- authentication ----
def test_bad_token_is_refused(worker):
    bad = ReplicaClient(worker.replica.address, "not-the-token")
    try:
        with pytest.raises(AuthenticationError):
            bad.request("health")
        with pytest.raises(AuthenticationError):
            execution_id, args, _ = worker.args(tasks.pid)
            bad.request("submit", execution_id=execution_id, args=args)
    finally:
        bad.close()
    host, port = worker.replica.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        replies = MessageReader(s)
        send_message(s, {"op": "health"})  # no token at all
        reply = replies.read()
        assert reply["ok"] is False and reply["code"] == "UNAUTHENTICATED"
        send_message(s, {"op": "status", "token": worker.token[:-1] + "x", "execution_id": "e"})
        assert replies.read()["code"] == "UNAUTHENTICATED"
    # and it kept serving the right token
    assert worker.request("health")["protocol"] == PROTOCOL_VERSION == 2


def test_worker_refuses_to_start_without_a_token(tmp_path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "FLYTE_ACTOR_TOKEN"}
    p = subprocess.run(
        [sys.executable, "-m", "flytekitplugins_actor.replica.worker", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0
    assert "FLYTE_ACTOR_TOKEN" in p.stderr


def test_unknown_op_and_malformed_submit_are_refused(worker):
    with pytest.raises(ConnectionError, match="unknown op"):
        worker.request("explode")
    with pytest.raises(ConnectionError, match="pyflyte-execute"):
        worker.request("submit", execution_id="bad-args", args=["rm", "-rf", "/"])
    assert worker.request("status", execution_id="bad-args")["state"] == "unknown"


def test_malformed_frames_close_the_connection_and_the_worker_survives(worker):
    import struct

    host, port = worker.replica.address.rsplit(":", 1)
    for payload in (
        struct.pack("!I", 65 * 1024 * 1024) + b"x",  # over the 64 MiB limit
        struct.pack("!I", 3) + b"[1]",  # JSON, but not an object
        struct.pack("!I", 5) + b"nope!",
    ):  # not JSON
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(payload)
            assert s.recv(1) == b""  # closed without a reply
    assert worker.request("health")["state"] == "idle"


# ---- health ----
def test_health_reports_the_replica(worker):
    h = worker.request("health")
    assert h["ok"] is True
    assert h["replica"] == worker.replica.spec.name
    assert h["pid"] == worker.replica.pid
    assert h["protocol"] == PROTOCOL_VERSION
    assert h["state"] == "idle"
    assert h["running"] is None
    assert h["uncollected"] == []
    assert isinstance(h["executions"], int)
    before = h["executions"]
    worker.run(tasks.pid)
    assert worker.request("health")["executions"] == before + 1


def test_health_names_ended_executions_until_their_end_is_known_received(worker, tmp_path):
    """What lets a restarted connector collect an execution that ended while no pool was there to `wait`: an end
    counts as received once the connection its `wait` or `status` reply went to asks again."""
    for op in ("wait", "status"):
        execution_id, args, _ = worker.args(tasks.count_run, path=str(tmp_path / "runs"))
        worker.request("submit", execution_id=execution_id, args=args)
        wait_until(lambda: execution_id in worker.request("health")["uncollected"], 60, "the end listed uncollected")
        assert worker.request("health")["state"] == "idle"
        # told to a peer that hung up at once (a connector killed with the reply on its way): still uncollected
        assert raw_request(worker, op=op, execution_id=execution_id, timeout=5)["state"] == "succeeded"
        assert execution_id in worker.request("health")["uncollected"]
        assert worker.request(op, execution_id=execution_id, timeout=5)["state"] == "succeeded"
        assert execution_id not in worker.request("health")["uncollected"]  # this connection asked again


# ---- submit / status / wait ----
def test_submit_status_wait(worker, tmp_path):
    execution_id, args, out = worker.args(tasks.count_run, path=str(tmp_path / "runs"))
    assert worker.request("status", execution_id=execution_id)["state"] == "unknown"
    assert worker.request("submit", execution_id=execution_id, args=args)["state"] == "accepted"
    reply = worker.request("wait", execution_id=execution_id, timeout=60)
    assert reply["state"] == "succeeded" and reply["error"] is None and reply["duration_s"] > 0
    status = worker.request("status", execution_id=execution_id)
    assert status["state"] == "succeeded"
    assert output(out) == 1
    assert raw_request(worker, op="wait", execution_id="never-submitted", timeout=1)["state"] == "unknown"


def test_submit_is_idempotent_per_execution_id(worker, tmp_path):
    counter = tmp_path / "runs"
    release, started = tmp_path / "release", tmp_path / "started"
    # while it is running
    blocker_id, blocker_args, _ = worker.args(tasks.wait_for_file, path=str(release), started=str(started))
    assert worker.request("submit", execution_id=blocker_id, args=blocker_args)["state"] == "accepted"
    wait_until(started.exists, 30)
    again = worker.request("submit", execution_id=blocker_id, args=blocker_args)
    assert again["state"] == "running"
    # a different execution is refused while busy: one at a time
    other_id, other_args, _ = worker.args(tasks.count_run, path=str(counter))
    with pytest.raises(ConnectionError, match="busy"):
        worker.request("submit", execution_id=other_id, args=other_args)
    release.touch()
    assert worker.request("wait", execution_id=blocker_id, timeout=60)["state"] == "succeeded"
    # after it finished: the repeat returns the outcome and does not run the task again
    execution_id, args, out = worker.args(tasks.count_run, path=str(counter))
    worker.request("submit", execution_id=execution_id, args=args)
    assert worker.request("wait", execution_id=execution_id, timeout=60)["state"] == "succeeded"
    for _ in range(3):
        assert worker.request("submit", execution_id=execution_id, args=args)["state"] == "succeeded"
    assert worker.request("health")["state"] == "idle"
    assert counter.read_text().count("run") == 1
    assert output(out) == 1


# ---- pipelined requests and inline inputs/outputs ----
def _inline(task, **inputs):
    ctx = FlyteContextManager.current_context()
    return TypeEngine.dict_to_literal_map(ctx, inputs, task.python_interface.inputs).to_flyte_idl().SerializeToString()


def test_pipelined_submit_and_wait_are_answered_in_order_and_a_refusal_keeps_the_connection_in_step(worker, tmp_path):
    execution_id, args, out = worker.args(tasks.count_run, path=str(tmp_path / "runs"))
    submitted, waited = worker.client.pipeline(
        [
            ("submit", {"execution_id": execution_id, "args": args}),
            ("wait", {"execution_id": execution_id, "timeout": 60}),
        ]
    )
    assert submitted["state"] == "accepted" and waited["state"] == "succeeded" and output(out) == 1
    # a refused submit stands in its place as an exception; the wait after it is still read, so the connection is
    # in step for the next request
    refused, waited = worker.client.pipeline(
        [("submit", {"execution_id": "bad", "args": ["not-pyflyte"]}), ("wait", {"execution_id": "bad", "timeout": 1})]
    )
    assert isinstance(refused, RequestRefused) and refused.code is RefusalCode.INVALID_ARGUMENT
    assert waited["state"] == "unknown"
    assert worker.request("health")["state"] == "idle"


def test_a_connection_lost_between_replies_is_reported_for_each_unanswered_request():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def answer_one_then_vanish():
            peer, _ = server.accept()
            with peer:
                requests = MessageReader(peer)
                requests.read(), requests.read()
                send_message(peer, {"ok": True, "state": "accepted"})  # the second request is never answered

        peer_thread = threading.Thread(target=answer_one_then_vanish)
        peer_thread.start()
        client = ReplicaClient("127.0.0.1:%d" % server.getsockname()[1], "t")
        try:
            first, second = client.pipeline([("submit", {}), ("wait", {})], io_timeout=10)
        finally:
            client.close()
            peer_thread.join(10)
    assert first == {"ok": True, "state": "accepted"}
    assert isinstance(second, ReplyLost) and "wait" in str(second)  # sent, so it may have taken effect
    # a connection that failed half-way is given up: a late reply can never answer a later request
    assert client.broken
    with pytest.raises(ProtocolError, match="broken"):
        client.request("health")


def test_inline_inputs_are_read_instead_of_the_inputs_file_and_outputs_come_back_in_the_reply(worker, tmp_path):
    execution_id, args, out = worker.args(tasks.repeat, text="x", times=1)
    os.unlink(os.path.join(os.path.dirname(out), "inputs.pb"))  # the request carries them: no file is read
    spec = ExecutionSpec(execution_id, args, inputs_pb=_inline(tasks.repeat, text="ab", times=3), return_outputs=True)
    worker.request("submit", **spec.to_wire())
    reply = worker.request("wait", execution_id=execution_id, timeout=60)
    assert reply["state"] == "succeeded", reply
    outputs = LiteralMap.from_flyte_idl(literals_pb2.LiteralMap.FromString(decode_bytes(reply["outputs_pb"])))
    assert outputs.literals["o0"].scalar.primitive.value == "ababab"
    assert not os.path.exists(os.path.join(out, "outputs.pb"))  # returned instead of written: nothing to clean up
    # a repeated wait (a reply lost on the way) gets the same outputs
    again = worker.request("wait", execution_id=execution_id, timeout=60)
    assert again["outputs_pb"] == reply["outputs_pb"]


def test_outputs_too_big_to_travel_inline_and_failures_are_written_under_the_output_prefix(worker):
    big = INLINE_LIMIT_BYTES + 1
    execution_id, args, out = worker.args(tasks.repeat, text="y", times=big)
    worker.request("submit", **ExecutionSpec(execution_id, args, return_outputs=True).to_wire())
    reply = worker.request("wait", execution_id=execution_id, timeout=60)
    assert reply["state"] == "succeeded" and "outputs_pb" not in reply
    assert output(out) == "y" * big
    execution_id, args, out = worker.args(tasks.user_error)
    worker.request("submit", **ExecutionSpec(execution_id, args, return_outputs=True).to_wire())
    reply = worker.request("wait", execution_id=execution_id, timeout=60)
    assert reply["state"] == "failed" and "outputs_pb" not in reply
    assert "user said no" in error_doc(out).message


@pytest.mark.parametrize(
    "inputs_pb, message",
    [("not base64!", "inputs_pb: not base64"), (7, "inputs_pb: expected a base64 string, got int")],
)
def test_malformed_inline_inputs_are_refused_naming_the_field(worker, inputs_pb, message):
    execution_id, args, _ = worker.args(tasks.pid)
    with pytest.raises(RequestRefused, match=message) as refused:
        worker.request("submit", execution_id=execution_id, args=args, inputs_pb=inputs_pb)
    assert refused.value.code is RefusalCode.INVALID_ARGUMENT


def test_inline_inputs_over_the_limit_are_refused(worker):
    execution_id, args, _ = worker.args(tasks.pid)
    spec = ExecutionSpec(execution_id, args, inputs_pb=b"\0" * (INLINE_LIMIT_BYTES + 1))
    with pytest.raises(RequestRefused, match=f"at most {INLINE_LIMIT_BYTES} travel inline"):
        worker.request("submit", **spec.to_wire())


# ---- cancel ----
def test_cancel_a_running_execution_and_the_replica_survives(worker, tmp_path):
    release, started = tmp_path / "release", tmp_path / "started"
    execution_id, args, out = worker.args(tasks.wait_for_file, path=str(release), started=str(started))
    worker.request("submit", execution_id=execution_id, args=args)
    wait_until(started.exists, 30)
    assert worker.request("status", execution_id=execution_id)["state"] == "running"
    # the protocol's own wait timeout (a message field; ReplicaClient.request's `timeout` is its socket timeout)
    assert raw_request(worker, op="wait", execution_id=execution_id, timeout=0.2)["state"] == "running"
    worker.request("cancel", execution_id=execution_id)
    reply = worker.request("wait", execution_id=execution_id, timeout=30)
    assert reply["state"] == "cancelled", reply
    assert not os.path.exists(os.path.join(out, "outputs.pb"))
    assert pid_alive(worker.replica.pid)
    h = worker.request("health")
    assert h["state"] == "idle" and h["pid"] == worker.replica.pid
    reply, out = worker.run(tasks.count_run, path=str(tmp_path / "runs"))
    assert reply["state"] == "succeeded" and output(out) == 1


@pytest.mark.parametrize("task", [tasks.sleep_long, tasks.blocked_read], ids=["time.sleep", "blocking-read"])
def test_cancel_interrupts_a_task_blocked_in_a_system_call_and_keeps_the_replica(worker, tmp_path, task):
    started = tmp_path / "started"
    execution_id, args, out = worker.args(task, started=str(started))
    worker.request("submit", execution_id=execution_id, args=args)
    wait_until(started.exists, 30)
    pid = worker.request("health")["pid"]
    worker.request("cancel", execution_id=execution_id)
    # the task would block for 10 minutes; only a signal delivered to the main thread ends it before this wait does
    reply = worker.request("wait", execution_id=execution_id, timeout=30)
    assert reply["state"] == "cancelled", reply
    assert reply["error"] == CANCELLED.to_wire()  # the one cancelled error, as for a cancel before the start
    assert not os.path.exists(os.path.join(out, "outputs.pb"))
    h = worker.request("health")
    assert h["state"] == "idle" and h["pid"] == pid  # the same warm replica, not a replacement
    assert worker.run(tasks.pid)[0]["state"] == "succeeded"


def test_a_cancel_landing_in_the_clean_up_after_the_task_is_ignored(worker, tmp_path):
    marker, release = tmp_path / "in-cleanup", tmp_path / "release"
    execution_id, args, out = worker.args(tasks.hold_in_cleanup, marker=str(marker), release=str(release))
    worker.request("submit", execution_id=execution_id, args=args, env={"FLYTE_ACTOR_LATE_CANCEL": "set"})
    wait_until(marker.exists, 30)  # the task's code is done, its outputs written: the replica is cleaning up
    worker.request("cancel", execution_id=execution_id)
    release.touch()
    reply = worker.request("wait", execution_id=execution_id, timeout=30)
    assert reply["state"] == "succeeded", reply  # never CANCELLED for a task whose outputs are written
    exec_dir = output(out)  # moved away right after the reply, before anything else runs on the replica
    wait_until(lambda: not os.path.exists(exec_dir), 10, f"execution dir {exec_dir} to be moved away")
    reply, out = worker.run(tasks.env_var, var="FLYTE_ACTOR_LATE_CANCEL")
    assert reply["state"] == "succeeded" and output(out) == "<unset>"  # the identity env was restored


def test_an_execution_cancelled_before_it_started_reports_the_one_cancelled_error(worker, tmp_path):
    marker, release = tmp_path / "tidying", tmp_path / "release"
    assert worker.run(tasks.hold_in_tidy, marker=str(marker), release=str(release))[0]["state"] == "succeeded"
    wait_until(marker.exists, 30)  # the main thread is busy tidying: what is accepted now waits for it
    execution_id, args, out = worker.args(tasks.pid)
    assert worker.request("submit", execution_id=execution_id, args=args)["state"] == "accepted"
    cancelled = worker.request("cancel", execution_id=execution_id)
    release.touch()
    assert cancelled["state"] == "cancelled", cancelled
    assert cancelled["error"] == CANCELLED.to_wire()


def test_a_keyboard_interrupt_raised_by_the_task_is_its_failure_not_a_cancel(worker):
    reply, out = worker.run(tasks.keyboard_interrupt)
    assert reply["state"] == "failed", reply
    assert reply["error"]["code"] == "KeyboardInterrupt" and reply["error"]["origin"] == "USER"
    assert "the task's own interrupt" in reply["error"]["message"]
    err = error_doc(out)  # what storage says agrees with the reply
    assert err.code == "KeyboardInterrupt" and err.origin == 1
    assert worker.run(tasks.pid)[0]["state"] == "succeeded"  # the replica survives it


def test_cancel_of_an_unknown_or_finished_execution_is_harmless(worker, tmp_path):
    assert worker.request("cancel", execution_id="nope")["state"] == "unknown"
    reply, out = worker.run(tasks.pid)
    assert worker.request("cancel", execution_id=reply["execution_id"])["state"] == "succeeded"
    assert worker.run(tasks.pid)[0]["state"] == "succeeded"


# ---- failures: error.pb with the right kind, the replica survives ----
def test_sys_exit_fails_the_execution_with_user_origin_and_the_replica_survives(worker):
    reply, out = worker.run(tasks.exit_three)
    assert reply["state"] == "failed"
    err = error_doc(out)
    assert err.origin == 1  # ExecutionError.USER
    assert err.kind == errors_pb2.ContainerError.NON_RECOVERABLE
    assert "sys.exit(3)" in err.message
    assert reply["error"]["origin"] == "USER"
    assert pid_alive(worker.replica.pid)
    reply, out = worker.run(tasks.pid)
    assert reply["state"] == "succeeded" and output(out) == worker.replica.pid


def test_user_exception_is_user_non_recoverable(worker):
    reply, out = worker.run(tasks.user_error)
    assert reply["state"] == "failed"
    err = error_doc(out)
    assert err.origin == 1
    assert err.kind == errors_pb2.ContainerError.NON_RECOVERABLE
    assert "user said no" in err.message and "ValueError" in err.message
    assert reply["error"] == {"code": err.code, "message": err.message, "origin": "USER", "recoverable": False}
    assert worker.run(tasks.pid)[0]["state"] == "succeeded"


def test_flyte_recoverable_exception_is_recoverable(worker):
    reply, out = worker.run(tasks.recoverable_error)
    assert reply["state"] == "failed"
    err = error_doc(out)
    assert err.origin == 1
    assert err.kind == errors_pb2.ContainerError.RECOVERABLE
    assert "try again later" in err.message
    assert reply["error"]["recoverable"] is True


def test_exception_object_is_sent_back_on_request(worker):
    import base64

    import cloudpickle

    execution_id, args, _ = worker.args(tasks.user_error)
    worker.request("submit", execution_id=execution_id, args=args)
    reply = worker.request("wait", execution_id=execution_id, timeout=60, include_exception=True)
    exc = cloudpickle.loads(base64.b64decode(reply["exception"]))
    assert type(exc) is ValueError and str(exc) == "user said no"
    assert "exception" not in worker.request("status", execution_id=execution_id)


def test_a_reply_bigger_than_the_socket_buffer_arrives_whole_after_a_pipelined_submit(worker):
    import base64

    import cloudpickle

    # the executing thread sends a waiting peer its reply without blocking; what the socket does not take at once,
    # the connection thread sends: the client must read one intact reply either way
    size = 8 * 1024 * 1024
    execution_id, args, _ = worker.args(tasks.fail_with, size=size)
    submitted, waited = worker.client.pipeline(
        [
            ("submit", {"execution_id": execution_id, "args": args}),
            ("wait", {"execution_id": execution_id, "timeout": 60, "include_exception": True}),
        ]
    )
    assert submitted["state"] == "accepted" and waited["state"] == "failed", waited
    assert f"failed with a payload of {size} bytes" in waited["error"]["message"]
    exc = cloudpickle.loads(base64.b64decode(waited["exception"]))
    assert type(exc).__name__ == "PayloadError" and len(exc.args[0]) == size
    assert worker.request("health")["state"] == "idle"  # the connection is in step


def test_a_file_the_task_writes_into_its_engine_dir_is_uploaded_with_its_outputs(worker):
    # the replica keeps the entrypoint's own protobuf files in memory; anything else in the engine dir still goes
    # to the output prefix, as pyflyte-execute uploads the whole dir
    execution_id, args, out = worker.args(tasks.write_engine_file, filename="extra.txt")
    worker.request("submit", execution_id=execution_id, args=args)
    reply = worker.request("wait", execution_id=execution_id, timeout=60)
    assert reply["state"] == "succeeded", reply
    assert output(out) == 1
    with open(os.path.join(out, "extra.txt")) as f:
        assert f.read() == "mine"


@pytest.mark.parametrize("text, printed", [("", False), ("a line from the task", True)])
def test_the_reply_says_whether_the_task_wrote_to_the_replica_output(worker, text, printed):
    # a local replica's stdout and stderr go to one log file: the driver reads it before returning a result only
    # when the task wrote something
    execution_id, args, _ = worker.args(tasks.say, text=text)
    worker.request("submit", execution_id=execution_id, args=args)
    reply = worker.request("wait", execution_id=execution_id, timeout=60)
    assert reply["state"] == "succeeded" and reply["printed"] is printed, reply


def _pipelined(client, worker, task, timeout=60, **inputs):
    execution_id, args, out = worker.args(task, **inputs)
    submitted, waited = client.pipeline(
        [
            ("submit", {"execution_id": execution_id, "args": args}),
            ("wait", {"execution_id": execution_id, "timeout": timeout}),
        ],
        io_timeout=timeout + 5,
    )
    assert submitted["state"] == "accepted", submitted
    return execution_id, waited, out


def test_a_wait_on_a_connection_the_executing_thread_holds_is_answered_when_its_round_ends(worker, tmp_path):
    # after an execution answered by the executing thread, the connection waits for its next request there; an
    # execution read there that outlasts its first wait round still gets its `running` answer in time
    client = ReplicaClient(worker.replica.address, worker.token)
    try:
        assert _pipelined(client, worker, tasks.pid)[1]["state"] == "succeeded"
        release, started = tmp_path / "release", tmp_path / "started"
        execution_id, waited, out = _pipelined(
            client, worker, tasks.wait_for_file, timeout=0.3, path=str(release), started=str(started)
        )
        assert waited["state"] == "running", waited  # its round ended first (the client allowed it 5.3 s)
        release.touch()
        reply = client.request("wait", execution_id=execution_id, timeout=60)
        assert reply["state"] == "succeeded" and output(out) == "released"
        assert _pipelined(client, worker, tasks.pid)[1]["state"] == "succeeded"  # and the connection is in step
    finally:
        client.close()


def test_a_connection_held_by_the_executing_thread_is_served_while_another_connection_s_execution_runs(
    worker, tmp_path
):
    first, second = (ReplicaClient(worker.replica.address, worker.token) for _ in range(2))
    try:
        assert _pipelined(first, worker, tasks.pid)[1]["state"] == "succeeded"  # `first` now waits on that thread
        release, started = tmp_path / "release", tmp_path / "started"
        execution_id, args, out = worker.args(tasks.wait_for_file, path=str(release), started=str(started))
        second.request("submit", execution_id=execution_id, args=args)
        wait_until(started.exists, 30, "the other connection's execution to start")
        assert first.request("health", io_timeout=5)["state"] == "busy"  # answered while that execution runs
        release.touch()
        assert second.request("wait", execution_id=execution_id, timeout=60)["state"] == "succeeded"
        assert _pipelined(first, worker, tasks.pid)[1]["state"] == "succeeded"
    finally:
        first.close()
        second.close()


# ---- per-execution identity and cleanup ----
def test_identity_env_is_set_during_the_execution_and_restored_after(worker):
    reply, out = worker.run(tasks.identity, env={"FLYTE_INTERNAL_EXECUTION_ID": "exec-a"})
    assert reply["state"] == "succeeded" and output(out) == "exec-a"
    reply, out = worker.run(tasks.identity, env={"FLYTE_INTERNAL_EXECUTION_ID": "exec-b"})
    assert output(out) == "exec-b"
    reply, out = worker.run(tasks.identity)
    assert output(out) == "<unset>"


def test_the_pool_token_is_hidden_from_task_code(worker):
    reply, out = worker.run(tasks.env_var, var="FLYTE_ACTOR_TOKEN")
    assert reply["state"] == "succeeded", reply
    assert output(out) == "<unset>"
    reply, out = worker.run(tasks.env_var, var="FLYTE_ACTOR_REPLICA")
    assert output(out) == worker.replica.spec.name


def test_per_execution_temp_dirs_are_removed(worker):
    worker.run(tasks.pid)  # warm: whatever the first execution creates once per process
    wait_until(lambda: not [d for d in os.listdir(worker.tmpdir) if d.startswith("actor-exec-")], 10)
    before = sorted(os.listdir(worker.tmpdir))
    paths = []
    for _ in range(3):
        reply, out = worker.run(tasks.make_scratch)
        assert reply["state"] == "succeeded"
        paths.append(output(out))
    worker.run(tasks.user_error)
    for p in paths:
        assert p.startswith(worker.tmpdir)  # it really was the replica's temp area
    # cleanup runs right after the outcome is reported (off the caller's critical path): wait for it
    wait_until(
        lambda: sorted(os.listdir(worker.tmpdir)) == before,
        10,
        what=lambda: f"temp dirs leaked: {sorted(set(os.listdir(worker.tmpdir)) ^ set(before))}",
    )
    assert not any(os.path.exists(p) for p in paths)


# ---- the worker stops on its own ----
def test_a_replica_no_pool_talks_to_exits_after_the_orphan_timeout(tmp_path):
    w = Worker(str(tmp_path), env={"FLYTE_ACTOR_ORPHAN_TIMEOUT_S": "1.5"})
    try:
        w.request("health")  # an authenticated request restarts the count
        death = w.replica.wait_dead(30)
        assert death is not None and death.exit_code == 0, death
        assert "no request from any pool" in open(w.replica.log_uri).read()
    finally:
        w.client.close()


def test_a_bad_token_does_not_count_as_contact_for_the_orphan_timeout(tmp_path):
    w = Worker(str(tmp_path), env={"FLYTE_ACTOR_ORPHAN_TIMEOUT_S": "2"})
    bad = ReplicaClient(w.replica.address, "not-the-token")
    try:

        def knock() -> bool:  # an unauthenticated caller keeps knocking until the replica is gone
            try:
                bad.request("health", io_timeout=5)
            except AuthenticationError:
                return False
            except ProtocolError:
                return True
            return False

        wait_until(lambda: knock() or w.replica.death is not None, 30)
        assert w.replica.wait_dead(30) is not None
    finally:
        bad.close()
        w.client.close()


@pytest.mark.parametrize("value", ["0", "soon", "-3"])
def test_an_invalid_orphan_timeout_is_refused_at_start(tmp_path, value):
    import subprocess

    env = {**os.environ, "FLYTE_ACTOR_TOKEN": "t", "FLYTE_ACTOR_ORPHAN_TIMEOUT_S": value}
    proc = subprocess.run(
        [sys.executable, "-m", "flytekitplugins_actor.replica.worker", "--port", "0", "--host", "127.0.0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "FLYTE_ACTOR_ORPHAN_TIMEOUT_S" in proc.stderr and value in proc.stderr


def test_a_replica_whose_parent_is_gone_takes_its_task_subprocesses_along(tmp_path):
    w = Worker(str(tmp_path))
    try:
        pidfile = tmp_path / "child"
        execution_id, args, _ = w.args(tasks.spawn_sleeper, path=str(pidfile))
        w.request("submit", execution_id=execution_id, args=args)
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), 30)
        child = int(pidfile.read_text())
        assert pid_alive(child)
        w.replica.process.stdin.close()  # what the replica sees when its parent dies, even by SIGKILL
        assert w.replica.wait_dead(30) is not None
        wait_until(lambda: not pid_alive(child), 30, what=f"task subprocess {child} outlived its replica")
    finally:
        w.client.close()


# ---- the worker stops on SIGTERM ----
def test_sigterm_stops_an_idle_worker(tmp_path):
    w = Worker(str(tmp_path))
    try:
        pid = w.replica.pid
        w.replica.terminate(30)
        death = w.replica.wait_dead(30)
        assert death is not None and not pid_alive(pid)
        assert death.exit_code == 0, death
    finally:
        w.client.close()


def test_sigterm_during_an_execution_stops_the_worker_and_leaves_the_executions_fate_to_its_pool(tmp_path):
    w = Worker(str(tmp_path))
    try:
        release, started = tmp_path / "release", tmp_path / "started"
        execution_id, args, out = w.args(tasks.wait_for_file, path=str(release), started=str(started))
        w.request("submit", execution_id=execution_id, args=args)
        wait_until(started.exists, 30)
        w.replica.terminate(30)
        death = w.replica.wait_dead(30)
        assert death is not None and death.exit_code == 0, death
        # nothing under the output prefix: a system retry writes there, and error.pb would be read first
        assert not os.path.exists(os.path.join(out, "error.pb"))
        assert not os.path.exists(os.path.join(out, "outputs.pb"))
    finally:
        w.client.close()


# ---- fast-registered code: the replica activates one distribution and never runs another ----
FAST_MODULE = """
import os
from flytekitplugins_actor import ActorEnvironment

env = ActorEnvironment(name="fast")
VERSION = {version!r}


@env.task
def where() -> str:
    return VERSION + ":" + os.path.dirname(os.path.abspath(__file__))
"""


def _distribution(tmp_path, version):
    import tarfile

    src = tmp_path / f"src-{version}"
    src.mkdir()
    (src / "sdk_fastmod.py").write_text(FAST_MODULE.format(version=version))
    tgz = tmp_path / f"fast-{version}.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src / "sdk_fastmod.py", arcname="sdk_fastmod.py")
    return str(tgz)


def test_fast_registered_code_is_activated_once_and_other_versions_are_refused(tmp_path):
    w = Worker(str(tmp_path))
    try:
        v1, v2 = _distribution(tmp_path, "v1"), _distribution(tmp_path, "v2")
        dest = tmp_path / "dest"
        dest.mkdir()

        def run(dist):
            execution_id, args, out = w.args(
                None, module="sdk_fastmod", name="where", distribution=dist, dest_dir=str(dest)
            )
            assert args[:6] == [
                "pyflyte-fast-execute",
                "--additional-distribution",
                dist,
                "--dest-dir",
                str(dest),
                "--",
            ]
            w.request("submit", execution_id=execution_id, args=args)
            return w.request("wait", execution_id=execution_id, timeout=60), out

        reply, out = run(v1)
        assert reply["state"] == "succeeded", reply
        assert output(out) == f"v1:{dest}"
        assert w.request("health")["code_version"] == v1
        reply, out = run(v1)  # the same code again: warm
        assert reply["state"] == "succeeded" and output(out) == f"v1:{dest}"
        reply, out = run(v2)  # other code: refused, never run with v1's modules
        assert reply["state"] == "failed"
        err = error_doc(out)
        assert (
            err.code == "CodeVersionMismatch" and err.origin == 2 and err.kind == errors_pb2.ContainerError.RECOVERABLE
        )
        assert v1 in err.message and v2 in err.message
        assert w.request("health")["code_version"] == v1
    finally:
        w.close()

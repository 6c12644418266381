"""Drives a real `pyflyte serve connector` process over gRPC exactly as flytepropeller's connector plugin does:
serialized templates with rendered container args, inputs.pb at {{.input}}, an output prefix per attempt and
TaskExecutionMetadata carrying the task execution id."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections import OrderedDict
from typing import Dict, Optional

import grpc
from flyteidl.admin import agent_pb2
from flyteidl.core import execution_pb2, identifier_pb2, literals_pb2, tasks_pb2
from flyteidl.service import agent_pb2_grpc
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.tools.translator import get_serializable
from waiting import VENV_BIN, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TERMINAL = {
    execution_pb2.TaskExecution.SUCCEEDED,
    execution_pb2.TaskExecution.FAILED,
    execution_pb2.TaskExecution.RETRYABLE_FAILED,
    execution_pb2.TaskExecution.ABORTED,
}
PHASE = execution_pb2.TaskExecution


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConnectorServer:
    """A `pyflyte serve connector` subprocess with this package's plugin loaded (the entry point)."""

    def __init__(self, workdir: str, env: Optional[Dict[str, str]] = None):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.state_dir = os.path.join(workdir, "state")
        self.extra_env = env or {}
        self.proc: Optional[subprocess.Popen] = None
        self.channel: Optional[grpc.Channel] = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> "ConnectorServer":
        self.port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]),
            "FLYTE_ACTOR_STATE_DIR": self.state_dir,
            **self.extra_env,
        }
        self.starts += 1
        self.log_path = os.path.join(self.workdir, f"connector-{self.starts}.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    os.path.join(VENV_BIN, "pyflyte"),
                    "serve",
                    "connector",
                    "--port",
                    str(self.port),
                    "--prometheus_port",
                    str(self.metrics_port),
                    "--worker",
                    "4",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = agent_pb2_grpc.AsyncAgentServiceStub(self.channel)
        self.sync_stub = agent_pb2_grpc.SyncAgentServiceStub(self.channel)
        self.metadata_stub = agent_pb2_grpc.AgentMetadataServiceStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"connector exited with {self.proc.returncode}: {self.log()}")
            try:
                self.metadata_stub.ListAgents(agent_pb2.ListAgentsRequest(), timeout=1.0)
                return self
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"connector not serving after {timeout}s: {self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def kill(self) -> None:
        """SIGKILL, as an OOM killer or a node loss would: no cleanup runs. Its replicas exit with it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.channel is not None:
            self.channel.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.channel is not None:
            self.channel.close()

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


_SETTINGS = SerializationSettings(image_config=ImageConfig.auto_default_image())


def serialize(task) -> tasks_pb2.TaskTemplate:
    """The task template as `pyflyte register` would send it (placeholders still in the args)."""
    return get_serializable(OrderedDict(), _SETTINGS, task).template.to_flyte_idl()


def literal_map(task, **values) -> literals_pb2.LiteralMap:
    ctx = FlyteContextManager.current_context()
    values = {**getattr(task, "_bound_values", {}), **values}  # a map's partial-bound inputs are node inputs too
    return TypeEngine.dict_to_literal_map(ctx, values, task.python_interface.inputs).to_flyte_idl()


class Attempt:
    """One task execution attempt: its paths, metadata and the CreateTask request propeller would send."""

    def __init__(
        self,
        base: str,
        task,
        inputs: literals_pb2.LiteralMap,
        exec_name: Optional[str] = None,
        retry: int = 0,
        namespace: str = "flytesnacks-development",
        service_account: str = "default",
        template: Optional[tasks_pb2.TaskTemplate] = None,
    ):
        self.exec_name = exec_name or f"e{uuid.uuid4().hex[:10]}"
        self.dir = os.path.join(base, self.exec_name, "n0", str(retry))
        os.makedirs(self.dir, exist_ok=True)
        self.input_path = os.path.join(self.dir, "inputs.pb")
        with open(self.input_path, "wb") as f:
            f.write(inputs.SerializeToString())
        tt = tasks_pb2.TaskTemplate()
        tt.CopyFrom(template if template is not None else serialize(task))
        render = {
            "{{.input}}": self.input_path,
            "{{.outputPrefix}}": self.dir,
            "{{.rawOutputDataPrefix}}": os.path.join(self.dir, "raw"),
            "{{.checkpointOutputPrefix}}": os.path.join(self.dir, "checkpoint"),
            "{{.prevCheckpointPrefix}}": '""',
        }
        if tt.HasField("container"):
            args = []
            for a in tt.container.args:
                for k, v in render.items():
                    a = a.replace(k, v)
                args.append(a)
            del tt.container.args[:]
            tt.container.args.extend(args)
        self.template = tt
        self.inputs = inputs
        task_id = identifier_pb2.Identifier(
            resource_type=identifier_pb2.TASK,
            project="flytesnacks",
            domain="development",
            name=tt.id.name or "t",
            version="v1",
        )
        tei = identifier_pb2.TaskExecutionIdentifier(
            task_id=task_id,
            retry_attempt=retry,
            node_execution_id=identifier_pb2.NodeExecutionIdentifier(
                node_id="n0",
                execution_id=identifier_pb2.WorkflowExecutionIdentifier(
                    project="flytesnacks", domain="development", name=self.exec_name
                ),
            ),
        )
        self.metadata = agent_pb2.TaskExecutionMetadata(
            task_execution_id=tei, namespace=namespace, k8s_service_account=service_account
        )

    def request(self) -> agent_pb2.CreateTaskRequest:
        return agent_pb2.CreateTaskRequest(
            inputs=self.inputs, template=self.template, output_prefix=self.dir, task_execution_metadata=self.metadata
        )

    def outputs(self) -> literals_pb2.LiteralMap:
        with open(os.path.join(self.dir, "outputs.pb"), "rb") as f:
            return literals_pb2.LiteralMap.FromString(f.read())


class Propeller:
    """The connector plugin's side of the conversation: CreateTask, GetTask, DeleteTask with resource metas."""

    def __init__(self, server: ConnectorServer):
        self.server = server

    def create(self, attempt: Attempt, timeout: float = 10.0) -> bytes:
        return self.server.stub.CreateTask(attempt.request(), timeout=timeout).resource_meta

    def get(self, meta: bytes, task_type: str = "actor") -> agent_pb2.Resource:
        req = agent_pb2.GetTaskRequest(
            task_type=task_type, resource_meta=meta, task_category=agent_pb2.TaskCategory(name=task_type, version=0)
        )
        return self.server.stub.GetTask(req, timeout=10.0).resource

    def delete(self, meta: bytes, task_type: str = "actor") -> None:
        req = agent_pb2.DeleteTaskRequest(
            task_type=task_type, resource_meta=meta, task_category=agent_pb2.TaskCategory(name=task_type, version=0)
        )
        self.server.stub.DeleteTask(req, timeout=15.0)

    def execute_sync(self, attempt: Attempt, timeout: float = 60.0) -> agent_pb2.Resource:
        """ExecuteTaskSync as propeller's connector plugin sends it: a header (template, output prefix, task
        execution metadata), then the inputs, then it closes its side and reads one answer header."""
        header = agent_pb2.CreateRequestHeader(
            template=attempt.template, output_prefix=attempt.dir, task_execution_metadata=attempt.metadata
        )
        requests = iter(
            [agent_pb2.ExecuteTaskSyncRequest(header=header), agent_pb2.ExecuteTaskSyncRequest(inputs=attempt.inputs)]
        )
        answers = list(self.server.sync_stub.ExecuteTaskSync(requests, timeout=timeout))
        assert len(answers) == 1 and answers[0].HasField("header"), answers
        return answers[0].header.resource

    def wait(
        self, meta: bytes, task_type: str = "actor", timeout: float = 60.0, phases=TERMINAL, interval: float = 0.005
    ) -> agent_pb2.Resource:
        """Polls GetTask every `interval` seconds (0: back to back, as the benches' tight poll) until `phases`."""
        return wait_until(
            lambda: (lambda r: r if r.phase in phases else None)(self.get(meta, task_type)),
            timeout,
            f"phase in {sorted(PHASE.Phase.Name(p) for p in phases)}",
            interval,
        )


def output_value(outputs: literals_pb2.LiteralMap, name: str, python_type):
    from flytekit.models.literals import Literal

    ctx = FlyteContextManager.current_context()
    return TypeEngine.to_python_value(ctx, Literal.from_flyte_idl(outputs.literals[name]), python_type)

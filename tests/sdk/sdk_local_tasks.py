"""Actor tasks for the local-run tests; imported by name in the driver (pytest, pyflyte run) and in replicas."""

import ctypes
import os
import signal
import time
import typing

from flytekit import PodTemplate, workflow
from kubernetes.client import V1Container, V1EnvVar, V1PodSpec

from flytekitplugins_actor import ActorEnvironment


class Boom(Exception):
    """A user exception type the driver must get back as itself."""


class CodedError(Exception):
    """A user exception whose __init__ does not take its args back: pickle's default rebuild cannot make it."""

    def __init__(self, code: int, detail: str):
        super().__init__(f"error {code}: {detail}")
        self.code, self.detail = code, detail


basic = ActorEnvironment(name="sdk-local", ttl_seconds=300)

_counter = 0


@basic.task
def whoami() -> int:
    return os.getpid()


@basic.task
def parent_pid() -> int:
    return os.getppid()


@basic.task
def bump() -> int:
    """Process state: a module global that survives between executions on a warm replica."""
    global _counter
    _counter += 1
    return _counter


@basic.task
def read_env(name: str) -> str:
    return os.environ.get(name, "<unset>")


@basic.task
def sandbox_dirs() -> typing.Tuple[str, str]:
    """The execution's temp dir and its file access's sandbox dir."""
    import tempfile

    from flytekit.core.context_manager import FlyteContextManager

    return tempfile.gettempdir(), str(FlyteContextManager.current_context().file_access.local_sandbox_dir)


@basic.task
def echo_twice(text: str) -> str:
    return text + text


@basic.task
def raise_boom(message: str) -> int:
    raise Boom(message)
    return 0


@basic.task
def raise_coded(code: int, detail: str) -> int:
    raise CodedError(code, detail)
    return 0


@basic.task
def raise_key_error() -> int:
    return {}["missing-key"]


@workflow
def wf_a() -> int:
    return whoami()


@workflow
def wf_b() -> int:
    bump()
    return whoami()


@workflow
def wf_pids() -> typing.Tuple[int, int]:
    """For `pyflyte run`: the replica's pid and its parent's (the driver's)."""
    return whoami(), parent_pid()


@workflow
def wf_boom() -> int:
    return raise_boom(message="from a workflow")


# ---- env vars from `environment` and the pod template's primary container ----
pod_template = PodTemplate(
    primary_container_name="primary",
    pod_spec=V1PodSpec(
        containers=[
            V1Container(
                name="primary",
                env=[
                    V1EnvVar(name="SDK_POD_VAR", value="compile_time"),
                    V1EnvVar(name="SDK_OVERLAP", value="from-pod"),
                ],
            )
        ]
    ),
)
with_env = ActorEnvironment(
    name="sdk-local-env",
    ttl_seconds=300,
    pod_template=pod_template,
    environment={"SDK_ENV_VAR": "from-environment", "SDK_OVERLAP": "from-environment"},
)


@with_env.task
def env_of(name: str) -> str:
    return os.environ.get(name, "<unset>")


@with_env.task
def get_and_set() -> str:
    os.environ["SDK_RUN_VAR"] = "run_time"
    return os.getenv("SDK_POD_VAR")


@with_env.task
def check_set() -> str:
    return os.getenv("SDK_RUN_VAR", "<unset>")


@workflow
def wf_pod_template() -> typing.Tuple[str, str]:
    """The seeds' pod_template example: ("compile_time", "run_time")."""
    a = get_and_set()
    b = check_set()
    a >> b
    return a, b


# ---- replicas that die mid-task ----
deaths = ActorEnvironment(name="sdk-deaths", ttl_seconds=300)


@deaths.task
def death_pid() -> int:
    return os.getpid()


@deaths.task
def die(how: str) -> int:
    if how == "exit":
        os._exit(7)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)
    raise ValueError(how)
    return 0


# ---- idle teardown ----
ttl0 = ActorEnvironment(name="sdk-ttl-zero", ttl_seconds=0)
ttl1 = ActorEnvironment(name="sdk-ttl-one", ttl_seconds=1)


@ttl0.task
def ttl0_pid() -> int:
    return os.getpid()


@ttl1.task
def ttl1_pid() -> int:
    return os.getpid()


@ttl1.task
def ttl1_busy(seconds: float) -> int:
    """Runs longer than the pool's ttl: a busy replica is not idle, so it must not be torn down."""
    time.sleep(seconds)
    return os.getpid()


# ---- lazy start, warm preference, one execution at a time per replica ----
lazy = ActorEnvironment(name="sdk-lazy", replica_count=3, ttl_seconds=300)


@lazy.task
def lazy_pid() -> int:
    return os.getpid()


@basic.task
def overlap_probe(probe_dir: str, me: str, hold: float) -> int:
    """Marks itself running, watches `hold` seconds for another execution running at the same time;
    returns pid, or -1 if it saw one."""
    from sdk_helpers import saw_overlap

    return -1 if saw_overlap(probe_dir, me, hold) else os.getpid()


# ---- files and structured data across the driver/replica boundary ----
import dataclasses  # noqa: E402

from flytekit.types.file import FlyteFile  # noqa: E402


@dataclasses.dataclass
class Stats:
    n: int
    words: typing.List[str]


@basic.task
def count_words(f: FlyteFile) -> Stats:
    with open(f.download()) as fh:
        words = fh.read().split()
    return Stats(n=len(words), words=words)


@basic.task
def write_report(stats: Stats) -> FlyteFile:
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"report-{os.getpid()}-{stats.n}.txt")
    with open(path, "w") as fh:
        fh.write(f"{stats.n} words from pid {os.getpid()}: {' '.join(stats.words)}")
    return FlyteFile(path)


@workflow
def wf_files(f: FlyteFile) -> FlyteFile:
    return write_report(stats=count_words(f=f))


# ---- state that outlives an execution: never an execution's temp dir, always replica_dir() ----
import tempfile  # noqa: E402

from flytekitplugins_actor import replica_dir  # noqa: E402


@basic.task
def file_in_execution_temp_dir(content: str) -> str:
    path = os.path.join(tempfile.gettempdir(), "held.txt")
    with open(path, "w") as fh:
        fh.write(content)
    return path


@basic.task
def file_in_replica_dir(content: str) -> str:
    path = os.path.join(replica_dir(), "held.txt")
    with open(path, "w") as fh:
        fh.write(content)
    return path


@basic.task
def read_file_or_gone(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return "<gone>"


# ---- the context a task sees: on a replica, as under pyflyte-execute ----
import json  # noqa: E402

import flytekit  # noqa: E402
from flytekit.core.context_manager import FlyteContextManager  # noqa: E402


@basic.task
def describe_context(payload: str) -> str:
    """What a task can see of its execution, with paths reduced to facts that hold for any run."""
    params = flytekit.current_context()
    ctx = FlyteContextManager.current_context()
    params.checkpoint.write(payload.encode())
    scratch = tempfile.NamedTemporaryFile(delete=False)
    scratch.close()
    ss = ctx.serialization_settings
    return json.dumps(
        {
            "execution_id": [params.execution_id.project, params.execution_id.domain, params.execution_id.name],
            "task_id": [params.task_id.project, params.task_id.domain, params.task_id.name, params.task_id.version],
            "raw_output_prefix": params.raw_output_prefix,
            "output_metadata_prefix": params.output_metadata_prefix,
            "working_directory_is_a_dir": os.path.isdir(params.working_directory),
            "mode": str(ctx.execution_state.mode),
            "serialization": [ss.project, ss.domain, ss.version],
            "temp_file_in_sandbox_dir": os.path.dirname(scratch.name) == tempfile.gettempdir(),
            "sandbox_under_temp_dir": str(ctx.file_access.local_sandbox_dir).startswith(tempfile.gettempdir()),
            "engine_dir_is_a_dir": os.path.isdir(ctx.execution_state.engine_dir),
        },
        sort_keys=True,
    )

"""Local runs: actor tasks execute on real local replica processes, one warm pool per environment key."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional

from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.core.utils import load_proto_from_file
from flytekit.models.literals import LiteralMap

from flytekitplugins_actor.environment import ActorEnvironment
from flytekitplugins_actor.errors import ActorTaskFailed, ExecutionCancelled, ReplicaDied
from flytekitplugins_actor.literals import literal_map_from_pb
from flytekitplugins_actor.pool import Execution, ExecutionState, PoolRegistry, ReplicaPool
from flytekitplugins_actor.replica.backend import LocalProcessBackend, ReplicaSpec
from flytekitplugins_actor.replica.command import ExecutionCommand
from flytekitplugins_actor.replica.execution import SYS_PATH_ENV, ExecutionSpec
from flytekitplugins_actor.replica.identity import identity_env
from flytekitplugins_actor.replica.protocol import INLINE_LIMIT_BYTES
from flytekitplugins_actor.replica_logs import KEEP_RUNS, ReplicaOutput, prune_runs


class LocalPools(PoolRegistry):
    """The driver's pools. Replicas die with the driver: at exit, and at once if it is killed (their stdin closes).

    Everything of a run lives under `<temp dir>/flyte-actor-runs-<pid>` (the driver's workdirs, and the replicas'
    temp dirs: their TMPDIR points there) and is removed at exit, including after Ctrl-C or SIGTERM; a driver that
    was killed outright is cleaned up by the next one. Replica logs are kept for the last few runs."""

    def __init__(self) -> None:
        super().__init__()
        self._backend = LocalProcessBackend()
        tmp = tempfile.gettempdir()
        self._log_root = os.path.join(tmp, "flyte-actor-logs")
        self.log_dir = os.path.join(self._log_root, str(os.getpid()))
        self._workdir_root = os.path.join(tmp, f"{RUNS_PREFIX}{os.getpid()}")
        self._free_workdirs: List[str] = []
        self.output = ReplicaOutput(self.log_dir)
        self._prepared = False
        self._prepare_lock = threading.Lock()
        atexit.register(self.shutdown)
        _exit_cleanly_on_sigterm()

    def _prepare_run(self) -> None:
        """Once, before the first replica starts: clears what killed drivers left, makes this run's dirs."""
        with self._prepare_lock:  # not the registry's lock: pools are created under it
            if self._prepared:
                return
            prune_runs(os.path.dirname(self._workdir_root), RUNS_PREFIX, 0, self._workdir_root)
            prune_runs(self._log_root, "", KEEP_RUNS - 1, self.log_dir)
            os.makedirs(os.path.join(self._workdir_root, "replicas"), exist_ok=True)
            os.makedirs(self.log_dir, exist_ok=True)
            self.output.start()
            self._prepared = True

    def submit_to(self, env: ActorEnvironment, spec: ExecutionSpec, **kwargs) -> Execution:
        """Queues an execution on the environment's pool (started, or replaced if reaped, as needed)."""
        return self.submit(env.key(), lambda: self._create(env, spec.env.get(SYS_PATH_ENV)), spec, **kwargs)

    def forget(self, env: ActorEnvironment, execution_id: str) -> None:
        pool = self.get(env.key())
        if pool is not None:
            pool.forget(execution_id)

    def _create(self, env: ActorEnvironment, module_root: Optional[str]) -> ReplicaPool:
        self._prepare_run()
        key = env.key()
        replica_env = {
            "PYTHONUNBUFFERED": "1",  # task output reaches the driver's terminal as it is printed
            **env.replica_env(),
            "PYTHONPATH": _python_path(module_root),
            "TMPDIR": os.path.join(self._workdir_root, "replicas"),  # removed with the run, however replicas end
        }
        cwd = os.getcwd()

        def make_spec(name: str, token: str) -> ReplicaSpec:
            return ReplicaSpec(
                name=name,
                token=token,
                env=replica_env,
                cwd=cwd,
                log_dir=self.log_dir,
                labels={"actor-env": env.name, "actor-env-key": key},
            )

        return ReplicaPool(key, self._backend, make_spec, env.replica_count, env.resolved_ttl_seconds, name=env.name)

    @contextlib.contextmanager
    def workdir(self) -> Iterator[str]:
        """A private dir for one execution's inputs.pb and outputs. Dirs are emptied and reused, not removed:
        creating and removing directories costs more than a warm execution on a busy disk."""
        with self._lock:
            path = self._free_workdirs.pop() if self._free_workdirs else None
        if path is None:
            self._prepare_run()
            path = tempfile.mkdtemp(dir=self._workdir_root)
        try:
            yield path
        finally:
            if _empty(path):
                with self._lock:
                    self._free_workdirs.append(path)
            else:
                shutil.rmtree(path, ignore_errors=True)

    def shutdown(self) -> None:
        replicas = [r for p in self.pools() for r in p.replicas]
        super().shutdown()
        for r in replicas:  # their temp dirs are under the run dir: let them finish with it first
            r.wait_dead(3.0)
        self.output.stop()
        shutil.rmtree(self._workdir_root, ignore_errors=True)


RUNS_PREFIX = "flyte-actor-runs-"


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM ends a Python process without running atexit: make it an exit, so the run is cleaned up (only if
    nobody installed a handler, and only from the main thread, where handlers can be installed)."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _sigterm_exit)
    except (ValueError, OSError):
        pass


def _sigterm_exit(signum, frame):
    raise SystemExit(128 + signum)


def _empty(path: str) -> bool:
    """Removes what an execution left in its workdir, keeping the dirs; False if that failed."""
    try:
        if not os.listdir(path):  # the usual case: inputs and outputs travelled in the messages
            return True
        for root, dirs, files in os.walk(path):
            for f in files:
                os.unlink(os.path.join(root, f))
        return True
    except OSError:
        return False


def _python_path(module_root: Optional[str] = None) -> str:
    """The driver's sys.path, so the task's module imports in the replica exactly as in the driver."""
    paths = [os.path.abspath(p or os.getcwd()) for p in ([module_root] if module_root else []) + sys.path]
    return os.pathsep.join(dict.fromkeys(paths))


def _module_root(task) -> Optional[str]:
    """The sys.path entry the task's module was imported from: `pyflyte run` adds it only while loading the file."""
    if "_actor_module_root" not in task.__dict__:  # a module's file does not move: once per task
        task.__dict__["_actor_module_root"] = _find_module_root(task)
    return task.__dict__["_actor_module_root"]


def _find_module_root(task) -> Optional[str]:
    module = sys.modules.get(getattr(task, "instantiated_in", None) or task.task_function.__module__)
    path = getattr(module, "__file__", None)
    if not path or module.__name__ == "__main__":
        return None
    root = os.path.dirname(os.path.abspath(path))
    levels = module.__name__.count(".") + (1 if os.path.basename(path) == "__init__.py" else 0)
    for _ in range(levels):
        root = os.path.dirname(root)
    return root


_POOLS: Optional[LocalPools] = None
_POOLS_LOCK = threading.Lock()


def local_pools() -> LocalPools:
    global _POOLS
    with _POOLS_LOCK:
        if _POOLS is None:
            _POOLS = LocalPools()
        return _POOLS


def _loader(task, workdir: str):
    """(resolver location, loader args): by module name when importable, else a cloudpickle of the task."""
    cached = task.__dict__.get("_actor_loader")
    if cached is not None:
        return cached
    # a script run as __main__ is tracked under its file's module name, which the replica would re-import
    # (re-running the script's top level): such tasks travel by value instead
    if task.task_function.__module__ != "__main__" and task.task_resolver.location.startswith("flytekit."):
        settings = SerializationSettings(image_config=ImageConfig.auto_default_image())
        try:
            loader = task.__dict__["_actor_loader"] = (
                task.task_resolver.location,
                task.task_resolver.loader_args(settings, task),
            )
            return loader
        except Exception:
            pass
    import cloudpickle

    # pickled per call: a task from __main__ or a notebook carries the globals it sees now
    path = os.path.join(workdir, "task.pkl")
    with open(path, "wb") as f:
        cloudpickle.dump(task, f)
    return "flytekitplugins_actor.resolver.pickled_task_resolver", ["pickled-task", path]


def _identity(task) -> Dict[str, str]:
    """The FLYTE_INTERNAL_* identity a pod would get, derived from the driver's current execution."""
    params = FlyteContextManager.current_context().user_space_params
    exe = params.execution_id if params is not None else None
    return identity_env(
        getattr(exe, "project", None) or "local",
        getattr(exe, "domain", None) or "local",
        getattr(exe, "name", None) or "local",
        "local",
        "local",
        task.name,
        "local",
    )


def run_on_replica(task, native_inputs: Dict[str, Any]) -> Any:
    """Executes an actor task on a warm local replica and returns its native outputs (as the function would)."""
    ctx = FlyteContextManager.current_context()
    inputs = TypeEngine.dict_to_literal_map(ctx, native_inputs, task.python_interface.inputs)
    outputs = run_literals_on_replica(task, inputs)
    names = list(task.python_interface.outputs)
    if not names:
        return None
    values = TypeEngine.literal_map_to_kwargs(ctx, outputs, task.python_interface.outputs)
    return values[names[0]] if len(names) == 1 else tuple(values[n] for n in names)


def run_literals_on_replica(
    task, inputs: LiteralMap, execution_id: Optional[str] = None, queued: Optional[Callable[[], None]] = None
) -> LiteralMap:
    """Executes an actor task on a warm local replica of its environment: inputs.pb in, outputs.pb out.
    `execution_id` names the execution in its pool (a map cancels its items by it); a fresh one by default.
    `queued()` is called once the execution is in its pool's FIFO queue (a map queues its items in input order)."""
    ctx = FlyteContextManager.current_context()
    pools = local_pools()
    with pools.workdir() as workdir:
        return _run_in(workdir, ctx, pools, task, inputs, execution_id or f"local-{uuid.uuid4().hex}", queued)


def _run_in(
    workdir: str,
    ctx,
    pools: "LocalPools",
    task,
    inputs: LiteralMap,
    execution_id: str,
    queued: Optional[Callable[[], None]] = None,
) -> LiteralMap:
    inputs_path = os.path.join(workdir, "inputs.pb")
    output_prefix = os.path.join(workdir, "outputs")
    inputs_pb = inputs.to_flyte_idl().SerializeToString()

    def write_inputs(data: bytes) -> None:
        with open(inputs_path, "wb") as f:
            f.write(data)

    inline = len(inputs_pb) <= INLINE_LIMIT_BYTES  # small inputs go with the request, big ones through a file
    if not inline:
        write_inputs(inputs_pb)
    resolver, loader_args = _loader(task, workdir)
    args = ExecutionCommand.build(
        inputs=inputs_path,
        output_prefix=output_prefix,
        raw_output_data_prefix=ctx.file_access.raw_output_prefix,
        resolver=resolver,
        resolver_args=loader_args,
    ).to_args()
    env = _identity(task)
    root = _module_root(task)
    if root:  # the pool's PYTHONPATH has the first task's root; another task of the environment may need its own
        env[SYS_PATH_ENV] = root
    # the driver is the only reader of this execution's outputs: small ones come back in the reply
    spec = ExecutionSpec(
        execution_id, args, env, inputs_pb=inputs_pb if inline else None, return_outputs=True, inputs_file=write_inputs
    )
    # a single call runs on an idle replica from this thread; a map's items keep their FIFO order in the queue
    execution = pools.submit_to(task.task_config, spec, want_exception=True, run_here=queued is None)
    if queued is not None:
        queued()
    execution.wait()
    pools.forget(task.task_config, execution.id)
    if execution.replica and execution.printed is not False:  # the task's output reaches the terminal first
        pools.output.drain(execution.replica)
    if execution.state is ExecutionState.SUCCEEDED:
        from flyteidl.core import literals_pb2

        if execution.outputs is not None:
            outputs = literals_pb2.LiteralMap.FromString(execution.outputs)
        else:
            outputs = load_proto_from_file(literals_pb2.LiteralMap, os.path.join(output_prefix, "outputs.pb"))
        return literal_map_from_pb(outputs)  # kept as protobuf: in a workflow it usually goes straight to the next task
    where = f"actor task {task.name!r}" + (
        f" on replica {execution.replica} (log: {execution.log_uri})" if execution.replica else ""
    )
    if execution.state is ExecutionState.REPLICA_DIED:
        after = "; a new replica takes its place" if execution.replica else ""
        raise ReplicaDied(f"{where} failed: {execution.death}{after}")
    if execution.state is ExecutionState.CANCELLED:
        raise ExecutionCancelled(f"{where} was cancelled")
    message = execution.error.message if execution.error is not None else "unknown error"
    exc = execution.task_exception()
    if exc is not None:
        exc.add_note(f"raised by {where}; replica traceback:\n{message}") if hasattr(exc, "add_note") else None
        raise exc
    raise ActorTaskFailed(f"{where} failed: {message}")

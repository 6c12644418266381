"""Runs one task execution inside a warm replica: the pyflyte-execute path, minus the process start.

This is the single code path every actor execution takes (local runs, the connector's local backend and
pods): inputs.pb -> task -> outputs.pb or error.pb under the output prefix, exactly as pyflyte-execute.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from flytekitplugins_actor.replica.sandbox import (
    ExecutionDirs,
    engine_dir_error_file,
    execution_context,
    fast_path_applies,
)

SYS_PATH_ENV = "FLYTE_ACTOR_SYS_PATH"
"""Extra sys.path entries an execution needs (set by local runs: the task module's root)."""
_FAST_EXECUTE = "pyflyte-fast-execute"
_EXECUTE = "pyflyte-execute"


class CodeVersionMismatch(RuntimeError):
    """A replica was handed code from another fast-registered distribution than the one it has imported."""


@dataclass
class ExecutionSpec:
    """What a replica needs to run one execution: the rendered container args and the execution's identity env."""

    execution_id: str
    args: List[str]
    env: Dict[str, str] = field(default_factory=dict)

    def parsed(self) -> "ParsedCommand":
        cached = self.__dict__.get("_parsed")
        if cached is None:
            cached = self.__dict__["_parsed"] = parse_command(self.args)
        return cached


def identity_env(
    project: str,
    domain: str,
    name: str,
    task_project: str,
    task_domain: str,
    task_name: str,
    task_version: str,
    attempt: int = 0,
) -> Dict[str, str]:
    """The FLYTE_INTERNAL_* identity env propeller gives a task pod; a replica sets it per execution."""
    return {
        "FLYTE_INTERNAL_EXECUTION_PROJECT": project,
        "FLYTE_INTERNAL_EXECUTION_DOMAIN": domain,
        "FLYTE_INTERNAL_EXECUTION_ID": name,
        "FLYTE_INTERNAL_EXECUTION_WORKFLOW": "",
        "FLYTE_INTERNAL_EXECUTION_LAUNCHPLAN": "",
        "FLYTE_INTERNAL_TASK_PROJECT": task_project,
        "FLYTE_INTERNAL_TASK_DOMAIN": task_domain,
        "FLYTE_INTERNAL_TASK_NAME": task_name,
        "FLYTE_INTERNAL_TASK_VERSION": task_version,
        "FLYTE_ATTEMPT_NUMBER": str(attempt),
    }


@dataclass
class ParsedCommand:
    inputs: str
    output_prefix: str
    raw_output_data_prefix: Optional[str]
    checkpoint_path: Optional[str]
    prev_checkpoint: Optional[str]
    resolver: str
    resolver_args: List[str]
    distribution: Optional[str] = None
    dest_dir: Optional[str] = None


_EXECUTE_OPTIONS = {
    "--inputs": "inputs",
    "--output-prefix": "output_prefix",
    "--raw-output-data-prefix": "raw_output_data_prefix",
    "--checkpoint-path": "checkpoint_path",
    "--prev-checkpoint": "prev_checkpoint",
    "--resolver": "resolver",
    "--dynamic-addl-distro": "distribution",
    "--dynamic-dest-dir": "dest_dir",
}
_FAST_OPTIONS = {"--additional-distribution": "distribution", "--dest-dir": "dest_dir"}


def _parse_options(args: List[str], options: Dict[str, str], command: str) -> Tuple[Dict[str, str], List[str]]:
    """`--opt value` / `--opt=value` pairs up to `--` (or the first positional); returns (options, the rest)."""
    found: Dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return found, args[i + 1 :]
        if not arg.startswith("--"):
            return found, args[i:]
        name, eq, value = arg.partition("=")
        if name == "--test":
            raise ValueError(f"{command} --test (dry run) is not supported on a replica")
        if name not in options:
            raise ValueError(f"{command} got unknown option {name!r}; expected one of {sorted(options)}")
        if not eq:
            i += 1
            if i >= len(args):
                raise ValueError(f"{command} option {name} needs a value")
            value = args[i]
        found[options[name]] = value
        i += 1
    return found, []


def parse_command(args: List[str]) -> ParsedCommand:
    """Parses `[pyflyte-fast-execute ... --] pyflyte-execute ...` with the options flytekit's commands take."""
    args = list(args)
    fast: Dict[str, str] = {}
    if args and args[0] == _FAST_EXECUTE:
        fast, args = _parse_options(args[1:], _FAST_OPTIONS, _FAST_EXECUTE)
    if not args or args[0] != _EXECUTE:
        raise ValueError(f"an actor execution must run {_EXECUTE!r}, got command {args[:1]!r}")
    opts, resolver_args = _parse_options(args[1:], _EXECUTE_OPTIONS, _EXECUTE)
    for required in ("inputs", "output_prefix", "resolver"):
        if not opts.get(required):
            raise ValueError(f"{_EXECUTE} args carry no --{required.replace('_', '-')}")
    return ParsedCommand(
        inputs=opts["inputs"],
        output_prefix=opts["output_prefix"],
        raw_output_data_prefix=opts.get("raw_output_data_prefix"),
        checkpoint_path=opts.get("checkpoint_path"),
        prev_checkpoint=opts.get("prev_checkpoint"),
        resolver=opts["resolver"],
        resolver_args=[a for a in resolver_args if a != "--"],
        distribution=fast.get("distribution") or opts.get("distribution"),
        dest_dir=fast.get("dest_dir") or opts.get("dest_dir"),
    )


@dataclass
class ExecutionOutcome:
    """How an execution ended. `error` mirrors flyteidl's ContainerError: code, message, kind, origin."""

    execution_id: str
    state: str  # "succeeded" | "failed" | "cancelled"
    error: Optional[Dict[str, Any]] = None
    duration_s: float = 0.0
    exception: Optional[BaseException] = None

    def to_wire(self) -> Dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "state": self.state,
            "error": self.error,
            "duration_s": self.duration_s,
        }


class ReplicaRuntime:
    """Process-wide state of one replica: the code version it has imported and the execution in flight."""

    def __init__(self) -> None:
        self.code_version: Optional[str] = None
        self.current: Optional[ExecutionSpec] = None
        self.last_exception: Optional[BaseException] = None
        self.executions = 0
        self.dirs = ExecutionDirs()
        self._cwd_on_path: Optional[Tuple[str, int]] = None
        atexit.register(self.dirs.close)  # a replica leaves nothing in its temp dir

    def _activate_distribution(self, cmd: ParsedCommand) -> None:
        if not cmd.distribution:
            return
        if self.code_version is None:
            from flytekit.tools.fast_registration import download_distribution

            dest = os.path.realpath(os.path.expanduser(cmd.dest_dir or os.getcwd()))
            download_distribution(cmd.distribution, dest)
            if dest not in sys.path:
                sys.path.insert(0, dest)
            self.code_version = cmd.distribution
        elif self.code_version != cmd.distribution:
            raise CodeVersionMismatch(
                f"this replica imported code from {self.code_version!r} and cannot run code from "
                f"{cmd.distribution!r}; pools are keyed by code version, so this is a routing bug"
            )

    def run_deferred(self, spec: ExecutionSpec) -> Tuple[ExecutionOutcome, Callable[[], None]]:
        """Runs one execution; returns its outcome and the tidying to do once the outcome is reported.

        The execution gets a prepared private dir (its temp dir and flytekit's sandbox); the moment it ends, the
        dir is moved away (so nothing of it is visible to the next execution, however soon that starts) and the
        returned callable recycles it off the hot path. Never raises for anything the task does
        (KeyboardInterrupt = cancel)."""
        from flytekit.bin.entrypoint import normalize_inputs

        started = time.perf_counter()
        cmd = spec.parsed()
        saved_env = {k: os.environ.get(k) for k in spec.env}
        saved_tempdir = tempfile.tempdir
        exec_dir = self.dirs.take()
        self.current, self.last_exception = spec, None
        outcome: Optional[ExecutionOutcome] = None
        fast = fast_path_applies()
        try:
            os.environ.update(spec.env)
            for path in spec.env.get(SYS_PATH_ENV, "").split(os.pathsep):  # a local driver's module roots
                if path and path not in sys.path:
                    sys.path.append(path)
            tempfile.tempdir = exec_dir
            self._activate_distribution(cmd)
            raw, ckpt, prev = normalize_inputs(cmd.raw_output_data_prefix, cmd.checkpoint_path, cmd.prev_checkpoint)
            if fast:
                self._execute_in(exec_dir, cmd, raw, ckpt, prev)
            else:
                self._execute_with_flytekit_setup(exec_dir, cmd, raw, ckpt, prev)
        except KeyboardInterrupt:
            outcome = ExecutionOutcome(
                spec.execution_id, "cancelled", error=_error("ABORTED", "execution was cancelled", "USER", False)
            )
        except SystemExit as e:
            message = f"task called sys.exit({e.code!r}); a replica survives it, but the execution fails"
            outcome = self._fail(spec, cmd, _error("SystemExit", message, "USER", False), e)
        except CodeVersionMismatch as e:
            outcome = self._fail(spec, cmd, _error("CodeVersionMismatch", str(e), "SYSTEM", True), e)
        except BaseException as e:  # _dispatch_execute catches task errors; this is a failure around it
            outcome = self._fail(spec, cmd, _error("SYSTEM", traceback.format_exc(), "SYSTEM", True), e)
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            tempfile.tempdir = saved_tempdir
            self.current = None
            self.executions += 1
        if outcome is None:
            try:  # pyflyte-execute wrote error.pb into its engine dir before uploading it: no storage round trip
                error = _engine_dir_error(exec_dir, fast)
            except Exception as e:  # storage trouble must not take the replica down
                error = _error("SYSTEM", f"could not read the execution's error.pb: {e!r}", "SYSTEM", True)
            outcome = ExecutionOutcome(spec.execution_id, "failed" if error else "succeeded", error=error)
            outcome.exception = self.last_exception if error else None
        self.dirs.retire(exec_dir)
        outcome.duration_s = time.perf_counter() - started
        return outcome, self.dirs.tidy_one

    def _execute_in(self, exec_dir: str, cmd, raw: str, ckpt: Optional[str], prev: Optional[str]) -> None:
        """What `_execute_task` does, in a context built on the prepared dir (see replica/sandbox.py)."""
        from flytekit.bin.entrypoint import _dispatch_execute
        from flytekit.tools.module_loader import load_object_from_module

        with execution_context(cmd, exec_dir, raw, ckpt, prev) as ctx:
            cwd = os.getcwd()
            if self._cwd_on_path != (cwd, len(sys.path)):  # as pyflyte-execute: the working dir is importable
                if all(os.path.realpath(p) != cwd for p in sys.path):
                    sys.path.append(cwd)
                self._cwd_on_path = (cwd, len(sys.path))
            resolver = load_object_from_module(cmd.resolver)
            loader_args = list(cmd.resolver_args)
            _dispatch_execute(ctx, lambda: resolver.load_task(loader_args=loader_args), cmd.inputs, cmd.output_prefix)

    def _execute_with_flytekit_setup(
        self, exec_dir: str, cmd, raw: str, ckpt: Optional[str], prev: Optional[str]
    ) -> None:
        """flytekit's own `_execute_task`, its sandbox pointed into the execution's dir (runtime pip installs)."""
        from flytekit.bin.entrypoint import _execute_task
        from flytekit.core.context_manager import FlyteContextManager
        from flytekit.core.data_persistence import FileAccessProvider

        ctx = FlyteContextManager.current_context()
        sandbox = ctx.new_builder().with_file_access(
            FileAccessProvider(local_sandbox_dir=exec_dir, raw_output_prefix=raw)
        )
        with FlyteContextManager.with_context(sandbox):
            _execute_task(
                inputs=cmd.inputs,
                output_prefix=cmd.output_prefix,
                test=False,
                raw_output_data_prefix=raw,
                resolver=cmd.resolver,
                resolver_args=list(cmd.resolver_args),
                checkpoint_path=ckpt,
                prev_checkpoint=prev,
                dynamic_addl_distro=cmd.distribution,
                dynamic_dest_dir=cmd.dest_dir,
            )

    def _fail(
        self, spec: ExecutionSpec, cmd: ParsedCommand, error: Dict[str, Any], exc: BaseException
    ) -> ExecutionOutcome:
        try:
            write_error_document(cmd.output_prefix, error)
        except Exception as e:  # the outcome still reports the failure; storage trouble is added to it
            error = {**error, "message": f"{error['message']}\n(and error.pb could not be written: {e!r})"}
        return ExecutionOutcome(spec.execution_id, "failed", error=error, exception=exc)


def _error(code: str, message: str, origin: str, recoverable: bool) -> Dict[str, Any]:
    return {"code": code, "message": message, "origin": origin, "recoverable": recoverable}


def _join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


def write_error_document(output_prefix: str, error: Dict[str, Any]) -> None:
    """Writes error.pb the way pyflyte-execute does, for failures that happen around `_dispatch_execute`."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.utils import write_proto_to_file
    from flytekit.models.core import errors as error_models
    from flytekit.models.core import execution as execution_models

    kind = error_models.ContainerError.Kind
    origin = execution_models.ExecutionError.ErrorKind
    doc = error_models.ErrorDocument(
        error_models.ContainerError(
            code=error["code"],
            message=error["message"],
            kind=kind.RECOVERABLE if error["recoverable"] else kind.NON_RECOVERABLE,
            origin=origin.USER if error["origin"] == "USER" else origin.SYSTEM,
        )
    )
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, "error.pb")
        write_proto_to_file(doc.to_flyte_idl(), local)
        FlyteContextManager.current_context().file_access.put_data(local, _join(output_prefix, "error.pb"))


def _parse_error_document(data: bytes) -> Dict[str, Any]:
    from flyteidl.core import errors_pb2

    doc = errors_pb2.ErrorDocument()
    doc.ParseFromString(data)
    e = doc.error
    return _error(
        e.code, e.message, "USER" if e.origin == 1 else "SYSTEM", e.kind == errors_pb2.ContainerError.RECOVERABLE
    )


def _engine_dir_error(exec_dir: str, fast: bool) -> Optional[Dict[str, Any]]:
    """The error document an execution wrote into its local engine dir, if any."""
    import glob

    if fast:
        paths = [p for p in [engine_dir_error_file(exec_dir)] if p]
    else:  # flytekit's own setup made a flyte* sandbox inside the execution's dir
        paths = glob.glob(os.path.join(exec_dir, "flyte*", "local_flytekit", "engine_dir", "error*.pb"))
    for path in paths:
        with open(path, "rb") as f:
            return _parse_error_document(f.read())
    return None


def read_error_document(output_prefix: str) -> Optional[Dict[str, Any]]:
    """Returns the error.pb under an output prefix as a dict, or None when there is none."""
    from flytekit.core.context_manager import FlyteContextManager

    path = _join(output_prefix, "error.pb")
    fa = FlyteContextManager.current_context().file_access
    if fa.is_remote(path):
        if not fa.exists(path):
            return None
        with tempfile.TemporaryDirectory() as d:
            fa.get_data(path, os.path.join(d, "error.pb"))
            data = open(os.path.join(d, "error.pb"), "rb").read()
    else:
        local = path[len("file://") :] if path.startswith("file://") else path
        try:
            with open(local, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
    return _parse_error_document(data)


RUNTIME = ReplicaRuntime()

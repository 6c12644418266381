"""Runs one task execution inside a warm replica: the pyflyte-execute path, minus the process start.

This is the single code path every actor execution takes (local runs, the connector's local backend and
pods): inputs.pb -> task -> outputs.pb or error.pb under the output prefix, exactly as pyflyte-execute.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from flytekitplugins_actor.replica import engine_files
from flytekitplugins_actor.replica.command import ExecutionCommand
from flytekitplugins_actor.replica.engine_files import EngineFiles
from flytekitplugins_actor.replica.error import CANCELLED, ExecutionError, read_engine_dir_error, write_error_document
from flytekitplugins_actor.replica.protocol import (
    INLINE_LIMIT_BYTES,
    ProtocolError,
    ReplicaExecutionState,
    decode_bytes,
    encode_bytes,
)
from flytekitplugins_actor.replica.sandbox import (
    ENGINE_DIR,
    SANDBOX,
    ExecutionDirs,
    execution_context,
    fast_path_applies,
    run_coroutines_inline,
    stage_inputs,
    use_frugal_serialization,
)

SYS_PATH_ENV = "FLYTE_ACTOR_SYS_PATH"
"""Extra sys.path entries an execution needs (set by local runs: the task module's root)."""


class CancelRequested(KeyboardInterrupt):
    """Raised into a running task by the replica's cancel signal, and only by it: the execution is cancelled.
    A KeyboardInterrupt, so a task's `except KeyboardInterrupt:` clean-up runs on a cancel as on Ctrl-C; a
    KeyboardInterrupt the task raises itself is a failure like any other exception."""


class ReplicaTerminated(BaseException):
    """Raised into a running execution when its replica is told to stop (SIGTERM): the execution's fate is its
    pool's (a system retry may write under the same output prefix), so nothing is written for it here."""


class CodeVersionMismatch(RuntimeError):
    """A replica was handed code from another fast-registered distribution than the one it has imported."""


@dataclass
class ExecutionSpec:
    """What a replica needs to run one execution: the rendered container args and the execution's identity env.

    `inputs_pb`, when set, is the inputs LiteralMap itself: the execution reads it instead of the file at the
    command's `--inputs` (a local run or a map item saves a file write and read per execution). With
    `return_outputs`, a succeeded execution's outputs.pb (up to INLINE_LIMIT_BYTES) comes back in the reply instead
    of being written under the output prefix: only for a caller that is the sole reader of its outputs (a local
    run's driver)."""

    execution_id: str
    args: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    inputs_pb: Optional[bytes] = None
    return_outputs: bool = False
    inputs_file: Optional[Callable[[bytes], None]] = field(default=None, repr=False, compare=False)
    """Writes `inputs_pb` where the command's `--inputs` points: the pool calls it for a replica too old to read them
    from the request (protocol version 1)."""

    def parsed(self) -> ExecutionCommand:
        cached = self.__dict__.get("_parsed")
        if cached is None:
            cached = self.__dict__["_parsed"] = ExecutionCommand.parse(self.args)
        return cached

    def write_inputs(self) -> None:
        """Writes the inline inputs as the file the command reads (for a replica that cannot take them inline)."""
        if self.inputs_pb is None:
            return
        if self.inputs_file is None:
            raise RuntimeError(
                "the replica is too old to read inputs from the request, and no inputs file can be written"
            )
        self.inputs_file(self.inputs_pb)

    def to_wire(self, inline: bool = True) -> Dict[str, Any]:
        """The `submit` request's fields (without `inputs_pb` unless `inline`)."""
        wire: Dict[str, Any] = {"execution_id": self.execution_id, "args": self.args, "env": self.env}
        if self.inputs_pb is not None and inline:
            wire["inputs_pb"] = encode_bytes(self.inputs_pb)
        if self.return_outputs:
            wire["return_outputs"] = True
        return wire

    @classmethod
    def from_wire(cls, msg: Dict[str, Any]) -> "ExecutionSpec":
        """Reads a `submit` request; a malformed one raises KeyError, TypeError or ValueError (INVALID_ARGUMENT)."""
        inputs = decode_inline(msg.get("inputs_pb"))
        if inputs is not None and len(inputs) > INLINE_LIMIT_BYTES:
            raise ValueError(f"inputs_pb is {len(inputs)} bytes; at most {INLINE_LIMIT_BYTES} travel inline")
        return cls(
            execution_id=str(msg["execution_id"]),
            args=[str(a) for a in msg["args"]],
            env={str(k): str(v) for k, v in (msg.get("env") or {}).items()},
            inputs_pb=inputs,
            return_outputs=bool(msg.get("return_outputs")),
        )


def decode_inline(field: Any) -> Optional[bytes]:
    try:
        return decode_bytes(field)
    except ProtocolError as e:  # in a request: the request is malformed
        raise ValueError(f"inputs_pb: {e}") from None


@dataclass
class ExecutionOutcome:
    """How an execution ended: SUCCEEDED, FAILED or CANCELLED, with the error (as error.pb says) unless it succeeded,
    and outputs.pb when the execution was asked to return it."""

    execution_id: str
    state: ReplicaExecutionState
    error: Optional[ExecutionError] = None
    duration_s: float = 0.0
    exception: Optional[BaseException] = None
    outputs_pb: Optional[bytes] = None
    printed: Optional[bool] = None
    """Whether the task wrote to the replica's output (None: the replica cannot tell): a local driver shows a task's
    output before its result, and need not look when there is none."""

    def to_wire(self) -> Dict[str, Any]:
        wire = {
            "execution_id": self.execution_id,
            "state": self.state.value,
            "error": None if self.error is None else self.error.to_wire(),
            "duration_s": self.duration_s,
        }
        if self.outputs_pb is not None:
            wire["outputs_pb"] = encode_bytes(self.outputs_pb)
        if self.printed is not None:
            wire["printed"] = self.printed
        return wire


class ReplicaRuntime:
    """Process-wide state of one replica: the code version it has imported, the executions it ran."""

    def __init__(self) -> None:
        self.code_version: Optional[str] = None
        self.last_exception: Optional[BaseException] = None
        self.executions = 0
        self.cancel_armed = False
        """True only while the task's own execution runs: the replica's cancel signal raises CancelRequested then,
        never during set-up or clean-up (env, temp dir, the execution's dir stay consistent)."""
        self.cancelled: Set[str] = set()
        """Executions whose cancel was asked for (by the replica's control thread): checked as the task starts."""
        self.dirs = ExecutionDirs()
        self._cwd_on_path: Optional[Tuple[str, int]] = None
        self._start_cwd = os.getcwd()
        atexit.register(self.dirs.close)  # a replica leaves nothing in its temp dir

    def _activate_distribution(self, cmd: ExecutionCommand) -> None:
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
        """Runs one execution; returns its outcome and `retire`, to call once the outcome is reported and before
        anything else runs here.

        The execution gets a prepared private dir (its temp dir and flytekit's sandbox); `retire` moves it away
        (one rename: nothing of it is visible to the next execution, however soon that starts), and the replica
        recycles it off the hot path (`dirs.tidy_one`). Never raises for anything the task does; only a
        CancelRequested (the replica's cancel, armed only around the task's own execution) means cancelled."""
        from flytekit.bin.entrypoint import normalize_inputs

        started = time.perf_counter()
        cmd = spec.parsed()
        saved_env = {k: os.environ.get(k) for k in spec.env}
        saved_tempdir = tempfile.tempdir
        exec_dir = self.dirs.take()
        self.last_exception = None
        outcome: Optional[ExecutionOutcome] = None
        outputs_pb: Optional[bytes] = None
        fast = fast_path_applies()
        # inputs that came with the request are read from memory, under a name that is never written
        inline = os.path.join(exec_dir, SANDBOX, "inputs.inline.pb") if fast and spec.inputs_pb is not None else None
        files = EngineFiles(os.path.join(exec_dir, ENGINE_DIR), inline, spec.inputs_pb) if fast else None
        if not self.executions:  # the first execution of this process: it is a replica
            use_frugal_serialization()
            run_coroutines_inline()
            engine_files.keep_engine_files_in_memory()
        try:
            os.environ.update(spec.env)
            for path in spec.env.get(SYS_PATH_ENV, "").split(os.pathsep):  # a local driver's module roots
                if path and path not in sys.path:
                    sys.path.append(path)
            tempfile.tempdir = exec_dir
            if inline is not None:
                cmd = cmd.with_paths(inputs=inline)
            elif spec.inputs_pb is not None:  # flytekit's own set-up reads them from a file
                cmd = cmd.with_paths(inputs=stage_inputs(exec_dir, spec.inputs_pb))
            self._activate_distribution(cmd)
            raw, ckpt, prev = normalize_inputs(cmd.raw_output_data_prefix, cmd.checkpoint_path, cmd.prev_checkpoint)
            try:
                self.cancel_armed = True  # then checked: a cancel before this line is in self.cancelled
                if spec.execution_id in self.cancelled:  # asked for before the task could start
                    raise CancelRequested("cancelled before it started")
                if files is not None:
                    outputs_pb = self._execute_in(spec, exec_dir, files, cmd, raw, ckpt, prev)
                else:
                    self._execute_with_flytekit_setup(exec_dir, cmd, raw, ckpt, prev)
            finally:
                self.cancel_armed = False
        except ReplicaTerminated:  # no error.pb: the replica stops and reports nothing for this execution
            raise
        except CancelRequested:
            outcome = ExecutionOutcome(spec.execution_id, ReplicaExecutionState.CANCELLED, error=CANCELLED)
        except KeyboardInterrupt as e:  # raised by the task's own code: its failure, named as such
            message = f"task raised KeyboardInterrupt (not a cancel):\n{traceback.format_exc()}"
            outcome = self._fail(spec, cmd, ExecutionError.user("KeyboardInterrupt", message), e)
        except SystemExit as e:
            message = f"task called sys.exit({e.code!r}); a replica survives it, but the execution fails"
            outcome = self._fail(spec, cmd, ExecutionError.user("SystemExit", message), e)
        except CodeVersionMismatch as e:
            outcome = self._fail(spec, cmd, ExecutionError.system("CodeVersionMismatch", str(e)), e)
        except BaseException as e:  # _dispatch_execute catches task errors; this is a failure around it
            outcome = self._fail(spec, cmd, ExecutionError.system("SYSTEM", traceback.format_exc()), e)
        finally:
            self.cancel_armed = False  # again: a cancel may have landed just before the inner finally's reset
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            tempfile.tempdir = saved_tempdir
            self.executions += 1
        if outcome is None:
            try:  # pyflyte-execute wrote error.pb into its engine dir before uploading it: no storage round trip
                error = _engine_dir_error(exec_dir, files)
            except Exception as e:  # storage trouble must not take the replica down
                error = ExecutionError.system("SYSTEM", f"could not read the execution's error.pb: {e!r}")
            state = ReplicaExecutionState.FAILED if error else ReplicaExecutionState.SUCCEEDED
            outcome = ExecutionOutcome(spec.execution_id, state, error=error)
            outcome.exception = self.last_exception if error else None
            outcome.outputs_pb = None if error else outputs_pb
        outcome.duration_s = time.perf_counter() - started
        return outcome, functools.partial(self.dirs.retire, exec_dir)

    def _execute_in(
        self,
        spec: ExecutionSpec,
        exec_dir: str,
        files: EngineFiles,
        cmd: ExecutionCommand,
        raw: str,
        ckpt: Optional[str],
        prev: Optional[str],
    ) -> Optional[bytes]:
        """What `_execute_task` does, in a context built on the prepared dir (see replica/sandbox.py), its protobuf
        files in memory (replica/engine_files.py). With the spec's `return_outputs`, returns outputs.pb instead of
        writing it under the output prefix (if it is small)."""
        from flytekit.bin.entrypoint import _dispatch_execute
        from flytekit.tools.module_loader import load_object_from_module

        with execution_context(cmd, exec_dir, raw, ckpt, prev, spec.env) as ctx:
            try:
                cwd = os.getcwd()
            except FileNotFoundError:  # an earlier task moved into its own temp dir, which is gone now
                os.chdir(self._start_cwd)
                cwd = self._start_cwd
            if self._cwd_on_path != (cwd, len(sys.path)):  # as pyflyte-execute: the working dir is importable
                if all(os.path.realpath(p) != cwd for p in sys.path):
                    sys.path.append(cwd)
                self._cwd_on_path = (cwd, len(sys.path))
            resolver = load_object_from_module(cmd.resolver)
            loader_args = list(cmd.resolver_args)
            ctx.file_access.keep_outputs = spec.return_outputs
            with engine_files.in_memory(files):
                _dispatch_execute(
                    ctx, lambda: resolver.load_task(loader_args=loader_args), cmd.inputs, cmd.output_prefix
                )
            return ctx.file_access.kept_outputs

    def _execute_with_flytekit_setup(
        self, exec_dir: str, cmd: ExecutionCommand, raw: str, ckpt: Optional[str], prev: Optional[str]
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
        self, spec: ExecutionSpec, cmd: ExecutionCommand, error: ExecutionError, exc: BaseException
    ) -> ExecutionOutcome:
        try:
            write_error_document(cmd.output_prefix, error)
        except Exception as e:  # the outcome still reports the failure; storage trouble is added to it
            error = error.with_note(f"(and error.pb could not be written: {e!r})")
        return ExecutionOutcome(spec.execution_id, ReplicaExecutionState.FAILED, error=error, exception=exc)


def _engine_dir_error(exec_dir: str, files: Optional[EngineFiles]) -> Optional[ExecutionError]:
    """The error document an execution wrote into its engine dir, if any."""
    if files is None:  # flytekit's own setup made its flyte* sandbox inside the execution's dir
        return read_engine_dir_error(exec_dir)
    data = files.error_document()
    return None if data is None else ExecutionError.from_error_document(data)


RUNTIME = ReplicaRuntime()

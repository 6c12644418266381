"""Runs one task execution inside a warm replica: the pyflyte-execute path, minus the process start.

This is the single code path every actor execution takes (local runs, the connector's local backend and
pods): inputs.pb -> task -> outputs.pb or error.pb under the output prefix, exactly as pyflyte-execute.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from flytekitplugins_actor.replica.command import ExecutionCommand
from flytekitplugins_actor.replica.error import CANCELLED, ExecutionError, read_engine_dir_error, write_error_document
from flytekitplugins_actor.replica.protocol import ReplicaExecutionState

SYS_PATH_ENV = "FLYTE_ACTOR_SYS_PATH"
"""Extra sys.path entries an execution needs (set by local runs: the task module's root)."""


class CancelRequested(BaseException):
    """Raised into a running task by the replica's cancel signal, and only by it: the execution is cancelled.
    A KeyboardInterrupt the task raises itself is a failure like any other exception."""


class CodeVersionMismatch(RuntimeError):
    """A replica was handed code from another fast-registered distribution than the one it has imported."""


@dataclass
class ExecutionSpec:
    """What a replica needs to run one execution: the rendered container args and the execution's identity env."""

    execution_id: str
    args: List[str]
    env: Dict[str, str] = field(default_factory=dict)

    def parsed(self) -> ExecutionCommand:
        cached = self.__dict__.get("_parsed")
        if cached is None:
            cached = self.__dict__["_parsed"] = ExecutionCommand.parse(self.args)
        return cached


@dataclass
class ExecutionOutcome:
    """How an execution ended: SUCCEEDED, FAILED or CANCELLED, with the error (as error.pb says) unless it succeeded."""

    execution_id: str
    state: ReplicaExecutionState
    error: Optional[ExecutionError] = None
    duration_s: float = 0.0
    exception: Optional[BaseException] = None

    def to_wire(self) -> Dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "state": self.state.value,
            "error": None if self.error is None else self.error.to_wire(),
            "duration_s": self.duration_s,
        }


class ReplicaRuntime:
    """Process-wide state of one replica: the code version it has imported, the executions it ran."""

    def __init__(self) -> None:
        self.code_version: Optional[str] = None
        self.last_exception: Optional[BaseException] = None
        self.executions = 0

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
        """Runs one execution; returns its outcome and the cleanup to do once the outcome is reported.

        Never raises for anything the task does; only a CancelRequested (the replica's cancel) means cancelled."""
        from flytekit.bin.entrypoint import _execute_task, normalize_inputs
        from flytekit.core.context_manager import FlyteContextManager
        from flytekit.core.data_persistence import FileAccessProvider

        started = time.perf_counter()
        cmd = spec.parsed()
        saved_env = {k: os.environ.get(k) for k in spec.env}
        saved_tempdir = tempfile.tempdir
        scratch = tempfile.mkdtemp(prefix="actor-exec-")
        self.last_exception = None
        outcome: Optional[ExecutionOutcome] = None
        try:
            os.environ.update(spec.env)
            for path in spec.env.get(SYS_PATH_ENV, "").split(os.pathsep):  # a local driver's module roots
                if path and path not in sys.path:
                    sys.path.append(path)
            tempfile.tempdir = scratch
            self._activate_distribution(cmd)
            raw, ckpt, prev = normalize_inputs(cmd.raw_output_data_prefix, cmd.checkpoint_path, cmd.prev_checkpoint)
            # flytekit makes its working dirs under the current context's sandbox: point it into scratch
            ctx = FlyteContextManager.current_context()
            sandbox = ctx.new_builder().with_file_access(
                FileAccessProvider(local_sandbox_dir=scratch, raw_output_prefix=raw)
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
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            tempfile.tempdir = saved_tempdir
            self.executions += 1
        if outcome is None:
            try:  # pyflyte-execute wrote error.pb into its engine dir (in scratch) before uploading it: no round trip
                error = read_engine_dir_error(scratch)
            except Exception as e:  # storage trouble must not take the replica down
                error = ExecutionError.system("SYSTEM", f"could not read the execution's error.pb: {e!r}")
            state = ReplicaExecutionState.FAILED if error else ReplicaExecutionState.SUCCEEDED
            outcome = ExecutionOutcome(spec.execution_id, state, error=error)
            outcome.exception = self.last_exception if error else None
        outcome.duration_s = time.perf_counter() - started
        return outcome, lambda: shutil.rmtree(scratch, ignore_errors=True)

    def _fail(
        self, spec: ExecutionSpec, cmd: ExecutionCommand, error: ExecutionError, exc: BaseException
    ) -> ExecutionOutcome:
        try:
            write_error_document(cmd.output_prefix, error)
        except Exception as e:  # the outcome still reports the failure; storage trouble is added to it
            error = error.with_note(f"(and error.pb could not be written: {e!r})")
        return ExecutionOutcome(spec.execution_id, ReplicaExecutionState.FAILED, error=error, exception=exc)


RUNTIME = ReplicaRuntime()

"""The one value for why an execution failed, and its error document (error.pb), as pyflyte-execute writes it.

`ExecutionError` mirrors flyteidl's `ContainerError` (code, message, kind, origin). It travels on the replica
protocol (`to_wire`/`from_wire`), is what a pool's `Execution.error` holds, and is what error.pb says.
"""

from __future__ import annotations

import enum
import glob
import os
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional


class ErrorOrigin(enum.Enum):
    """Whose fault a failure is (flyteidl's ExecutionError.ErrorKind): the task's code, or the system around it."""

    USER = "USER"
    SYSTEM = "SYSTEM"


@dataclass(frozen=True)
class ExecutionError:
    """Why an execution failed. `recoverable` means a retry may succeed (propeller's RETRYABLE_FAILED)."""

    code: str
    message: str
    origin: ErrorOrigin
    recoverable: bool

    def __post_init__(self) -> None:
        if not isinstance(self.origin, ErrorOrigin):
            raise TypeError(f"origin must be an ErrorOrigin, got {self.origin!r}")

    @classmethod
    def user(cls, code: str, message: str, recoverable: bool = False) -> "ExecutionError":
        return cls(code, message, ErrorOrigin.USER, recoverable)

    @classmethod
    def system(cls, code: str, message: str, recoverable: bool = True) -> "ExecutionError":
        return cls(code, message, ErrorOrigin.SYSTEM, recoverable)

    def with_note(self, note: str) -> "ExecutionError":
        """The same error with a line added to its message (e.g. what went wrong while reporting it)."""
        return replace(self, message=f"{self.message}\n{note}")

    # ---- replica protocol ----
    def to_wire(self) -> Dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "origin": self.origin.value,
            "recoverable": self.recoverable,
        }

    @classmethod
    def from_wire(cls, wire: Any) -> "ExecutionError":
        """Reads `to_wire`'s dict; raises ValueError naming the field that is missing or wrong."""
        if not isinstance(wire, dict):
            raise ValueError(f"an execution error must be an object, got {wire!r}")
        code, message, origin, recoverable = (wire.get(k) for k in ("code", "message", "origin", "recoverable"))
        if not isinstance(code, str) or not isinstance(message, str):
            raise ValueError(f"an execution error needs string code and message, got {wire!r}")
        if origin not in ErrorOrigin._value2member_map_:
            raise ValueError(f"execution error origin {origin!r} is not one of {[o.value for o in ErrorOrigin]}")
        if not isinstance(recoverable, bool):
            raise ValueError(f"execution error recoverable must be a bool, got {recoverable!r}")
        return cls(code, message, ErrorOrigin(origin), recoverable)

    # ---- error document (error.pb) ----
    def to_error_document(self):
        """flytekit's ErrorDocument model of this error."""
        from flytekit.models.core import errors as error_models
        from flytekit.models.core import execution as execution_models

        kind = error_models.ContainerError.Kind
        origin = execution_models.ExecutionError.ErrorKind
        return error_models.ErrorDocument(
            error_models.ContainerError(
                code=self.code,
                message=self.message,
                kind=kind.RECOVERABLE if self.recoverable else kind.NON_RECOVERABLE,
                origin=origin.USER if self.origin is ErrorOrigin.USER else origin.SYSTEM,
            )
        )

    @classmethod
    def from_error_document(cls, data: bytes) -> "ExecutionError":
        """Parses a serialized flyteidl ErrorDocument (the bytes of an error.pb)."""
        from flyteidl.core import errors_pb2, execution_pb2

        doc = errors_pb2.ErrorDocument()
        doc.ParseFromString(data)
        e = doc.error
        origin = ErrorOrigin.USER if e.origin == execution_pb2.ExecutionError.USER else ErrorOrigin.SYSTEM
        return cls(e.code, e.message, origin, e.kind == errors_pb2.ContainerError.RECOVERABLE)


def _join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


def write_error_document(output_prefix: str, error: ExecutionError) -> None:
    """Writes `<output_prefix>/error.pb` the way pyflyte-execute does (for failures around `_dispatch_execute`)."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.utils import write_proto_to_file

    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, "error.pb")
        write_proto_to_file(error.to_error_document().to_flyte_idl(), local)
        FlyteContextManager.current_context().file_access.put_data(local, _join(output_prefix, "error.pb"))


def read_error_document(output_prefix: str) -> Optional[ExecutionError]:
    """The error.pb under an output prefix, or None when there is none."""
    from flytekit.core.context_manager import FlyteContextManager

    path = _join(output_prefix, "error.pb")
    fa = FlyteContextManager.current_context().file_access
    if fa.is_remote(path):
        if not fa.exists(path):
            return None
        with tempfile.TemporaryDirectory() as d:
            fa.get_data(path, os.path.join(d, "error.pb"))
            with open(os.path.join(d, "error.pb"), "rb") as f:
                data = f.read()
    else:
        local = path[len("file://") :] if path.startswith("file://") else path
        try:
            with open(local, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
    return ExecutionError.from_error_document(data)


def read_engine_dir_error(scratch: str) -> Optional[ExecutionError]:
    """The error document an execution wrote into its local engine dir under `scratch` (before uploading it)."""
    for path in glob.glob(os.path.join(scratch, "flyte*", "local_flytekit", "engine_dir", "error*.pb")):
        with open(path, "rb") as f:
            return ExecutionError.from_error_document(f.read())
    return None


CANCELLED = ExecutionError.user("ABORTED", "execution was cancelled")
"""What a cancelled execution reports: the user (or propeller on their behalf) aborted it."""

"""The protobuf files around one execution, kept in memory: its inputs.pb and its engine dir's outputs.pb, error*.pb
and futures.pb never touch the disk in a replica.

flytekit's `_dispatch_execute` runs unchanged (its error documents, IgnoreOutputs, offloading, decks): it only reads
and writes these files through `flytekit.core.utils`, which a replica's entrypoint sees with the two protobuf file
functions served from the running execution's `EngineFiles`. The files still reach storage (or the reply) through the
execution's file access `put_data`, as with pyflyte-execute; a remote prefix gets them from real files, as before.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, Optional

from flytekitplugins_actor.replica.protocol import INLINE_LIMIT_BYTES

OUTPUTS = "outputs.pb"


class EngineFiles:
    """The inputs an execution reads and the files its engine dir gets, by path: one execution's, while it runs."""

    def __init__(self, engine_dir: str, inputs_path: Optional[str] = None, inputs_pb: Optional[bytes] = None) -> None:
        self.engine_dir = engine_dir
        self._inputs: Dict[str, bytes] = {} if inputs_path is None or inputs_pb is None else {inputs_path: inputs_pb}
        self.written: Dict[str, bytes] = {}
        """The engine dir's files by name, as `_dispatch_execute` wrote them."""

    def alias(self, source: str, path: str) -> bool:
        """`get_data(source, path)` of inputs held here: `path` reads the same bytes; False if `source` is not held."""
        data = self._inputs.get(source)
        if data is None:
            return False
        self._inputs[path] = data
        return True

    def read(self, path: str) -> Optional[bytes]:
        return self._inputs.get(path)

    def write(self, path: str, data: bytes) -> bool:
        """Keeps a file written into the engine dir; False for any other path (it goes to disk)."""
        directory, name = os.path.split(path)
        if directory != self.engine_dir:
            return False
        self.written[name] = data
        return True

    def is_engine_dir(self, path: Any) -> bool:
        return str(path) == self.engine_dir

    def small_outputs(self) -> Optional[bytes]:
        """outputs.pb, when it is all the execution wrote and is small enough to travel in the reply."""
        data = self.written.get(OUTPUTS)
        if data is None or len(self.written) != 1 or len(data) > INLINE_LIMIT_BYTES:
            return None  # error.pb, futures.pb, offloaded literals, or big outputs: storage, as usual
        return data

    def error_document(self) -> Optional[bytes]:
        for name, data in self.written.items():
            if name.startswith("error") and name.endswith(".pb"):
                return data
        return None

    def materialize(self) -> None:
        """Writes the kept files into the real engine dir (for an upload that needs files)."""
        os.makedirs(self.engine_dir, exist_ok=True)
        for name, data in self.written.items():
            with open(os.path.join(self.engine_dir, name), "wb") as f:
                f.write(data)


_CURRENT: Optional[EngineFiles] = None
"""The running execution's files: a replica runs one execution at a time, and `_dispatch_execute` on its main thread."""


def current() -> Optional[EngineFiles]:
    return _CURRENT


@contextlib.contextmanager
def in_memory(files: EngineFiles) -> Iterator[EngineFiles]:
    global _CURRENT
    _CURRENT = files
    try:
        yield files
    finally:
        _CURRENT = None


class _UtilsWithEngineFiles:
    """`flytekit.core.utils` as the entrypoint sees it, with its protobuf file functions served from `_CURRENT`."""

    def __init__(self, utils: Any) -> None:
        self._utils = utils

    def __getattr__(self, name: str) -> Any:
        return getattr(self._utils, name)

    def load_proto_from_file(self, pb2_type, path):
        data = None if _CURRENT is None else _CURRENT.read(str(path))
        if data is None:
            return self._utils.load_proto_from_file(pb2_type, path)
        out = pb2_type()
        out.ParseFromString(data)
        return out

    def write_proto_to_file(self, proto, path):
        if _CURRENT is None or not _CURRENT.write(str(path), proto.SerializeToString()):
            self._utils.write_proto_to_file(proto, path)


def keep_engine_files_in_memory() -> None:
    """In a replica (only there), the entrypoint's protobuf files go through `EngineFiles` (see the module doc)."""
    from flytekit.bin import entrypoint

    if not isinstance(entrypoint.utils, _UtilsWithEngineFiles):
        entrypoint.utils = _UtilsWithEngineFiles(entrypoint.utils)

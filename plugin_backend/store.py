"""What the connector keeps in blob storage under an execution's output prefix, so a restart loses nothing.

    <prefix>/_actor.request.json   written by create: the template, identity and pool key (enough to re-run)
    <prefix>/_actor.started        written just before a replica is handed the execution (single executions)
    <prefix>/_actor.aborted        written by delete
    <prefix>/outputs.pb|error.pb   the result, as pyflyte-execute writes it
    <prefix>/items/<i>/...         a map item's inputs.pb and result (its own output prefix)

Local paths (and file://) take a direct file system path; anything else goes through flytekit's fsspec file access.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Optional, Set

REQUEST = "_actor.request.json"
STARTED = "_actor.started"
ABORTED = "_actor.aborted"
INPUTS = "_actor.inputs.pb"  # a pod template's rendered {{.input}} (propeller renders only container args)
ITEMS = "items"


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *parts])


def local_path(path: str) -> Optional[str]:
    """The file system path of a local URI, or None for remote storage."""
    if path.startswith("file://"):
        return path[len("file://") :]
    return None if "://" in path else path


def is_local(path: str) -> bool:
    return local_path(path) is not None


def _fs(path: str):
    from flytekit.core.context_manager import FlyteContextManager

    return FlyteContextManager.current_context().file_access.get_filesystem_for_path(path)


def read_bytes(path: str) -> Optional[bytes]:
    local = local_path(path)
    try:
        if local is not None:
            with open(local, "rb") as f:
                return f.read()
        return _fs(path).cat_file(path)
    except FileNotFoundError:
        return None


def write_bytes(path: str, data: bytes, atomic: bool = False, make_dirs: bool = True) -> None:
    """Writes a whole object. Blob stores are atomic per object; locally, atomic=True writes a temp file and
    renames it (for files another process may read while they are written), and make_dirs=False raises
    FileNotFoundError instead of creating a missing directory."""
    local = local_path(path)
    if local is not None:
        parent = os.path.dirname(local) or "."
        try:
            f = open(f"{local}.tmp{os.getpid()}" if atomic else local, "wb")
        except FileNotFoundError:
            if not make_dirs:
                raise
            os.makedirs(parent, exist_ok=True)
            f = open(f"{local}.tmp{os.getpid()}" if atomic else local, "wb")
        with f:
            f.write(data)
        if atomic:
            os.replace(f.name, local)
        return
    _fs(path).pipe_file(path, data)


def exists(path: str) -> bool:
    local = local_path(path)
    if local is not None:
        return os.path.exists(local)
    return _fs(path).exists(path)


class ExecutionRecord:
    """The durable record of one execution under its output prefix."""

    def __init__(self, output_prefix: str):
        self.prefix = output_prefix

    def path(self, *parts: str) -> str:
        return join(self.prefix, *parts)

    # ---- request ----
    def create_request(self, request: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Writes the request record unless one exists; returns the existing one (a create repeated after a
        restart) or None. Locally one exclusive open does both; blob stores read, then write."""
        path = self.path(REQUEST)
        data = json.dumps(request, separators=(",", ":")).encode()
        local = local_path(path)
        if local is None:
            existing = self.read_request()
            if existing is None:
                write_bytes(path, data)
            return existing
        for _ in range(2):
            try:
                with open(local, "xb") as f:
                    f.write(data)
                return None
            except FileExistsError:
                return self.read_request()
            except FileNotFoundError:
                os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        raise FileNotFoundError(local)

    def read_request(self) -> Optional[Dict[str, Any]]:
        """The request record, or None if there is none (or only a torn one: the connector died writing it,
        before it answered CreateTask)."""
        data = read_bytes(self.path(REQUEST))
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    def request_of(self, execution_id: str) -> Optional[Dict[str, Any]]:
        """The request record if it is this execution's, else None: a prefix holding another execution's record (or
        none) is never read, written or acted on for this one."""
        request = self.read_request()
        return request if request is not None and request.get("execution_id") == execution_id else None

    # ---- markers ----
    def mark(self, marker: str, detail: str = "", make_dirs: bool = True) -> None:
        write_bytes(self.path(marker), detail.encode(), make_dirs=make_dirs)

    def marker(self, marker: str) -> Optional[str]:
        data = read_bytes(self.path(marker))
        return None if data is None else data.decode(errors="replace")

    # ---- results ----
    def has_outputs(self) -> bool:
        return exists(self.path("outputs.pb"))

    def has_error(self) -> bool:
        return exists(self.path("error.pb"))

    def item_prefix(self, i: int) -> str:
        return self.path(ITEMS, str(i))

    def finished_items(self, n: int) -> Dict[int, bool]:
        """{item index: failed} for every item with a result in storage (True: its error.pb, False: outputs.pb)."""
        done: Dict[int, bool] = {}
        root = self.path(ITEMS)
        local = local_path(root)
        if local is not None:
            try:
                names: Iterable[str] = os.listdir(local)
            except FileNotFoundError:
                return done
            for name in names:
                if not name.isdigit() or int(name) >= n:
                    continue
                d = os.path.join(local, name)
                if os.path.exists(os.path.join(d, "error.pb")):
                    done[int(name)] = True
                elif os.path.exists(os.path.join(d, "outputs.pb")):
                    done[int(name)] = False
            return done
        fs = _fs(root)
        try:
            files: Set[str] = set(fs.find(root))
        except FileNotFoundError:
            return done
        base = root.split("://", 1)[-1].rstrip("/")
        for f in files:
            rel = f.split("://", 1)[-1][len(base) + 1 :].split("/")
            if len(rel) == 2 and rel[0].isdigit() and int(rel[0]) < n and rel[1] in ("outputs.pb", "error.pb"):
                done[int(rel[0])] = done.get(int(rel[0]), False) or rel[1] == "error.pb"
        return done

"""Local replicas' logs: streamed to the driver's terminal with the replica's name, bounded, kept for a few runs.

Each local replica writes its stdout and stderr to `<temp dir>/flyte-actor-logs/<driver pid>/<replica>.log`. The
driver follows those files and writes every new line of task output to its own stderr as ``<replica> | <line>``
(as `docker compose` does), so `print` debugging works in local runs; the worker's own bookkeeping lines stay in
the file. A log that grows past `MAX_LOG_BYTES` is rotated once (`<replica>.log.1`), so a chatty task cannot fill
the disk, and only the last `KEEP_RUNS` drivers' log dirs are kept.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from typing import IO, Dict, Optional

STREAM_ENV = "FLYTE_ACTOR_STREAM_LOGS"
"""Set to 0 to keep replica output in the log files only."""
MAX_LOG_BYTES = 8 * 1024 * 1024
KEEP_RUNS = 5
POLL_S = 0.1
_BOOKKEEPING = "[actor-replica "


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_runs(parent: str, prefix: str, keep: int, own: str) -> None:
    """Removes `prefix<pid>` dirs under `parent` of drivers that are gone, beyond the `keep` newest (never `own`)."""
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    stale = []
    for e in entries:
        pid = e.name[len(prefix) :]
        if e.path == own or not pid.isdigit() or pid_alive(int(pid)):
            continue
        try:
            stale.append((e.stat(follow_symlinks=False).st_mtime, e.path))
        except OSError:
            continue
    stale.sort(reverse=True)
    for _, path in stale[keep:]:
        shutil.rmtree(path, ignore_errors=True)


class _Tail:
    def __init__(self, path: str, name: str) -> None:
        self.path, self.name = path, name
        self.offset = 0
        self.partial = b""


class ReplicaOutput:
    """Follows every replica log in one dir; one thread for all of them, stopped (after a last read) by `stop`."""

    def __init__(self, log_dir: str, stream: Optional[IO[str]] = None, max_bytes: int = MAX_LOG_BYTES) -> None:
        self.log_dir = log_dir
        self.echo = os.environ.get(STREAM_ENV, "1") != "0"
        self._stream = stream
        self.max_bytes = max_bytes
        self._tails: Dict[str, _Tail] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._follow, name="actor-replica-output", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stops following, after reading what the replicas wrote until now."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self.drain()

    def drain(self, replica: Optional[str] = None) -> None:
        """Echoes what one replica (or every replica) has written since the last read."""
        with self._lock:
            if replica is None:
                self._discover()
                tails = list(self._tails.values())
            else:
                tail = self._tails.get(replica) or self._add(replica)
                tails = [tail] if tail is not None else []
            for tail in tails:
                self._read(tail)

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.drain()
            except Exception:  # a log that vanished or an unwritable terminal must not end the driver's run
                pass

    def _discover(self) -> None:
        try:
            names = os.listdir(self.log_dir)
        except OSError:
            return
        for name in names:
            if name.endswith(".log") and name[:-4] not in self._tails:
                self._add(name[:-4])

    def _add(self, replica: str) -> Optional[_Tail]:
        path = os.path.join(self.log_dir, f"{replica}.log")
        if not os.path.exists(path):
            return None
        tail = self._tails[replica] = _Tail(path, replica)
        return tail

    def _read(self, tail: _Tail) -> None:
        try:
            size = os.stat(tail.path).st_size
        except OSError:
            return
        if size < tail.offset:  # truncated under us
            tail.offset, tail.partial = 0, b""
        if size > tail.offset:
            with open(tail.path, "rb") as f:
                f.seek(tail.offset)
                data = f.read(size - tail.offset)
            tail.offset += len(data)
            lines = (tail.partial + data).split(b"\n")
            tail.partial = lines.pop()
            if self.echo:
                self._write(tail.name, lines)
        if tail.offset > self.max_bytes:
            self._rotate(tail)

    def _write(self, name: str, lines) -> None:
        out = self._stream or sys.stderr
        text = "".join(
            f"{name} | {line.decode(errors='replace').rstrip()}\n"
            for line in lines
            if not line.startswith(_BOOKKEEPING.encode())
        )
        if text:
            out.write(text)
            out.flush()

    def _rotate(self, tail: _Tail) -> None:
        """Keeps the log bounded: its content moves to `<log>.1` (replacing the previous one), the log restarts empty.
        The replica appends (O_APPEND), so its next write lands at the start of the emptied file."""
        try:
            shutil.copyfile(tail.path, tail.path + ".1")
            os.truncate(tail.path, 0)
        except OSError:
            return
        tail.offset = 0

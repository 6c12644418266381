"""Per-execution directories and flytekit context for a warm replica, prepared off the hot path.

`pyflyte-execute` makes a fresh sandbox per process: a `flyte*` temp dir with `local_flytekit/`, a random user
workspace, an engine dir and, for the outputs, one asyncio hand-off per file copy. A replica runs thousands of
executions, so it keeps that work off each execution's critical path:

- execution dirs are prepared ahead (when the replica is idle) and recycled: emptied and reused, not removed and
  made again; the execution that used one never sees it again (it is moved away the moment the execution ends,
  whatever the timing);
- local-to-local copies of inputs and outputs are plain file copies, without the async round trip; remote paths
  (s3://, gs://, ...) go through flytekit's own file access unchanged;
- configuration flytekit would re-read from env and config files per process is read once per replica.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import datetime
import itertools
import os
import pathlib
import shutil
import tempfile
import threading
import traceback
from typing import TYPE_CHECKING, Dict, List, Optional

from flytekitplugins_actor.replica import engine_files

if TYPE_CHECKING:
    from flytekitplugins_actor.replica.command import ExecutionCommand  # noqa: F401

READY_DIRS = 4
"""Execution dirs kept prepared while the replica is idle."""

# one execution dir's skeleton, relative to it: the task's private temp dir is the execution dir itself
SANDBOX = "local_flytekit"
WORKSPACE = os.path.join(SANDBOX, "workspace")
ENGINE_DIR = os.path.join(SANDBOX, "engine_dir")
_SKELETON = (SANDBOX, WORKSPACE, ENGINE_DIR)


class ExecutionDirs:
    """Prepared execution dirs of one replica, under one root removed completely when the replica stops."""

    def __init__(self, parent: Optional[str] = None, ready: int = READY_DIRS) -> None:
        self._parent = parent
        self._root: Optional[str] = None
        self._ready: List[str] = []
        self._retired: List[str] = []
        self._names = itertools.count()
        self._lock = threading.Lock()
        self.ready_target = ready

    @property
    def root(self) -> str:
        if self._root is None:
            self._root = tempfile.mkdtemp(prefix=f"flyte-actor-replica-{os.getpid()}-", dir=self._parent)
        return self._root

    def state_dir(self) -> str:
        """A dir for the whole life of this replica (see `flytekitplugins_actor.replica_dir`)."""
        path = os.path.join(self.root, "replica")
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def take(self) -> str:
        """A prepared, empty execution dir (made now only when none is ready)."""
        with self._lock:
            if self._ready:
                return self._ready.pop()
        return self._make()

    def retire(self, path: str) -> None:
        """Moves an execution's dir out of its path at once (one rename); its contents go when the replica is idle."""
        retired = os.path.join(self.root, f"retired-{next(self._names)}")
        try:
            os.rename(path, retired)
        except OSError:  # the task removed or replaced it: nothing to recycle
            shutil.rmtree(path, ignore_errors=True)
            return
        with self._lock:
            self._retired.append(retired)

    def tidy_one(self) -> None:
        """Off the hot path: empties one retired dir and keeps it prepared (or removes it if enough are ready)."""
        with self._lock:
            path = self._retired.pop() if self._retired else None
            keep = path is not None and len(self._ready) < self.ready_target
        if path is None:
            self.prepare()
            return
        if keep and _empty_keeping_skeleton(path):  # its name is new (given when it was retired): no rename needed
            with self._lock:
                self._ready.append(path)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def prepare(self) -> None:
        """Off the hot path: makes execution dirs until `ready_target` are ready."""
        while True:
            with self._lock:
                if len(self._ready) >= self.ready_target:
                    return
            path = self._make()
            with self._lock:
                self._ready.append(path)

    def close(self) -> None:
        """Removes every dir of this replica (at its exit)."""
        with self._lock:
            root, self._root, self._ready, self._retired = self._root, None, [], []
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def _make(self) -> str:
        path = os.path.join(self.root, f"ready-{next(self._names)}")
        os.mkdir(path, 0o700)
        for d in _SKELETON:
            os.mkdir(os.path.join(path, d))
        return path


def _empty_keeping_skeleton(path: str) -> bool:
    """Removes everything an execution left in its dir but the skeleton dirs; False if that failed."""
    try:
        for rel in ("", *_SKELETON):
            d = os.path.join(path, rel)
            with os.scandir(d) as entries:
                for entry in entries:
                    if os.path.join(rel, entry.name) in _SKELETON:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- flytekit context
def _fast_file_access_class():
    from flytekit.core.data_persistence import FileAccessProvider

    class LocalFastFileAccess(FileAccessProvider):
        """flytekit's file access, with local-to-local copies done in place instead of through its event loop."""

        def get_data(self, remote_path: str, local_path: str, is_multipart: bool = False, **kwargs):
            files = engine_files.current()
            if files is not None and not kwargs and files.alias(str(remote_path), str(local_path)):
                return  # inputs that came with the request: read from memory
            src = _local_path(remote_path)
            if src is None or kwargs or not os.path.exists(src):  # remote, or flytekit's own error for a missing one
                return super().get_data(remote_path, local_path, is_multipart=is_multipart, **kwargs)
            os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
            _copy(src, local_path)

        keep_outputs = False
        """Set per execution: keep a small outputs.pb (returned in the reply) instead of writing it to the prefix."""
        kept_outputs: Optional[bytes] = None

        def put_data(self, local_path, remote_path: str, is_multipart: bool = False, **kwargs):
            dest = _local_path(remote_path)
            files = engine_files.current()
            if files is not None and is_multipart and not kwargs and files.is_engine_dir(local_path):
                if os.listdir(files.engine_dir):  # the task wrote into the engine dir itself: upload it all, as files
                    files.materialize()
                elif self.keep_outputs and (kept := files.small_outputs()) is not None:
                    self.kept_outputs = kept
                    return remote_path
                elif dest is not None:
                    os.makedirs(dest, exist_ok=True)
                    for name, data in files.written.items():
                        _write_new(os.path.join(dest, name), data)
                    return remote_path
                else:  # remote storage: flytekit's own upload, from real files
                    files.materialize()
            if dest is None or kwargs:
                return super().put_data(local_path, remote_path, is_multipart=is_multipart, **kwargs)
            src = str(local_path)
            if os.path.isdir(src):
                os.makedirs(dest, exist_ok=True)
                with os.scandir(src) as entries:
                    for entry in entries:
                        _copy(entry.path, os.path.join(dest, entry.name))
            else:
                os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
                _copy(src, dest)
            return remote_path

    return LocalFastFileAccess


def _local_path(path: str) -> Optional[str]:
    """The filesystem path of a local path or file:// URL; None for anything remote."""
    path = str(path)
    if path.startswith("file://"):
        return path[len("file://") :]
    return None if "://" in path else path


def _write_new(path: str, data: bytes) -> None:
    """Writes a new file at `path`, replacing (never writing into) one already there: it may be another file's link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # e.g. a retry into the same output prefix
        os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _copy(src: str, dest: str) -> None:
    """Copies a file by hard link where it can (one metadata write instead of a new file's data): neither side
    ever writes a file in place, so a second name for the same bytes is a copy."""
    if os.path.isdir(src):
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return
    try:
        try:
            os.link(src, dest)
        except FileExistsError:  # e.g. a retry into the same output prefix: replace, as a copy would
            os.unlink(dest)
            os.link(src, dest)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, dest)


class _Config:
    """What flytekit reads from env and config files per process: read once per replica. Also the few objects an
    execution's context needs that depend only on its task and workflow execution, kept for the next executions of
    the same ones (a map's items, a local run's calls)."""

    KEEP = 8
    """Per kind, how many of those objects are kept (the most recently used)."""

    def __init__(self) -> None:
        from flytekit.configuration import DataConfig, ImageConfig, StatsConfig

        self.data = DataConfig.auto()
        self.stats = StatsConfig.auto()
        self.image = ImageConfig.auto()
        self.file_access_class = _fast_file_access_class()
        self._kept: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()

    def kept(self, key: tuple, make):
        """The object made by `make()` for `key`, made once while it stays among the KEEP most recent of its kind."""
        value = self._kept.get(key)
        if value is None:
            value = self._kept[key] = make()
            kind = [k for k in self._kept if k[0] == key[0]]
            if len(kind) > self.KEEP:
                del self._kept[kind[0]]
        else:
            self._kept.move_to_end(key)
        return value

    def file_access(self, exec_dir: str, raw: str, metadata: Dict[str, str]):
        """The execution's file access: a copy of one made for the same raw prefix and execution metadata, pointed at
        the execution's sandbox (the only thing flytekit's FileAccessProvider derives from the execution dir)."""
        base = self.kept(
            ("file_access", raw, tuple(sorted(metadata.items()))),
            lambda: self.file_access_class(
                local_sandbox_dir=exec_dir, raw_output_prefix=raw, data_config=self.data, execution_metadata=metadata
            ),
        )
        file_access = copy.copy(base)
        file_access._local_sandbox_dir = pathlib.Path(exec_dir, SANDBOX)
        return file_access


_CONFIG: Optional[_Config] = None
_ORIGIN = traceback.FrameSummary(__file__, 0, "execution_context", lookup_line=False)


def _config() -> _Config:
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = _Config()
    return _CONFIG


@contextlib.contextmanager
def execution_context(
    cmd: "ExecutionCommand",
    exec_dir: str,
    raw: str,
    ckpt: Optional[str],
    prev: Optional[str],
    identity: Optional[Dict[str, str]] = None,
):
    """The context `pyflyte-execute` builds (flytekit's `setup_execution`), on a prepared dir, from the identity env
    (`identity`: the execution's own env, already applied to os.environ; os.environ for the names it lacks).

    Same identity, parameters, checkpoint, serialization settings and sandbox layout (local_flytekit/, engine_dir);
    what differs is only that nothing here is created, read from config or handed to an event loop per execution.
    """
    from flytekit import __version__ as api_version
    from flytekit.configuration import SERIALIZED_CONTEXT_ENV_VAR, FastSerializationSettings, SerializationSettings
    from flytekit.core.checkpointer import SyncCheckpoint
    from flytekit.core.context_manager import (
        ExecutionParameters,
        ExecutionState,
        FlyteContextManager,
        OutputMetadataTracker,
    )
    from flytekit.interfaces.stats.taggable import get_stats
    from flytekit.loggers import user_space_logger
    from flytekit.models.core import identifier as _identifier

    cfg = _config()
    env = os.environ
    identity = identity or {}

    def one_of(*names: str) -> str:
        # the execution's identity env first (a plain dict: cheaper than os.environ, and equal to it for these names)
        for n in names:
            value = identity.get(n)
            if value is None:
                value = env.get(n)
            if value is not None:
                return value
        return ""

    exe_project, exe_domain = (
        one_of("FLYTE_INTERNAL_EXECUTION_PROJECT", "_F_PRJ"),
        one_of("FLYTE_INTERNAL_EXECUTION_DOMAIN", "_F_DM"),
    )
    exe_name = one_of("FLYTE_INTERNAL_EXECUTION_ID", "_F_NM")
    exe_wf, exe_lp = (
        one_of("FLYTE_INTERNAL_EXECUTION_WORKFLOW", "_F_WF"),
        one_of("FLYTE_INTERNAL_EXECUTION_LAUNCHPLAN", "_F_LP"),
    )
    tk_project, tk_domain = (
        one_of("FLYTE_INTERNAL_TASK_PROJECT", "_F_TK_PRJ"),
        one_of("FLYTE_INTERNAL_TASK_DOMAIN", "_F_TK_DM"),
    )
    tk_name, tk_version = (
        one_of("FLYTE_INTERNAL_TASK_NAME", "_F_TK_NM"),
        one_of("FLYTE_INTERNAL_TASK_VERSION", "_F_TK_V"),
    )

    sandbox = os.path.join(exec_dir, SANDBOX)
    params = ExecutionParameters(
        execution_id=_identifier.WorkflowExecutionIdentifier(project=exe_project, domain=exe_domain, name=exe_name),
        execution_date=datetime.datetime.now(datetime.timezone.utc),
        stats=cfg.kept(
            ("stats", tk_project, tk_domain, tk_name, exe_project, exe_domain, exe_wf, exe_lp),
            lambda: get_stats(
                cfg=cfg.stats,
                prefix=f"{tk_project}.{tk_domain}.{tk_name}.user_stats",
                tags={
                    "exec_project": exe_project,
                    "exec_domain": exe_domain,
                    "exec_workflow": exe_wf,
                    "exec_launchplan": exe_lp,
                    "api_version": api_version,
                },
            ),
        ),
        logging=user_space_logger,
        tmp_dir=os.path.join(exec_dir, WORKSPACE),
        raw_output_prefix=raw,
        output_metadata_prefix=cmd.output_prefix,
        checkpoint=SyncCheckpoint(checkpoint_dest=ckpt, checkpoint_src=prev) if ckpt is not None else None,
        task_id=_identifier.Identifier(_identifier.ResourceType.TASK, tk_project, tk_domain, tk_name, tk_version),
    )
    file_access = cfg.file_access(
        exec_dir,
        raw,
        {
            "flyte-execution-project": exe_project,
            "flyte-execution-domain": exe_domain,
            "flyte-execution-launchplan": exe_lp,
            "flyte-execution-workflow": exe_wf,
            "flyte-execution-name": exe_name,
        },
    )
    state = ExecutionState(
        working_dir=sandbox,
        mode=ExecutionState.Mode.TASK_EXECUTION,
        engine_dir=os.path.join(exec_dir, ENGINE_DIR),
        user_space_params=params,
    )
    transported = env.get(SERIALIZED_CONTEXT_ENV_VAR, "")
    settings = SerializationSettings.from_transport(transported) if transported else SerializationSettings(cfg.image)
    ssb = settings.new_builder()
    ssb.project = ssb.project or exe_project
    ssb.domain = ssb.domain or exe_domain
    ssb.version = tk_version
    if cmd.distribution:
        ssb.fast_serialization_settings = FastSerializationSettings(
            enabled=True, destination_dir=cmd.dest_dir, distribution_location=cmd.distribution
        )
    ctx = FlyteContextManager.current_context()
    builder = (
        ctx.new_builder()
        .with_file_access(file_access)
        .with_execution_state(state)
        .with_output_metadata_tracker(OutputMetadataTracker())
        .with_serialization_settings(ssb.build())
    )
    # push/pop as FlyteContextManager.with_context does, minus its stack inspection (source lines read per call)
    depth = FlyteContextManager.size()
    exec_ctx = FlyteContextManager.push_context(builder.build(), _ORIGIN)
    try:
        yield exec_ctx
    finally:
        while FlyteContextManager.size() > depth:
            FlyteContextManager.pop_context()


def stage_inputs(exec_dir: str, inputs_pb: bytes) -> str:
    """Writes inputs that came with the request into the execution's sandbox; returns the path to read them from."""
    path = os.path.join(exec_dir, SANDBOX, "inline_inputs.pb")
    with open(path, "wb") as f:
        f.write(inputs_pb)
    return path


def fast_path_applies() -> bool:
    """False when flytekit's setup does something per process this module does not (runtime pip installs)."""
    from flytekit.core.constants import RUNTIME_PACKAGES_ENV_NAME

    return not os.environ.get(RUNTIME_PACKAGES_ENV_NAME)


# ---------------------------------------------------------------- serialization
def _collection_to_flyte_idl(self):
    """flytekit's `LiteralCollection.to_flyte_idl`, one item at a time: its list of all items' protobufs first
    doubled a big output's peak memory (1M floats: +740 MB); this builds the same message, and sooner."""
    from flyteidl.core import literals_pb2

    pb = literals_pb2.LiteralCollection()
    append = pb.literals.append  # copies each item in: its temporary message is freed at once
    for lit in self.literals:
        append(lit.to_flyte_idl())
    return pb


def _map_to_flyte_idl(self):
    """flytekit's `LiteralMap.to_flyte_idl`, one entry at a time (see `_collection_to_flyte_idl`)."""
    from flyteidl.core import literals_pb2

    pb = literals_pb2.LiteralMap()
    for name, lit in self.literals.items():
        pb.literals[name].CopyFrom(lit.to_flyte_idl())
    return pb


def use_frugal_serialization() -> None:
    """In a replica (only there: it serializes every output), outputs are serialized item by item."""
    from flytekit.models.literals import LiteralCollection, LiteralMap

    LiteralCollection.to_flyte_idl = _collection_to_flyte_idl
    LiteralMap.to_flyte_idl = _map_to_flyte_idl


# ---------------------------------------------------------------- flytekit's async hand-offs
class _InlineRunner:
    """Runs flytekit's `run_sync` coroutines on this thread's own event loop instead of handing each to a loop
    thread and waiting for it: two thread hand-offs less per coroutine (each execution converts its inputs and
    outputs through one). A `run_sync` nested inside such a coroutine goes the usual way, on a loop thread."""

    def __init__(self, fallback) -> None:
        import asyncio

        self._asyncio = asyncio
        self._loop = asyncio.new_event_loop()
        self._fallback = fallback

    def run(self, coro):
        if self._loop.is_running():
            return self._fallback.run(coro)
        try:
            return self._loop.run_until_complete(coro)
        except BaseException:
            if self._asyncio.all_tasks(self._loop):  # interrupted (a cancel): never resume its leftovers later
                self._loop = self._asyncio.new_event_loop()
            raise


def run_coroutines_inline() -> None:
    """In a replica's executing thread (only there), flytekit's coroutines run inline (see `_InlineRunner`)."""
    from flytekit.utils.asyn import _TaskRunner, loop_manager

    key = threading.current_thread().name + f"PID:{os.getpid()}"  # how flytekit keys its runner per thread
    runners = getattr(loop_manager, "_runner_map", None)
    if isinstance(runners, dict) and not isinstance(runners.get(key), _InlineRunner):
        runners[key] = _InlineRunner(_TaskRunner())

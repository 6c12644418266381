"""State that outlives one execution on a replica: `actor_cache` (memoization, so expensive setup such as loading
a model happens once per replica) and `replica_dir()` (files that must outlive the execution that wrote them)."""

from __future__ import annotations

import collections
import functools
import threading
import uuid
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

from flytekitplugins_actor.replica.execution import RUNTIME

_MISSING = object()
_INSTANCES: Dict[str, "ActorCache"] = {}
"""Every ActorCache of this process by id, held for the life of the process (a replica's life): a cache that
travels by pickle (a __main__ task, pickled anew per call) arrives as the one already here, so its entries live
for the replica, not for one execution."""
_INSTANCES_LOCK = threading.Lock()


def _freeze(value: Any) -> Hashable:
    """A hashable key for one argument: FlyteFile/FlyteDirectory by source path, containers by content."""
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.file import FlyteFile

    if isinstance(value, (FlyteFile, FlyteDirectory)):
        return (type(value).__name__, str(getattr(value, "remote_source", None) or value.path))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((_freeze(k), _freeze(v)) for k, v in value.items()), key=repr)))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(_freeze(v) for v in value))
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"actor_cache cannot key on an argument of type {type(value).__name__}: it is unhashable; "
            "define __hash__ and __eq__ on it (see the custom-object example)"
        ) from None
    return value


class _Flight:
    """A computation in progress that concurrent callers of the same key wait on (single-flight)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None


class ActorCache:
    """The memoizing wrapper: thread-safe, single-flight, exceptions not cached, optionally LRU-bounded."""

    def __init__(self, fn: Callable, maxsize: Optional[int], cache_id: Optional[str] = None, register: bool = True):
        if maxsize is not None and (isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1):
            raise ValueError(f"actor_cache(maxsize={maxsize!r}) is invalid: must be None (unbounded) or an int >= 1")
        self.fn, self.maxsize = fn, maxsize
        self._lock = threading.Lock()
        self._entries: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
        self._flights: Dict[Hashable, _Flight] = {}
        self._code_version = RUNTIME.code_version
        self.hits = self.misses = 0
        self.cache_id = cache_id or uuid.uuid4().hex
        functools.update_wrapper(self, fn)
        if register:
            with _INSTANCES_LOCK:
                _INSTANCES[self.cache_id] = self

    def __reduce__(self):
        """Pickles as (id, function, maxsize), never its lock or entries: unpickled where a cache of that id
        already lives, it is that cache."""
        return (_restore, (self.cache_id, self.fn, self.maxsize))

    def _key(self, args: Tuple, kwargs: Dict[str, Any]) -> Hashable:
        return (tuple(_freeze(a) for a in args), tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self._key(args, kwargs)
        with self._lock:
            if self._code_version != RUNTIME.code_version:  # never serve entries computed by other code
                self._entries.clear()
                self._code_version = RUNTIME.code_version
            value = self._entries.get(key, _MISSING)
            if value is not _MISSING:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
                self.misses += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            with self._lock:
                self.hits += 1
            return flight.value
        try:
            flight.value = self.fn(*args, **kwargs)
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._flights[key]
                if flight.error is None:
                    self._entries[key] = flight.value
                    if self.maxsize is not None:
                        while len(self._entries) > self.maxsize:
                            self._entries.popitem(last=False)
            flight.done.set()
        return flight.value

    def cache_info(self) -> Dict[str, Any]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._entries), "maxsize": self.maxsize}

    def cache_clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


def _restore(cache_id: str, fn: Callable, maxsize: Optional[int]) -> ActorCache:
    with _INSTANCES_LOCK:
        cache = _INSTANCES.get(cache_id)
        if cache is None:
            cache = _INSTANCES[cache_id] = ActorCache(fn, maxsize, cache_id=cache_id, register=False)
        return cache


def actor_cache(fn: Optional[Callable] = None, *, maxsize: Optional[int] = None):
    """Memoizes `fn` for the life of the replica (plain memoization outside an actor).

    Use bare (``@actor_cache``) or bounded (``@actor_cache(maxsize=8)``, least recently used evicted).
    """
    if fn is None:
        return lambda f: ActorCache(f, maxsize)
    if not callable(fn):
        raise TypeError(f"actor_cache decorates a function, got {fn!r}")
    return ActorCache(fn, maxsize)


def replica_dir() -> str:
    """A directory that lives as long as the replica: for files that must outlive the execution that wrote them.

    An execution's own temp dir (`tempfile.gettempdir()` inside a task) is gone the moment the execution ends, so a
    path into it must not be kept (in `actor_cache`, a global) for the next one: put such files here. Removed when
    the replica stops. Outside a replica (in-process mode, plain Python) it is a dir of this process, removed at
    its exit."""
    return RUNTIME.dirs.state_dir()

"""One thread that runs a pool's (or a backend's) timed actions, instead of a thread per terminate or cancel.

Actions are short (a signal, a control request with a bounded timeout); one that fails is logged and the
supervisor carries on. The thread runs only while something is scheduled and is started again on demand.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from flytekit.loggers import logger


class Supervisor:
    """Runs `fn(*args)` at the times asked for, in deadline order, on one thread."""

    def __init__(self, name: str):
        self.name = name
        self._cond = threading.Condition(threading.Lock())
        self._heap: List[Tuple[float, int, Callable[..., Any], Tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        """Schedules `fn(*args)` in `delay_s` seconds (ignored once the supervisor is stopped)."""
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay_s), next(self._seq), fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.call_later(0.0, fn, *args)

    def stop(self) -> None:
        """Drops what is scheduled and ends the thread (an action already running finishes first)."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()

    def _next(self) -> Optional[Tuple[Callable[..., Any], Tuple[Any, ...]]]:
        """The next due action; None when there is nothing left to do (the thread then ends)."""
        with self._cond:
            while True:
                if self._stopped or not self._heap:
                    self._thread = None
                    return None
                deadline = self._heap[0][0]
                now = time.monotonic()
                if deadline <= now:
                    _, _, fn, args = heapq.heappop(self._heap)
                    return fn, args
                self._cond.wait(deadline - now)

    def _run(self) -> None:
        while True:
            action = self._next()
            if action is None:
                return
            fn, args = action
            try:
                fn(*args)
            except Exception:
                logger.exception("%s: scheduled action %s failed", self.name, getattr(fn, "__qualname__", fn))

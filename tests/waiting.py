"""What every test module shares: where the venv is, the resolver flytekit renders, and waiting on a condition with a
deadline (never a blind sleep)."""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, TypeVar, Union

from flytekit.core.python_auto_container import default_task_resolver

T = TypeVar("T")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
VENV_BIN = os.path.join(REPO, ".venv", "bin")
RESOLVER = default_task_resolver.location  # as flytekit renders it into a task's container args


def wait_until(
    cond: Callable[[], T], timeout: float, what: Union[str, Callable[[], str], None] = None, interval: float = 0.005
) -> T:
    """Polls `cond` until it returns something truthy and returns that; fails the test after `timeout` seconds,
    saying what it waited for (`what` may be a callable, evaluated only then)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            said: Optional[str] = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {said or getattr(cond, '__name__', cond)!s}")
        time.sleep(interval)

"""Helpers shared by the SDK tests: overlap probes, watching processes, a subprocess env (waiting: tests/waiting.py)."""

from __future__ import annotations

import os
import time

from waiting import REPO, TESTS, VENV_BIN

HERE = os.path.dirname(os.path.abspath(__file__))


def saw_overlap(probe_dir: str, me: str, hold: float) -> bool:
    """Marks `me` running in `probe_dir` for up to `hold` seconds; True if another execution was running meanwhile.
    Called inside actor tasks, so overlap is seen by the executions themselves, not inferred from timing."""
    mine = os.path.join(probe_dir, f"running-{me}")
    open(mine, "w").close()
    seen = False
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and not seen:
        names = os.listdir(probe_dir)
        # an overlap seen by the other one counts too: it may have seen us and left between two of our looks
        seen = f"saw-{me}" in names or any(f.startswith("running-") and f != f"running-{me}" for f in names)
        if not seen:
            time.sleep(0.01)
    if seen:
        for f in os.listdir(probe_dir):
            if f.startswith("running-") and f != f"running-{me}":
                open(os.path.join(probe_dir, f"saw-{f[len('running-') :]}"), "w").close()
    os.remove(mine)
    return seen


def pid_alive(pid: int) -> bool:
    """True while a process exists and is not a zombie (a reparented zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def subprocess_env(**extra: str) -> dict:
    """The environment for a driver subprocess: the repo importable, the venv's scripts first on PATH."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, HERE, TESTS, env.get("PYTHONPATH")) if p)
    env.pop("FLYTE_ACTOR_IN_PROCESS", None)
    env.update(extra)
    return env

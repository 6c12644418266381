"""Actor tasks the worker tests submit by module name (importable in the replica through the driver's sys.path)."""

import os
import sys
import tempfile
import time

from flytekit.exceptions.user import FlyteRecoverableException

from flytekitplugins_actor import ActorEnvironment

env = ActorEnvironment(name="worker-tests")


@env.task
def count_run(path: str) -> int:
    """Side effect: appends a line to `path` per run and returns how many runs it has seen."""
    with open(path, "a") as f:
        f.write("run\n")
    with open(path) as f:
        return len(f.readlines())


@env.task
def wait_for_file(path: str, started: str) -> str:
    """Marks itself started, then waits (up to a minute) for `path` to appear: a long task to cancel."""
    open(started, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return "timed out"
        time.sleep(0.02)
    return "released"


@env.task
def exit_three() -> int:
    sys.exit(3)
    return 0


@env.task
def user_error() -> int:
    raise ValueError("user said no")
    return 0


@env.task
def recoverable_error() -> int:
    raise FlyteRecoverableException("try again later")
    return 0


@env.task
def identity() -> str:
    return os.environ.get("FLYTE_INTERNAL_EXECUTION_ID", "<unset>")


@env.task
def make_scratch() -> str:
    """Makes a temp dir holding a file and returns its path; the worker must remove it after the execution."""
    d = tempfile.mkdtemp(prefix="user-scratch-")
    with open(os.path.join(d, "f.txt"), "w") as f:
        f.write("x")
    with tempfile.NamedTemporaryFile(delete=False, suffix=".leak") as f:
        f.write(b"x")
    return d


@env.task
def pid() -> int:
    return os.getpid()


@env.task
def env_var(var: str) -> str:
    return os.environ.get(var, "<unset>")


@env.task
def spawn_sleeper(path: str) -> int:
    """Starts a long-lived child process, records its pid, then waits for the file `path` + '.release'."""
    import subprocess
    import time as _time

    child = subprocess.Popen(["sleep", "600"])
    with open(path, "w") as f:
        f.write(str(child.pid))
    while not os.path.exists(path + ".release"):
        _time.sleep(0.01)
    return child.pid

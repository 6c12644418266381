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


@env.task
def sleep_long(started: str) -> str:
    """Marks itself started, then blocks in time.sleep: only a real signal interrupts it."""
    open(started, "w").close()
    time.sleep(600)
    return "slept"


@env.task
def blocked_read(started: str) -> str:
    """Marks itself started, then blocks reading a pipe nobody writes to (blocking I/O)."""
    r, w = os.pipe()
    open(started, "w").close()
    os.read(r, 1)
    return "read"


@env.task
def keyboard_interrupt() -> int:
    """Task code that raises KeyboardInterrupt itself: a failure of this execution, not a cancel."""
    raise KeyboardInterrupt("the task's own interrupt")
    return 0


@env.task
def ignore_cancel(path: str, started: str) -> str:
    """Waits for `path` like wait_for_file, but swallows every interrupt (a cancel included) from the moment it
    says it started until it is released."""
    deadline = time.monotonic() + 60
    marked = False
    while True:
        try:
            if not marked:
                open(started, "w").close()
                marked = True
            if os.path.exists(path) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        except BaseException:  # noqa: B036 -- the point of this task
            pass
    return "released"


@env.task
def count_then_wait(path: str, release: str) -> int:
    """Appends a line to `path` per run (so a second run shows), then waits for the file `release`."""
    with open(path, "a") as f:
        f.write("run\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(path) as f:
        return len(f.readlines())


@env.task
def hold_in_cleanup(marker: str, release: str) -> str:
    """Succeeds at once, but makes the replica's clean-up after it (retiring its dir, once its outcome is recorded)
    wait for the file `release`, having created `marker`: a window in which a late cancel lands. Returns its
    execution dir."""
    from flytekitplugins_actor.replica.execution import RUNTIME

    original = RUNTIME.dirs.retire

    def retire(path: str) -> None:
        RUNTIME.dirs.retire = original
        open(marker, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
        original(path)

    RUNTIME.dirs.retire = retire
    return tempfile.gettempdir()


@env.task
def hold_in_tidy(marker: str, release: str) -> int:
    """Succeeds at once, but makes the replica's next idle tidying wait for the file `release`, having created
    `marker`: the replica is then idle to its pool while its main thread cannot start what it accepts."""
    from flytekitplugins_actor.replica.execution import RUNTIME

    original = RUNTIME.dirs.tidy_one

    def tidy_one() -> None:
        RUNTIME.dirs.tidy_one = original
        open(marker, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
        original()

    RUNTIME.dirs.tidy_one = tidy_one
    return 0


@env.task
def repeat(text: str, times: int) -> str:
    """Outputs `text` `times` times: small or big outputs on demand."""
    return text * times


class PayloadError(ValueError):
    """An exception carrying a big payload behind a short message."""

    def __str__(self) -> str:
        return f"failed with a payload of {len(self.args[0])} bytes"


@env.task
def fail_with(size: int) -> int:
    """Fails with an exception whose pickle is `size` bytes and more: a reply bigger than a socket buffer."""
    if size:
        raise PayloadError(os.urandom(size))
    return size


@env.task
def write_engine_file(filename: str) -> int:
    """Writes a file of its own into flytekit's engine dir, which pyflyte-execute uploads with the outputs."""
    from flytekit.core.context_manager import FlyteContextManager

    with open(os.path.join(FlyteContextManager.current_context().execution_state.engine_dir, filename), "w") as f:
        f.write("mine")
    return 1


@env.task
def say(text: str) -> int:
    """Prints `text`, if any: the replica's reply says whether the task wrote to its output."""
    if text:
        print(text)
    return len(text)

"""Local runs: actor tasks execute on real local replica processes, warm and reused, never in the driver."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import sdk_local_tasks as t
from sdk_helpers import HERE, pid_alive, subprocess_env
from waiting import REPO, VENV_BIN, wait_until

import flytekitplugins_actor
from flytekitplugins_actor import local as local_module
from flytekitplugins_actor import map as actor_map_of
from flytekitplugins_actor.local import local_pools
from flytekitplugins_actor.replica.protocol import INLINE_LIMIT_BYTES

pytestmark = pytest.mark.timeout(120)


def pool_of(env):
    return local_pools().get(env.key())


# ---- where tasks run ----
def test_actor_task_runs_in_a_replica_process_not_the_driver():
    replica_pid = t.whoami()
    assert replica_pid != os.getpid()
    assert pid_alive(replica_pid)
    assert t.parent_pid() == os.getpid()  # a child of this driver
    assert replica_pid in [r.pid for r in pool_of(t.basic).replicas]


def test_in_process_mode_runs_in_the_driver(monkeypatch):
    monkeypatch.setenv("FLYTE_ACTOR_IN_PROCESS", "1")
    assert t.whoami() == os.getpid()


def test_process_state_persists_between_tasks_on_a_replica():
    pid = t.whoami()
    first = t.bump()
    second = t.bump()
    assert second == first + 1
    assert t.whoami() == pid
    assert t._counter == 0  # the driver's module global never moved: the state lives in the replica


def test_pool_is_reused_across_workflows_in_one_driver():
    a = t.wf_a()
    b = t.wf_b()
    c = t.wf_a()
    assert a == b == c != os.getpid()
    pool = pool_of(t.basic)
    assert [r.pid for r in pool.replicas] == [a]
    assert pool.stats()["warm"] >= 2


def test_replicas_start_lazily_and_an_idle_warm_replica_is_preferred():
    pids = [t.lazy_pid() for _ in range(4)]
    assert len(set(pids)) == 1  # sequential calls reuse the warm replica instead of starting another
    pool = pool_of(t.lazy)
    assert [r.pid for r in pool.replicas] == pids[:1]  # replica_count=3, but only one was needed
    assert pool.stats()["cold"] == 1 and pool.stats()["warm"] == 3


def test_a_replica_runs_one_execution_at_a_time(tmp_path):
    # a map allowed 2 items at once over a replica_count=1 environment: the pool queues the second
    probe = actor_map_of(t.overlap_probe, concurrency=2)
    results = probe(probe_dir=[str(tmp_path)] * 2, me=["a", "b"], hold=[0.75, 0.75])
    assert -1 not in results, "two executions overlapped on one replica"
    assert results[0] == results[1] == t.whoami()


# ---- environment variables ----
def test_environment_and_pod_template_env_are_set_in_the_replica_not_the_driver():
    assert t.env_of(name="SDK_ENV_VAR") == "from-environment"
    assert t.env_of(name="SDK_POD_VAR") == "compile_time"
    assert t.env_of(name="SDK_OVERLAP") == "from-environment"  # `environment` is applied over the pod template
    for name in ("SDK_ENV_VAR", "SDK_POD_VAR", "SDK_OVERLAP", "SDK_RUN_VAR"):
        assert name not in os.environ
    # a replica of another environment does not get them either
    assert t.read_env(name="SDK_ENV_VAR") == "<unset>"


def test_env_set_by_one_task_is_seen_by_the_next_on_the_replica():
    assert t.wf_pod_template() == ("compile_time", "run_time")
    assert "SDK_RUN_VAR" not in os.environ


# ---- errors ----
def test_user_exception_is_reraised_with_its_original_type():
    with pytest.raises(t.Boom, match="kaboom"):
        t.raise_boom(message="kaboom")
    with pytest.raises(KeyError, match="missing-key"):
        t.raise_key_error()
    # the replica survived both
    assert pid_alive(t.whoami())


def test_user_exception_that_cannot_be_rebuilt_from_its_args_keeps_its_type_and_attributes():
    with pytest.raises(t.CodedError) as info:
        t.raise_coded(code=42, detail="no such model")
    e = info.value
    assert (e.code, e.detail) == (42, "no such model")
    assert "error 42: no such model" in str(e)
    assert not isinstance(e, flytekitplugins_actor.ActorTaskFailed)


def test_user_exception_in_a_workflow_keeps_its_type():
    with pytest.raises(t.Boom, match="from a workflow"):
        t.wf_boom()


# ---- state across executions ----
@pytest.mark.parametrize("pause", [0.0, 0.3], ids=["next-at-once", "next-after-a-pause"])
def test_an_execution_temp_dir_is_gone_when_it_ends_whatever_the_timing(pause):
    path = t.file_in_execution_temp_dir(content="x")
    time.sleep(pause)  # the scenario (a pause between executions), not synchronisation
    assert t.read_file_or_gone(path=path) == "<gone>"


@pytest.mark.parametrize("pause", [0.0, 0.3], ids=["next-at-once", "next-after-a-pause"])
def test_replica_dir_outlives_the_execution_that_wrote_it(pause):
    path = t.file_in_replica_dir(content=f"kept-{pause}")
    time.sleep(pause)  # the scenario (a pause between executions), not synchronisation
    assert t.read_file_or_gone(path=path) == f"kept-{pause}"
    assert t.file_in_replica_dir(content="again") == path  # the same dir for the replica's life


# ---- data across the boundary ----
def test_files_and_dataclasses_travel_between_driver_and_replica(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("warm replicas are fast")
    stats = t.count_words(f=t.FlyteFile(str(src)))
    assert stats == t.Stats(n=4, words=["warm", "replicas", "are", "fast"])
    report = t.wf_files(f=t.FlyteFile(str(src)))
    with open(report.download()) as fh:
        text = fh.read()
    m = re.fullmatch(r"4 words from pid (\d+): warm replicas are fast", text)
    assert m and int(m.group(1)) != os.getpid(), text


def test_each_execution_s_file_access_sandbox_is_inside_its_own_temp_dir():
    (first_tmp, first_sandbox), (second_tmp, second_sandbox) = t.sandbox_dirs(), t.sandbox_dirs()
    assert first_sandbox == os.path.join(first_tmp, "local_flytekit")
    assert second_sandbox == os.path.join(second_tmp, "local_flytekit")
    assert first_tmp != second_tmp  # each execution its own, whatever the replica keeps between them


@pytest.mark.parametrize("size", [10, INLINE_LIMIT_BYTES + 10], ids=["inline", "through-files"])
def test_small_and_big_values_travel_between_driver_and_replica(size, monkeypatch):
    sent = []
    original = local_module.ExecutionSpec

    def spy(*args, **kwargs):
        spec = original(*args, **kwargs)
        sent.append(spec)
        return spec

    monkeypatch.setattr(local_module, "ExecutionSpec", spy)
    text = "ab" * (size // 2)
    assert t.echo_twice(text=text) == text + text
    (spec,) = sent
    assert (spec.inputs_pb is not None) == (size < INLINE_LIMIT_BYTES) and spec.return_outputs


# ---- replica death ----
@pytest.mark.parametrize(
    "how,expected",
    [("exit", r"exited with code 7"), ("sigkill", r"SIGKILL"), ("segfault", r"SIGSEGV")],
)
def test_replica_death_mid_task_raises_replica_died_and_a_new_replica_takes_over(how, expected):
    before = t.death_pid()
    with pytest.raises(flytekitplugins_actor.ReplicaDied) as info:
        t.die(how=how)
    msg = str(info.value)
    assert re.search(r"replica sdk-deaths-\d+", msg), msg
    assert re.search(expected, msg), msg
    assert "die" in msg  # names the task
    wait_until(lambda: not pid_alive(before), 10)
    after = t.death_pid()
    assert after != before and pid_alive(after)
    assert t.death_pid() == after  # and it is warm again
    assert isinstance(info.value, flytekitplugins_actor.ActorError)


def test_a_replica_killed_while_idle_is_replaced_on_the_next_task():
    before = t.death_pid()
    os.kill(before, signal.SIGKILL)
    wait_until(lambda: not pid_alive(before), 10)
    after = t.death_pid()  # not a failure: nothing was running on it
    assert after != before and pid_alive(after)


# ---- idle teardown ----
@pytest.mark.parametrize("task", [t.ttl0_pid, t.ttl1_pid], ids=["ttl0", "ttl1"])
def test_idle_replicas_are_torn_down_after_ttl(task):
    pid = task()
    assert pid != os.getpid()
    wait_until(lambda: not pid_alive(pid), 15, what=f"replica {pid} still alive past its ttl")
    wait_until(lambda: pool_of(task.task_config) is None, 5)
    again = task()  # a new pool and replica start on demand
    assert again != pid and pid_alive(again)


def test_a_busy_replica_is_not_torn_down_by_its_ttl():
    pid = t.ttl1_busy(seconds=2.5)  # runs longer than ttl_seconds=1
    assert pid != os.getpid()


# ---- scripts and pyflyte run, in their own driver processes ----


@pytest.mark.parametrize(
    "cwd",
    [
        "elsewhere",
        "script-dir",
    ],
)
@pytest.mark.timeout(90)
def test_task_defined_in_main_runs_by_cloudpickle(tmp_path, cwd):
    cwd = str(tmp_path) if cwd == "elsewhere" else HERE
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "sdk_main_script.py")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=cwd,
        timeout=80,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    m = re.fullmatch(r"HELLO FROM __MAIN__! actor pid=(\d+)", out["result"])
    assert m, out
    replica_pid = int(m.group(1))
    assert replica_pid != out["driver_pid"]
    # the driver exited normally: its replica is torn down with it
    wait_until(lambda: not pid_alive(replica_pid), 15, what=f"replica {replica_pid} outlived its driver")


@pytest.mark.timeout(90)
def test_actor_cache_in_a_main_task_travels_by_cloudpickle_and_lives_for_the_replica(tmp_path):
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "sdk_main_cache_script.py")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=str(tmp_path),
        timeout=80,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert "error" not in out, out
    m = re.fullmatch(r"m-[0-9a-f]{32}-(\d+)", out["first"])
    assert m and int(m.group(1)) != out["driver_pid"], out  # computed in the replica
    assert out["second"] == out["first"], out  # the second execution hit the replica's cache


@pytest.mark.timeout(90)
def test_pyflyte_run_executes_on_a_child_replica(tmp_path):
    p = subprocess.Popen(
        [os.path.join(VENV_BIN, "pyflyte"), "run", os.path.join(HERE, "sdk_local_tasks.py"), "wf_pids"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
    )
    out, err = p.communicate(timeout=80)
    assert p.returncode == 0, err[-3000:]
    nums = [int(n) for n in re.findall(r"\b\d+\b", out)]
    assert len(nums) >= 2, out
    replica_pid, replica_parent = nums[-2], nums[-1]
    assert replica_parent == p.pid  # the replica is a child of the pyflyte driver
    assert replica_pid != p.pid


@pytest.mark.timeout(90)
def test_pyflyte_run_pod_template_example(tmp_path):
    p = subprocess.run(
        [os.path.join(VENV_BIN, "pyflyte"), "run", os.path.join(HERE, "sdk_local_tasks.py"), "wf_pod_template"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=80,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "compile_time" in p.stdout and "run_time" in p.stdout, p.stdout


@pytest.mark.timeout(90)
def test_replicas_exit_when_the_driver_is_killed(tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "sdk_driver_script.py"), str(barrier)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=str(tmp_path),
    )
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read()[-3000:] if p.poll() is not None else "driver printed nothing"
        info = json.loads(line)
        pids = info["replica_pids"]
        assert len(set(pids)) == 2 and info["driver_pid"] not in pids
        assert all(pid_alive(x) for x in pids)
        p.kill()  # SIGKILL: no atexit, no cleanup in the driver
        p.wait(10)
        wait_until(
            lambda: not any(pid_alive(x) for x in pids),
            15,
            what=lambda: f"replicas outlived their driver: {[x for x in pids if pid_alive(x)]}",
        )
    finally:
        if p.poll() is None:
            p.kill()
        p.stdin.close()
        p.stdout.close()
        p.stderr.close()


@pytest.mark.timeout(90)
def test_pyflyte_run_of_a_package_module_imports_the_same_way_in_the_replica(tmp_path):
    # proj/pkg/flow.py imports its sibling pkg.helpers; only `pyflyte run` puts proj/ on sys.path
    pkg = tmp_path / "proj" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("def triple(x):\n    return 3 * x\n")
    (pkg / "flow.py").write_text(
        "import os\n"
        "from flytekit import workflow\n"
        "from flytekitplugins_actor import ActorEnvironment\n"
        "from pkg.helpers import triple\n"
        "env = ActorEnvironment(name='sdk-pkg', ttl_seconds=30)\n"
        "@env.task\n"
        "def run(x: int) -> str:\n"
        "    return f'{triple(x)} {__name__} {os.getpid()}'\n"
        "@workflow\n"
        "def wf(x: int) -> str:\n"
        "    return run(x=x)\n"
    )
    env = subprocess_env()
    env["PYTHONPATH"] = REPO  # not proj/: the replica must get it from the driver
    p = subprocess.Popen(
        [os.path.join(VENV_BIN, "pyflyte"), "run", "proj/pkg/flow.py", "wf", "--x", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(tmp_path),
    )
    out, err = p.communicate(timeout=80)
    assert p.returncode == 0, err[-3000:]
    m = re.search(r"12 pkg\.flow (\d+)", out)
    assert m, out
    assert int(m.group(1)) != p.pid


# ---- what a run leaves behind, and what it shows ----
CLEANUP_SCRIPT = os.path.join(HERE, "sdk_cleanup_script.py")


def _files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["exit", "sigint", "sigterm"])
def test_nothing_of_a_run_remains_in_the_temp_dir(tmp_path, how):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    marker = tmp_path / "marker"
    mode = "exit" if how == "exit" else "block"
    p = subprocess.Popen(
        [sys.executable, CLEANUP_SCRIPT, mode, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(TMPDIR=str(tmp)),
        cwd=str(tmp_path),
    )
    try:
        if how != "exit":
            wait_until(lambda: marker.exists() or p.poll() is not None, 60)  # the task is running in a replica
            assert p.poll() is None, p.stderr.read()[-3000:]
            p.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == (0 if how == "exit" else (1 if how == "sigint" else 128 + signal.SIGTERM)), err[-3000:]
    replica_pid = int(re.search(r"hello from the task, pid (\d+)", err).group(1))
    wait_until(lambda: not pid_alive(replica_pid), 15, what=f"replica {replica_pid} outlived its driver")
    # the task's scratch file and replica_dir() file, the driver's workdirs: all gone; the replica log stays
    files = _files_under(tmp)
    assert all(re.fullmatch(rf"flyte-actor-logs/{p.pid}/sdk-cleanup-\d+\.log", f) for f in files), files
    assert not [d for d in os.listdir(tmp) if d.startswith("flyte-actor-runs-")], os.listdir(tmp)


@pytest.mark.timeout(90)
def test_task_output_is_streamed_to_the_driver_terminal_prefixed_with_the_replica_name(tmp_path):
    p = subprocess.run(
        [sys.executable, CLEANUP_SCRIPT, "exit", ""],
        capture_output=True,
        text=True,
        env=subprocess_env(TMPDIR=str(tmp_path)),
        cwd=str(tmp_path),
        timeout=80,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^sdk-cleanup-\d+ \| hello from the task, pid \d+$", p.stderr, re.M), p.stderr[-3000:]
    # before the result: the driver shows what the task printed as the call returns, not at its next poll
    assert p.stderr.index("hello from the task") < p.stderr.index("driver: the result is back"), p.stderr[-3000:]
    assert "[actor-replica" not in p.stderr  # the worker's bookkeeping stays in the log file
    assert "hello from the task" not in p.stdout  # stdout stays the program's own


@pytest.mark.timeout(90)
def test_replica_logs_are_kept_for_the_last_few_runs_and_killed_runs_are_cleaned_up(tmp_path):
    from flytekitplugins_actor.replica_logs import KEEP_RUNS

    with open("/proc/sys/kernel/pid_max") as f:
        dead = int(f.read()) + 1  # a pid no process can have
    logs = tmp_path / "flyte-actor-logs"
    for i in range(KEEP_RUNS + 3):  # earlier runs' logs, oldest first
        d = logs / str(dead + i)
        d.mkdir(parents=True)
        (d / "old-1.log").write_text("old")
        os.utime(d, (1_000_000 + i, 1_000_000 + i))
    killed = tmp_path / f"flyte-actor-runs-{dead}"  # what a SIGKILLed driver left
    (killed / "replicas").mkdir(parents=True)
    p = subprocess.Popen(
        [sys.executable, CLEANUP_SCRIPT, "exit", ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(TMPDIR=str(tmp_path)),
        cwd=str(tmp_path),
    )
    _, err = p.communicate(timeout=80)
    assert p.returncode == 0, err[-3000:]
    kept = sorted(os.listdir(logs))
    assert len(kept) == KEEP_RUNS and str(p.pid) in kept, kept
    assert kept == sorted([str(p.pid)] + [str(dead + i) for i in range(4, KEEP_RUNS + 3)]), kept  # the newest
    assert not killed.exists()


def test_a_replica_log_is_bounded_in_size(tmp_path):
    import io

    from flytekitplugins_actor.replica_logs import ReplicaOutput

    out = io.StringIO()
    follower = ReplicaOutput(str(tmp_path), stream=out, max_bytes=10_000)
    log = tmp_path / "r-1.log"
    with open(log, "ab") as f:  # as the replica writes it (O_APPEND)
        for i in range(3):
            f.write(b"".join(b"line %d.%04d\n" % (i, j) for j in range(1000)))
            f.flush()
            follower.drain()
        f.write(b"after rotation\n")
        f.flush()
        follower.drain()
    assert os.path.getsize(log) < 10_000 and os.path.getsize(str(log) + ".1") < 30_000
    text = out.getvalue()
    assert "r-1 | line 2.0999" in text and text.endswith("r-1 | after rotation\n")
    assert text.count("\n") == 3001  # every line echoed once, none lost to the rotation

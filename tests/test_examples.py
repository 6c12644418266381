"""Every example in examples/ through a real `pyflyte run` subprocess, on local warm replicas, with its documented
result.

Each run gets its own TMPDIR (so the replica logs of that run alone are under $TMPDIR/flyte-actor-logs/<driver
pid>/) and the session gets its own HOME (so flytekit's local cache and config never leak in from the user).
Examples print a marker line from their `actor_cache`d functions; counting those lines in the replica logs
proves how often the cached work really ran.
"""

import ast
import glob
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
PYFLYTE = os.path.join(os.path.dirname(sys.executable), "pyflyte")

# from the repo root (path examples/<file>) and from inside examples/ (path <file>)
WHERE = {"root": (ROOT, "examples/"), "examples": (EXAMPLES, "")}


@dataclass
class Run:
    stdout: str
    stderr: str
    seconds: float
    logs: List[str]  # the text of each replica log of this run

    @property
    def result(self) -> str:
        """The line pyflyte run prints last: the workflow's outputs."""
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        assert lines and "Running Execution on local." in self.stdout, self.stdout + self.stderr
        return lines[-1].strip()

    def count(self, marker: str) -> int:
        return sum(log.count(marker) for log in self.logs)


@pytest.fixture(scope="session")
def home(tmp_path_factory):
    return str(tmp_path_factory.mktemp("home"))


@pytest.fixture
def run_example(tmp_path, home):
    def run(where: str, filename: str, workflow: str, *args: str, timeout: float = 120) -> Run:
        cwd, prefix = WHERE[where]
        tmpdir = tmp_path / "tmp"
        tmpdir.mkdir(exist_ok=True)
        env = {**os.environ, "TMPDIR": str(tmpdir), "HOME": home, "COLUMNS": "300", "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("PYTHONPATH", None)
        started = time.monotonic()
        proc = subprocess.run(
            [PYFLYTE, "run", prefix + filename, workflow, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        seconds = time.monotonic() - started
        logs = [open(p).read() for p in sorted(glob.glob(str(tmpdir / "flyte-actor-logs" / "*" / "*.log")))]
        assert proc.returncode == 0, (
            f"pyflyte run {filename} {workflow} failed:\n{proc.stdout}\n{proc.stderr}\n" + "\n".join(logs)
        )
        return Run(proc.stdout, proc.stderr, seconds, logs)

    return run


both = pytest.mark.parametrize("where", ["root", "examples"])


@both
@pytest.mark.timeout(60)
def test_hello_world(run_example, where):
    run = run_example(where, "hello_world.py", "wf")
    assert len(run.logs) == 1  # one replica
    assert run.count("succeeded") == 1  # say_hello ran there, once


@both
@pytest.mark.timeout(60)
def test_plus_one(run_example, where):
    run = run_example(where, "plus_one.py", "wf", "--input", "0")
    assert int(run.result) == 4
    assert len(run.logs) == 1 and run.count("succeeded") == 4  # four executions on one warm replica


@both
@pytest.mark.timeout(60)
def test_multiple_tasks(run_example, where):
    run = run_example(where, "multiple_tasks.py", "my_parent_wf", "--name", "x")
    assert run.result == "HELLO HELLO hello x"
    assert len(run.logs) == 1 and run.count("succeeded") == 3  # workflow, subworkflow and launch plan: one replica


@both
@pytest.mark.timeout(60)
def test_pod_template(run_example, where):
    # COMP_KEY_EX comes from the pod template (set in the replica only); RUN_KEY_EX, set by the first
    # task, is read by the second: both ran in the same warm process.
    run = run_example(where, "pod_template.py", "wf")
    m = re.fullmatch(r"DefaultNamedTupleOutput\(o0=(.*), o1=(.*)\)", run.result)
    assert m, run.result
    assert (ast.literal_eval(m.group(1)), ast.literal_eval(m.group(2))) == ("compile_time", "run_time")


@both
@pytest.mark.timeout(60)
def test_refactoring_distance_add(run_example, where):
    run = run_example(where, "refactoring.py", "distance_add_wf", "--point_a", "[0, 0]", "--point_b", "[3, 4]")
    assert float(run.result) == 6.5


@both
@pytest.mark.timeout(60)
def test_refactoring_is_even(run_example, where):
    run = run_example(where, "refactoring.py", "is_even_wf", "--point_a", "[1, 2, 3]")
    assert ast.literal_eval(run.result) == [False, True, False]


@both
@pytest.mark.timeout(120)
def test_caching_map_task(run_example, where):
    run = run_example(where, "caching_map_task.py", "run_inference")
    assert ast.literal_eval(run.result) == [4 * i for i in range(20)]
    loads = re.findall(r"load_model: loading in pid (\d+)", "\n".join(run.logs))
    # at most once per replica (2 replicas): 20 inferences, not 20 loads of 10 s
    assert 1 <= len(loads) <= 2 and len(set(loads)) == len(loads), loads
    assert run.count("succeeded") == 20
    assert run.seconds < 60, f"took {run.seconds:.1f}s; 20 uncached loads would take 200s"


@both
@pytest.mark.timeout(60)
@pytest.mark.parametrize("state", [None, 7])
def test_caching_custom_object(run_example, where, state):
    args = [] if state is None else ["--state", str(state)]
    run = run_example(where, "caching_custom_object.py", "wf", *args)
    expected = 2 if state is None else state
    assert int(run.result) == expected
    # four calls with equal MyObj(state) keys: get_state computes once, three cache hits
    assert run.count("get_state: computing") == 1
    assert run.count(f"get_state: computing state {expected} ") == 1
    assert run.count("succeeded") == 4

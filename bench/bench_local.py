#!/usr/bin/env python
"""Local benchmarks of actor tasks, all measured in ONE run (see bench/README.md).

    .venv/bin/python bench/bench_local.py            # full table, also written to bench/results/local.md
    .venv/bin/python bench/bench_local.py --demo     # the quick cold-vs-warm timing scripts/demo.sh prints

Headline (what users run): a `@workflow` holding one actor task (`bench_tasks.wf_actor`) against the same workflow
with a plain `@task` (`bench_tasks.wf_plain`), both called locally in this driver with the default temp dir, and a fresh
`pyflyte-execute` process against the warm actor workflow. The same three are measured again in a child driver
with TMPDIR=/dev/shm (tmpfs) for driver and replicas: an extra column, not the headline.

Diagnostics (same trivial task `bench_tasks.noop`, x -> x + 1, everywhere):
  (a) warm   -- calling the actor task from the driver: the SDK's local run path, driver -> warm replica -> driver
  (b) worker -- the replica's execution path alone: submit + wait (sent together, as the pool sends them) of
                prepared pyflyte-execute args over the control protocol (round trip), and the time the replica
                itself reports for the execution
  (c) floor  -- flytekit's own `_execute_task` called repeatedly in one warm process (a fresh subprocess)
  (d) fresh  -- a fresh `pyflyte-execute` process per task (bytecode compiled, like the replicas)
  and, for scale, a plain (non-actor) flytekit @task called locally in-process: flytekit's own local-call cost,
  and the actor workflow with the replica call stubbed out: flytekit's workflow machinery around an actor task
  (e) map    -- items/s of `flytekitplugins_actor.map` over 1 and 2 replicas (trivial and 20 ms tasks)
The machine is small and noisy: look at medians and ratios, never at one absolute time.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"
IDENTITY = {
    "FLYTE_INTERNAL_EXECUTION_PROJECT": "bench",
    "FLYTE_INTERNAL_EXECUTION_DOMAIN": "development",
    "FLYTE_INTERNAL_EXECUTION_ID": "bench",
    "FLYTE_INTERNAL_TASK_PROJECT": "bench",
    "FLYTE_INTERNAL_TASK_DOMAIN": "development",
    "FLYTE_INTERNAL_TASK_NAME": "bench_tasks.noop",
    "FLYTE_INTERNAL_TASK_VERSION": "bench",
}
GOAL_ACTOR_OVER_PLAIN_WF = 1.5
GOAL_FRESH_OVER_WARM = 250.0


# ---------------------------------------------------------------- helpers
def compile_bytecode() -> None:
    """The venv is compiled by scripts/bootstrap.sh; compile this repo's code too, so both sides load bytecode."""
    for d in ("flytekitplugins_actor", "plugin_backend", "bench", "examples"):
        path = os.path.join(ROOT, d)
        if os.path.isdir(path):
            compileall.compile_dir(path, quiet=1)


def write_inputs(directory: str, x: int = 1) -> str:
    from flytekit.core.utils import write_proto_to_file
    from flytekit.models.literals import Literal, LiteralMap, Primitive, Scalar

    path = os.path.join(directory, "inputs.pb")
    write_proto_to_file(LiteralMap({"x": Literal(scalar=Scalar(primitive=Primitive(integer=x)))}).to_flyte_idl(), path)
    return path


def read_output(output_prefix: str) -> int:
    from flyteidl.core import literals_pb2
    from flytekit.core.utils import load_proto_from_file

    lm = load_proto_from_file(literals_pb2.LiteralMap, os.path.join(output_prefix, "outputs.pb"))
    return lm.literals["o0"].scalar.primitive.integer


def execute_args(inputs: str, output_prefix: str, raw: str, task: str = "noop") -> List[str]:
    from flytekitplugins_actor.replica.command import ExecutionCommand

    return ExecutionCommand.build(
        inputs=inputs,
        output_prefix=output_prefix,
        raw_output_data_prefix=raw,
        resolver=RESOLVER,
        resolver_args=["task-module", "bench_tasks", "task-name", task],
    ).to_args()


def summary(times: List[float]) -> Dict[str, float]:
    s = sorted(times)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) >= 2 else [s[0]] * 9
    return {"median": statistics.median(s), "p10": q[0], "p90": q[-1], "n": len(s)}


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def sub_env() -> Dict[str, str]:
    env = {**os.environ, **IDENTITY, "PYTHONPATH": os.pathsep.join([HERE, ROOT])}
    return env


# ---------------------------------------------------------------- (a) warm, through the SDK's local run path
class Warm:
    """Calls the actor task from this driver; the first call starts the replica (cold)."""

    def __init__(self, warmup: int = 20):
        from bench_tasks import noop

        self.task = noop
        t = time.perf_counter()
        assert noop(x=1) == 2
        self.cold = time.perf_counter() - t
        for _ in range(warmup):
            noop(x=1)

    def run(self, n: int) -> List[float]:
        times = []
        for i in range(n):
            t = time.perf_counter()
            out = self.task(x=i)
            times.append(time.perf_counter() - t)
            assert out == i + 1
        return times


class Plain(Warm):
    """A plain flytekit @task (not an actor) called locally in this process: flytekit's own local-call cost."""

    def __init__(self, warmup: int = 20):
        from bench_tasks import plain

        self.task = plain
        self.cold = 0.0
        for _ in range(warmup):
            plain(x=1)


class Workflow(Warm):
    """A workflow called locally, as `pyflyte run` would: `bench_tasks.wf_actor` or `bench_tasks.wf_plain`."""

    def __init__(self, name: str, warmup: int = 20):
        import bench_tasks

        self.task = getattr(bench_tasks, name)
        t = time.perf_counter()
        assert self.task(x=1) == 2
        self.cold = time.perf_counter() - t
        for _ in range(warmup):
            self.task(x=1)


class Machinery(Workflow):
    """`wf_actor` with the replica call replaced by its answer: flytekit's own workflow and task machinery around an
    actor task, without the execution (where the actor workflow's time goes that no replica can save)."""

    def __init__(self, warmup: int = 20):
        from flytekit.models.literals import Literal, LiteralMap, Primitive, Scalar

        import flytekitplugins_actor.local as local

        self.local = local
        self.real = local.run_literals_on_replica
        self.answer = LiteralMap({"o0": Literal(scalar=Scalar(primitive=Primitive(integer=2)))})
        super().__init__("wf_actor", warmup)

    def run(self, n: int) -> List[float]:
        self.local.run_literals_on_replica = lambda task, inputs, *a, **k: self.answer
        try:
            times = []
            for _ in range(n):
                t = time.perf_counter()
                assert self.task(x=1) == 2
                times.append(time.perf_counter() - t)
            return times
        finally:
            self.local.run_literals_on_replica = self.real


# ---------------------------------------------------------------- (b) the worker's path: a replica over its protocol
class Worker:
    """A replica started by the local backend, driven directly with submit + wait of prepared pyflyte-execute args."""

    def __init__(self, tmp: str, warmup: int = 20):
        from flytekitplugins_actor.replica.backend import LocalProcessBackend, ReplicaSpec, ReplicaState
        from flytekitplugins_actor.replica.protocol import ReplicaClient

        token = secrets.token_hex(16)
        spec = ReplicaSpec(
            name="bench-worker",
            token=token,
            env={"PYTHONPATH": os.pathsep.join([HERE, ROOT])},
            cwd=HERE,
            log_dir=os.path.join(tmp, "logs"),
        )
        self.replica = LocalProcessBackend().start(spec)
        assert self.replica.wait_ready(120) is ReplicaState.READY, self.replica.death
        self.client = ReplicaClient(self.replica.address, token)
        self.tmp, self.inputs, self.raw = tmp, write_inputs(tmp), os.path.join(tmp, "raw")
        self.count = 0
        self.in_replica: List[float] = []
        self.run(warmup)
        self.in_replica.clear()

    def run(self, n: int) -> List[float]:
        times = []
        for _ in range(n):
            self.count += 1
            out = os.path.join(self.tmp, f"worker-{self.count}")
            eid = uuid.uuid4().hex
            t = time.perf_counter()
            spec = {"execution_id": eid, "args": execute_args(self.inputs, out, self.raw), "env": IDENTITY}
            _, reply = self.client.pipeline([("submit", spec), ("wait", {"execution_id": eid, "timeout": 60})])
            times.append(time.perf_counter() - t)
            assert reply["state"] == "succeeded", reply
            self.in_replica.append(reply["duration_s"])
        assert read_output(out) == 2
        return times

    def close(self) -> None:
        self.client.close()
        self.replica.terminate(1.0)


# ---------------------------------------------------------------- (c) the in-process flytekit floor
def floor_worker(warmup: int, tmp: str) -> None:
    """Runs in a fresh subprocess: `_execute_task` in this one warm process, N at a time as asked on stdin."""
    os.environ.update(IDENTITY)
    from flytekit.bin.entrypoint import _execute_task

    inputs, raw = write_inputs(tmp), os.path.join(tmp, "raw")
    count = 0

    def run(n: int) -> List[float]:
        nonlocal count
        times = []
        for _ in range(n):
            count += 1
            out = os.path.join(tmp, f"floor-{count}")
            t = time.perf_counter()
            _execute_task(
                inputs=inputs,
                output_prefix=out,
                test=False,
                raw_output_data_prefix=raw,
                resolver=RESOLVER,
                resolver_args=["task-module", "bench_tasks", "task-name", "noop"],
            )
            times.append(time.perf_counter() - t)
        assert read_output(out) == 2
        return times

    run(warmup)
    print("READY", flush=True)
    for line in sys.stdin:
        print("RESULT " + json.dumps(run(int(line))), flush=True)


class Floor:
    def __init__(self, tmp: str, warmup: int = 20):
        d = tempfile.mkdtemp(dir=tmp, prefix="floor-")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--floor-worker", str(warmup), d],
            env=sub_env(),
            cwd=HERE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read("READY")

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"floor subprocess exited with {self.proc.wait()}")

    def run(self, n: int) -> List[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def bench_interleaved(n: int, fresh_n: int, rounds: int, tmp: str, headline_only: bool = False) -> Dict[str, object]:
    """Every path in alternating rounds, so the machine's noise hits all of them alike."""
    paths: Dict[str, object] = {
        "wf_actor": Workflow("wf_actor"),
        "wf_plain": Workflow("wf_plain"),
        "fresh": Fresh(tmp),
    }
    if not headline_only:
        paths.update(floor=Floor(tmp), warm=Warm(), worker=Worker(tmp), plain=Plain(), machinery=Machinery())
    samples: Dict[str, List[float]] = {k: [] for k in paths}
    try:
        for r in range(rounds):
            per_round = n // rounds + (1 if r < n % rounds else 0)
            for name, path in paths.items():
                k = fresh_n // rounds + (1 if r < fresh_n % rounds else 0) if name == "fresh" else per_round
                samples[name] += path.run(k)
    finally:
        for path in paths.values():
            if hasattr(path, "close"):
                path.close()
    out: Dict[str, object] = {name: summary(samples[name]) for name in paths}
    out["wf_actor"] = {"cold": paths["wf_actor"].cold, **out["wf_actor"]}
    if not headline_only:
        out["warm"] = {"cold": paths["warm"].cold, **out["warm"]}
        out["worker"] = {"round_trip": out["worker"], "in_replica": summary(paths["worker"].in_replica)}
    return out


def bench_tmpfs(n: int, fresh_n: int, rounds: int) -> Optional[Dict[str, object]]:
    """The headline measured again by a child driver whose temp dir (and so its replicas') is tmpfs."""
    if not os.path.isdir("/dev/shm"):
        return None
    env = {**os.environ, "TMPDIR": "/dev/shm", "PYTHONPATH": os.pathsep.join([HERE, ROOT])}
    args = [sys.executable, os.path.abspath(__file__), "--headline-json", "--n", str(n), "--fresh", str(fresh_n)]
    proc = subprocess.run(
        args + ["--rounds", str(rounds)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tmpfs child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- (d) a fresh pyflyte-execute process per task
class Fresh:
    def __init__(self, tmp: str):
        self.exe = os.path.join(os.path.dirname(sys.executable), "pyflyte-execute")
        self.tmp, self.inputs, self.raw = tmp, write_inputs(tmp), os.path.join(tmp, "raw")
        self.count = 0

    def run(self, n: int) -> List[float]:
        times = []
        for _ in range(n):
            self.count += 1
            out = os.path.join(self.tmp, f"fresh-{self.count}")
            t = time.perf_counter()
            proc = subprocess.run(
                [self.exe, *execute_args(self.inputs, out, self.raw)[1:]],
                env=sub_env(),
                cwd=HERE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=120,
            )
            times.append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise RuntimeError(f"pyflyte-execute failed: {proc.stderr.decode()[-2000:]}")
            assert read_output(out) == 2
        return times


def bench_fresh(n: int, tmp: str) -> Dict[str, float]:
    return summary(Fresh(tmp).run(n))


# ---------------------------------------------------------------- (e) map throughput
def bench_map(items: int, reps: int) -> Dict[str, Dict[str, float]]:
    """Items/s of one map call; the four variants alternate, rep after rep."""
    from bench_tasks import noop, noop2, sleepy, sleepy2

    import flytekitplugins_actor as fa

    variants = [
        ("trivial, 1 replica", noop, items),
        ("trivial, 2 replicas", noop2, items),
        ("20 ms task, 1 replica", sleepy, items // 4),
        ("20 ms task, 2 replicas", sleepy2, items // 4),
    ]
    mapped = {label: fa.map(task) for label, task, _ in variants}
    for label, _, n in variants:  # warm-up: starts the replicas
        assert mapped[label](x=list(range(n))) == [v + 1 for v in range(n)]
    rates: Dict[str, List[float]] = {label: [] for label, _, _ in variants}
    for _ in range(reps):
        for label, _, n in variants:
            values = list(range(n))
            t = time.perf_counter()
            out = mapped[label](x=values)
            rates[label].append(n / (time.perf_counter() - t))
            assert out == [v + 1 for v in values]
    return {label: {**summary(rates[label]), "items": n} for label, _, n in variants}


# ---------------------------------------------------------------- report
def headline(r: Dict[str, object], tmpfs: Optional[Dict[str, object]]) -> str:
    """The table users care about: the actor workflow against the plain one, default temp dir first."""

    def cell(d: Optional[Dict[str, object]], key: str) -> str:
        if d is None:
            return "n/a"
        s = d[key]
        return f"{fmt_s(s['median'])} ({fmt_s(s['p10'])} .. {fmt_s(s['p90'])})"

    def ratios(d: Dict[str, object]) -> Dict[str, float]:
        actor, plain, fresh = d["wf_actor"]["median"], d["wf_plain"]["median"], d["fresh"]["median"]
        return {"actor_over_plain": actor / plain, "fresh_over_warm": fresh / actor}

    rr, rt = ratios(r), (ratios(tmpfs) if tmpfs else None)
    lines = [
        "| measurement | default temp dir: median (p10 .. p90) | tmpfs (extra) |",
        "|---|---:|---:|",
        f"| workflow with one actor task, warm, per call | {cell(r, 'wf_actor')} | {cell(tmpfs, 'wf_actor')} |",
        f"| same workflow with a plain @task, per call | {cell(r, 'wf_plain')} | {cell(tmpfs, 'wf_plain')} |",
        f"| fresh pyflyte-execute process per task | {cell(r, 'fresh')} | {cell(tmpfs, 'fresh')} |",
        f"| first actor workflow call (cold: replica start) | {fmt_s(r['wf_actor']['cold'])} | "
        f"{fmt_s(tmpfs['wf_actor']['cold']) if tmpfs else 'n/a'} |",
        "",
        "| ratio | default temp dir | tmpfs (extra) | goal | met (default) |",
        "|---|---:|---:|---|---|",
    ]
    for key, name, goal, ok in (
        (
            "actor_over_plain",
            "actor workflow / plain workflow",
            f"<= {GOAL_ACTOR_OVER_PLAIN_WF:g}x",
            rr["actor_over_plain"] <= GOAL_ACTOR_OVER_PLAIN_WF,
        ),
        (
            "fresh_over_warm",
            "fresh process / warm actor workflow",
            f">= {GOAL_FRESH_OVER_WARM:g}x",
            rr["fresh_over_warm"] >= GOAL_FRESH_OVER_WARM,
        ),
    ):
        t = f"{rt[key]:.2f}x" if rt else "n/a"
        lines.append(f"| {name} | {rr[key]:.2f}x | {t} | {goal} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def table(r: Dict[str, object]) -> str:
    rows = [("measurement", "median", "p10 .. p90", "n")]

    def add(name: str, s: Dict[str, float]) -> None:
        rows.append((name, fmt_s(s["median"]), f"{fmt_s(s['p10'])} .. {fmt_s(s['p90'])}", str(s["n"])))

    add("(a) warm actor task called directly (SDK local run path)", r["warm"])
    add("(b) worker path: submit+wait round trip on a replica", r["worker"]["round_trip"])
    add("(b) worker path: time inside the replica", r["worker"]["in_replica"])
    add("(c) in-process flytekit floor (_execute_task)", r["floor"])
    add("    a plain flytekit @task called directly, in-process", r["plain"])
    add("    actor workflow with the replica call stubbed: flytekit's workflow machinery", r["machinery"])
    for label, s in r["map"].items():
        rows.append(
            (
                f"(e) map throughput, {label} ({s['items']} items)",
                f"{s['median']:.0f} items/s",
                f"{s['p10']:.0f} .. {s['p90']:.0f}",
                str(s["n"]),
            )
        )
    warm, floor = r["warm"]["median"], r["floor"]["median"]
    worker = r["worker"]["round_trip"]["median"]
    inrep = r["worker"]["in_replica"]["median"]
    m = r["map"]
    ratios = [
        ("warm direct call / floor", warm / floor),
        ("worker round trip / floor", worker / floor),
        ("in-replica / floor", inrep / floor),
        ("map 2 / 1 replicas, trivial", m["trivial, 2 replicas"]["median"] / m["trivial, 1 replica"]["median"]),
        (
            "map 2 / 1 replicas, 20 ms task",
            m["20 ms task, 2 replicas"]["median"] / m["20 ms task, 1 replica"]["median"],
        ),
    ]
    lines = ["| diagnostic | median | p10 .. p90 | n |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows[1:]]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {v:.2f}x |" for name, v in ratios]
    return "\n".join(lines)


def machine() -> str:
    import platform

    import flytekit

    return (
        f"{platform.python_implementation()} {platform.python_version()}, flytekit {flytekit.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )


def demo(n: int, fresh_n: int) -> None:
    """The short cold-vs-warm timing that scripts/demo.sh prints."""
    compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="actor-demo-") as tmp:
        w = Warm(warmup=5)
        warm = {"cold": w.cold, **summary(w.run(n))}
        fresh = bench_fresh(fresh_n, tmp)
    print(f"  same trivial actor task, {n + 6} calls in one driver process:")
    print(f"    first call (cold: starts the replica process) : {fmt_s(warm['cold'])}")
    print(f"    warm call, median of {n:<4}                      : {fmt_s(warm['median'])}")
    print(f"    fresh pyflyte-execute process, median of {fresh_n:<3}  : {fmt_s(fresh['median'])}")
    print(
        f"    => a warm call is {warm['cold'] / warm['median']:.0f}x cheaper than the cold one and "
        f"{fresh['median'] / warm['median']:.0f}x cheaper than a fresh process"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="iterations for (a), (b), (c)")
    p.add_argument("--fresh", type=int, default=10, help="fresh pyflyte-execute processes for (d)")
    p.add_argument("--map-items", type=int, default=200)
    p.add_argument("--map-reps", type=int, default=7)
    p.add_argument("--out", default=os.path.join(HERE, "results", "local.md"))
    p.add_argument("--demo", action="store_true", help="only the quick cold-vs-warm timing")
    p.add_argument("--rounds", type=int, default=10, help="(a), (b), (c) alternate in this many rounds")
    p.add_argument("--no-tmpfs", action="store_true", help="skip the tmpfs column")
    p.add_argument("--floor-worker", nargs=2, metavar=("WARMUP", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--headline-json", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.headline_json:  # the tmpfs child: headline paths only, as one JSON line
        compile_bytecode()
        with tempfile.TemporaryDirectory(prefix="actor-bench-") as tmp:
            print(json.dumps(bench_interleaved(a.n, a.fresh, a.rounds, tmp, headline_only=True)), flush=True)
        return
    if a.floor_worker:
        floor_worker(int(a.floor_worker[0]), a.floor_worker[1])
        return
    if a.demo:
        demo(min(a.n, 50), min(a.fresh, 3))
        return
    compile_bytecode()
    results: Dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="actor-bench-") as tmp:
        print(
            f"actor and plain workflows, (a) warm, (b) worker path, (c) in-process floor: {a.n} each, and "
            f"{a.fresh} fresh processes, interleaved in {a.rounds} rounds "
            f"(default temp dir: {tempfile.gettempdir()}) ...",
            flush=True,
        )
        results.update(bench_interleaved(a.n, a.fresh, a.rounds, tmp))
        print("(e) map throughput ...", flush=True)
        results["map"] = bench_map(a.map_items, a.map_reps)
    tmpfs = None
    if not a.no_tmpfs:
        print("the headline again in a child driver with TMPDIR=/dev/shm (tmpfs) ...", flush=True)
        tmpfs = bench_tmpfs(a.n, a.fresh, a.rounds)
    text = (
        f"Local actor benchmarks ({machine()})\n\n{headline(results, tmpfs)}\n\n"
        f"Diagnostics (default temp dir):\n\n{table(results)}\n"
    )
    print()
    print(text)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(f"(written to {os.path.relpath(a.out)})")


if __name__ == "__main__":
    main()

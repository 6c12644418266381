#!/usr/bin/env python
"""Where a warm actor call's time goes (diagnostic; patches SDK internals at runtime, changes no file).

    .venv/bin/python bench/breakdown_warm.py

1. Splits one warm call of `bench_tasks.noop` from the driver into stages (medians over many calls):
   flytekit's local_execute before ActorTask.execute, run_on_replica before pool.submit, queue -> slot
   dispatch, the slot's round trip to the replica (submit + wait, including the execution), waking the
   driver, run_on_replica after the wait, and flytekit after ActorTask.execute.
2. The replica's side of one warm execution, with prepared pyflyte-execute args submitted back to back
   (bench/_probe_worker.py: a worker with timing probes), as is and with its scratch cleanup deferred until
   the replica is idle (what-if).
3. What-if: an `ActorTask.dispatch_execute` that hands flytekit's input LiteralMap straight to the replica and
   returns the replica's output LiteralMap (no native round trip in the driver, loader args cached per task),
   measured against the current path in alternating rounds. It relies on the internals of
   flytekitplugins_actor.local / pool as of this commit; if they change, update or drop this script.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def breakdown(n: int = 300) -> None:
    import flytekitplugins_actor.local as L
    from flytekitplugins_actor.pool import Execution, ReplicaPool
    from bench_tasks import noop

    cur = {}
    orig_run, orig_submit, orig_wait = L.run_on_replica, ReplicaPool.submit, Execution.wait

    def run_on_replica(task, inputs):
        cur.clear()
        cur["enter"] = time.monotonic()
        r = orig_run(task, inputs)
        cur["exit"] = time.monotonic()
        return r

    def submit(self, spec, want_exception=False):
        cur["submit"] = time.monotonic()
        cur["e"] = e = orig_submit(self, spec, want_exception)
        return e

    def wait(self, timeout=None):
        r = orig_wait(self, timeout)
        cur["woke"] = time.monotonic()
        return r

    L.run_on_replica, ReplicaPool.submit, Execution.wait = run_on_replica, submit, wait
    try:
        for i in range(30):
            noop(x=i)
        rows = []
        for i in range(n):
            t0 = time.monotonic()
            noop(x=i)
            t1 = time.monotonic()
            e = cur["e"]
            rows.append({
                "total": t1 - t0,
                "flytekit before ActorTask.execute": cur["enter"] - t0,
                "run_on_replica before pool.submit": cur["submit"] - cur["enter"],
                "queue -> slot dispatch": e.started_at - e.queued_at,
                "slot round trip (submit+wait, incl. execution)": e.finished_at - e.started_at,
                "driver wake-up": cur["woke"] - e.finished_at,
                "run_on_replica after the wait": cur["exit"] - cur["woke"],
                "flytekit after ActorTask.execute": t1 - cur["exit"],
            })
    finally:
        L.run_on_replica, ReplicaPool.submit, Execution.wait = orig_run, orig_submit, orig_wait
    print(f"warm call of an actor task from the driver, medians of {n}:")
    for k in rows[0]:
        print(f"  {k:48s} {statistics.median(r[k] for r in rows) * 1e3:7.3f} ms")


def replica_breakdown(idle_cleanup: bool, n: int = 300) -> dict:
    import json
    import secrets
    import subprocess

    import bench_local as b
    from flytekitplugins_actor.replica.protocol import ReplicaClient

    token = secrets.token_hex(8)
    r, w = os.pipe()
    env = {**os.environ, "FLYTE_ACTOR_TOKEN": token, "PYTHONPATH": os.pathsep.join([HERE, b.ROOT]),
           "PROBE_IDLE_CLEANUP": "1" if idle_cleanup else "0"}
    tmp = tempfile.mkdtemp(prefix="actor-probe-")
    with open(os.path.join(tmp, "replica.log"), "w") as log:
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "_probe_worker.py"), "--host", "127.0.0.1", "--port", "0",
                              "--name", "probe", "--ready-fd", str(w)], pass_fds=(w,), env=env, cwd=HERE, stdout=log,
                             stderr=subprocess.STDOUT)
    os.close(w)
    with os.fdopen(r) as ready:
        port = json.loads(ready.readline())["port"]
    client = ReplicaClient(f"127.0.0.1:{port}", token)
    inputs, raw = b.write_inputs(tmp), os.path.join(tmp, "raw")
    warmup, marks = 30, []
    for i in range(warmup + n):
        eid, out = uuid.uuid4().hex, os.path.join(tmp, f"o{i}")
        t0 = time.monotonic()
        client.request("submit", execution_id=eid, args=b.execute_args(inputs, out, raw), env=b.IDENTITY)
        client.request("wait", execution_id=eid)
        marks.append((t0, time.monotonic()))
    T = client.request("timings")["timings"]
    client.close()
    p.terminate()
    p.wait(10)
    rows = []
    for i in range(warmup, warmup + n - 1):  # the last one's cleanup may not have run yet
        t0, t2 = marks[i]
        rows.append({
            "client round trip": t2 - t0,
            "client -> op_submit": T["submit.in"][i] - t0,
            "op_submit -> main thread dequeues": T["dequeued"][i] - T["submit.out"][i],
            "  (previous cleanup still running then)": max(0.0, T["cleanup.out"][i - 1] - T["submit.out"][i]),
            "execution (run_deferred)": T["run.out"][i] - T["run.in"][i],
            "run end -> wait reply leaves": T["wait.out"][i] - T["run.out"][i],
            "wait reply -> client": t2 - T["wait.out"][i],
            "cleanup, when run inline": T["cleanup.out"][i] - T["cleanup.in"][i],
        })
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def what_if_passthrough(rounds: int = 10, n: int = 200) -> None:
    from flyteidl.core import literals_pb2

    from flytekit.core.utils import load_proto_from_file, write_proto_to_file
    from flytekit.models.literals import LiteralMap

    import flytekitplugins_actor.local as L
    from flytekitplugins_actor.pool import ExecutionState
    from flytekitplugins_actor.replica.execution import ExecutionSpec
    from flytekitplugins_actor.task import ActorTask
    from bench_tasks import noop

    work = tempfile.mkdtemp(prefix="actor-whatif-")
    loaders = {}
    orig = ActorTask.dispatch_execute

    def dispatch_execute(self, ctx, input_literal_map):
        if not ctx.execution_state.is_local_execution():
            return orig(self, ctx, input_literal_map)
        pool = L.local_pools().pool_for(self.task_config, L._module_root(self))
        eid = uuid.uuid4().hex
        inputs_path, out = os.path.join(work, eid + ".pb"), os.path.join(work, eid)
        write_proto_to_file(input_literal_map.to_flyte_idl(), inputs_path)
        if self not in loaders:
            loaders[self] = L._loader(self, work)
        resolver, loader_args = loaders[self]
        args = ["pyflyte-execute", "--inputs", inputs_path, "--output-prefix", out,
                "--raw-output-data-prefix", ctx.file_access.raw_output_prefix, "--resolver", resolver, "--", *loader_args]
        e = pool.submit(ExecutionSpec("local-" + eid, args, L.identity_env(self)), want_exception=True)
        e.wait()
        pool.forget(e.id)
        assert e.state is ExecutionState.SUCCEEDED, e.error
        lm = LiteralMap.from_flyte_idl(load_proto_from_file(literals_pb2.LiteralMap, os.path.join(out, "outputs.pb")))
        os.remove(inputs_path)
        os.remove(os.path.join(out, "outputs.pb"))
        os.rmdir(out)
        return lm

    for i in range(30):
        assert noop(x=i) == i + 1
    res = {"current path": [], "literal pass-through": []}
    try:
        for r in range(rounds):
            mode = list(res)[r % 2]
            ActorTask.dispatch_execute = dispatch_execute if r % 2 else orig
            ts = []
            for i in range(n):
                t = time.perf_counter()
                assert noop(x=i) == i + 1
                ts.append(time.perf_counter() - t)
            res[mode].append(statistics.median(ts))
    finally:
        ActorTask.dispatch_execute = orig
    print(f"what-if, medians of {n} calls per round, alternating rounds:")
    for k, v in res.items():
        print(f"  {k:22s} median {statistics.median(v) * 1e3:.2f} ms   (rounds: {' '.join(f'{x * 1e3:.2f}' for x in v)})")


if __name__ == "__main__":
    breakdown()
    print()
    print("replica side, back-to-back executions over the control protocol, medians of 300 (as is | idle cleanup):")
    runs = [replica_breakdown(False), replica_breakdown(True), replica_breakdown(False), replica_breakdown(True)]
    for k in runs[0]:
        a = statistics.median([runs[0][k], runs[2][k]])
        b_ = statistics.median([runs[1][k], runs[3][k]])
        print(f"  {k:42s} {a * 1e3:7.3f} ms | {b_ * 1e3:7.3f} ms")
    print()
    what_if_passthrough()

"""Benchmarks the actor connector through a real `pyflyte serve connector` over gRPC, as propeller drives it.

1. warm create -> SUCCEEDED latency (p50/p90) with tight GetTask polling, one warm replica;
2. map throughput, 1,000 trivial items, over 1 and 2 replicas;
3. connector RSS with 10,000 executions queued behind one blocked replica.

    .venv/bin/python bench/bench_connector.py [--runs 300] [--items 1000] [--queued 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "connector"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import actor_tasks as t  # noqa: E402
from harness import PHASE, TERMINAL, Attempt, ConnectorServer, Propeller, literal_map  # noqa: E402
from table import WAIT_S, percentile, print_rows  # noqa: E402
from waiting import wait_until  # noqa: E402

from flytekitplugins_actor.actor_map import map as actor_map  # noqa: E402


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_latency(propeller: Propeller, base: str, runs: int) -> dict:
    attempts = [Attempt(base, t.inc1, literal_map(t.inc1, x=i)) for i in range(runs + 20)]
    create_s, total_s = [], []
    for i, a in enumerate(attempts):
        req = a.request()
        t0 = time.perf_counter()
        meta = propeller.server.stub.CreateTask(req, timeout=10).resource_meta
        t1 = time.perf_counter()
        r = propeller.wait(meta, timeout=WAIT_S, interval=POLL_S)
        t2 = time.perf_counter()
        assert r.phase == PHASE.SUCCEEDED, r.message
        if i >= 20:  # the first ones warm the replica and the connector
            create_s.append(t1 - t0)
            total_s.append(t2 - t0)
    return {
        "create_p50_ms": percentile(create_s, 50) * 1e3,
        "p50_ms": percentile(total_s, 50) * 1e3,
        "p90_ms": percentile(total_s, 90) * 1e3,
    }


def bench_in_process(base: str, runs: int) -> float:
    """The same warm path without gRPC: ActorService.create + polling the execution (the connector's floor)."""
    from flytekit.models.literals import LiteralMap
    from flytekit.models.task import TaskExecutionMetadata, TaskTemplate

    from plugin_backend.pools import PoolManager
    from plugin_backend.service import ActorService

    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests", "connector"), ROOT])
    svc = ActorService(PoolManager(state_dir=os.path.join(base, "inproc-state")))
    total = []
    try:
        for i in range(runs + 20):
            req = Attempt(base, t.inc1, literal_map(t.inc1, x=i)).request()
            t0 = time.perf_counter()
            meta = svc.create(
                TaskTemplate.from_flyte_idl(req.template),
                req.output_prefix,
                LiteralMap.from_flyte_idl(req.inputs),
                TaskExecutionMetadata.from_flyte_idl(req.task_execution_metadata),
                "actor",
            )
            while svc.get(meta).phase not in TERMINAL:
                time.sleep(POLL_S)
            if i >= 20:
                total.append(time.perf_counter() - t0)
    finally:
        svc.shutdown()
    return percentile(total, 50) * 1e3


def bench_map(propeller: Propeller, base: str, task, items: int) -> float:
    m = actor_map(task)
    warm = Attempt(base, m, literal_map(m, x=list(range(50))))
    assert propeller.wait(propeller.create(warm), "actor_map", WAIT_S, interval=0.0).phase == PHASE.SUCCEEDED
    a = Attempt(base, m, literal_map(m, x=list(range(items))))
    t0 = time.perf_counter()
    r = propeller.wait(propeller.create(a), "actor_map", WAIT_S, interval=0.05)
    elapsed = time.perf_counter() - t0
    assert r.phase == PHASE.SUCCEEDED, r.message
    return items / elapsed


def warm_two_replicas(propeller: Propeller, base: str) -> None:
    import functools

    gate, counter = os.path.join(base, "gate2"), os.path.join(base, "count2")
    m = actor_map(functools.partial(t.square, counter=counter, gate=gate))
    a = Attempt(base, m, literal_map(m, x=[100, 101]))
    meta = propeller.create(a)
    wait_until(lambda: os.path.exists(counter) and len(open(counter).read().splitlines()) == 2, 60, "two replicas")
    open(gate, "w").close()
    assert propeller.wait(meta, "actor_map", WAIT_S, interval=0.0).phase == PHASE.SUCCEEDED


def bench_queued_rss(server: ConnectorServer, propeller: Propeller, base: str, queued: int) -> dict:
    gate = os.path.join(base, "gate-rss")
    blocker = Attempt(base, t.wait_for_file, literal_map(t.wait_for_file, path=gate, counter="", label="blocker"))
    meta = propeller.create(blocker)
    propeller.wait(meta, phases={PHASE.RUNNING})
    before = _rss_mb(server.proc.pid)
    t0 = time.perf_counter()
    for i in range(queued):
        a = Attempt(base, t.inc1, literal_map(t.inc1, x=i), template=None if i == 0 else template_for_inc)
        propeller.create(a)
    elapsed = time.perf_counter() - t0
    after = _rss_mb(server.proc.pid)
    open(gate, "w").close()
    return {
        "rss_before_mb": before,
        "rss_after_mb": after,
        "per_execution_kb": (after - before) * 1024 / queued,
        "creates_per_s": queued / elapsed,
    }


template_for_inc = None
POLL_S = float(os.environ.get("BENCH_POLL_S", "0.0005"))


def main() -> None:
    global template_for_inc
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=10000)
    args = parser.parse_args()
    from harness import serialize

    template_for_inc = serialize(t.inc1)
    work = tempfile.mkdtemp(prefix="bench-connector-")
    server = ConnectorServer(os.path.join(work, "connector")).start()
    propeller = Propeller(server)
    base = os.path.join(work, "runs")
    try:
        lat = bench_latency(propeller, base, args.runs)
        floor = bench_in_process(base, min(args.runs, 200))
        one = bench_map(propeller, base, t.inc1, args.items)
        warm_two_replicas(propeller, base)
        two = bench_map(propeller, base, t.inc2, args.items)
        rss = bench_queued_rss(server, propeller, base, args.queued)
    finally:
        server.stop()
    rows = [
        ("warm create->SUCCEEDED p50 (gRPC, tight GetTask)", f"{lat['p50_ms']:.2f} ms", "goal <= 5 ms"),
        ("warm create->SUCCEEDED p90", f"{lat['p90_ms']:.2f} ms", ""),
        ("CreateTask p50", f"{lat['create_p50_ms']:.2f} ms", ""),
        ("warm create->SUCCEEDED p50, in process (no gRPC)", f"{floor:.2f} ms", "the connector's floor"),
        (f"map {args.items} items, 1 replica", f"{one:.0f} items/s", ""),
        (
            f"map {args.items} items, 2 replicas",
            f"{two:.0f} items/s",
            f"goal >= 1,000 (issue 10); x{two / one:.2f} vs 1 replica",
        ),
        (
            f"connector RSS, {args.queued} queued",
            f"{rss['rss_after_mb']:.0f} MB",
            f"{rss['rss_before_mb']:.0f} MB before; "
            f"{rss['per_execution_kb']:.1f} KB/execution; {rss['creates_per_s']:.0f} creates/s",
        ),
    ]
    print_rows(rows)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Moving a big value between two tasks: `list[float]` of 1M items from one task to the next, in a workflow run
locally, actor tasks against plain flytekit tasks (issue 9's "done when": actors cost at most 2x plain).

    .venv/bin/python bench/bench_transfer.py [--n 1000000] [--reps 1]

Each measurement is a fresh driver process (so peak RSS is its own), the variants alternating rep after rep; the
actor driver first runs the workflow once with a tiny n, so the replica is warm and its start is not counted.
Reported: wall time of the workflow call, and peak RSS (VmHWM) of the driver plus, for actors, its replica.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOAL = 2.0


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(variant: str, n: int) -> None:
    """One measurement in this (fresh) driver process; prints one JSON line."""
    sys.path.insert(0, HERE)
    import bench_tasks

    wf = getattr(bench_tasks, f"wf_floats_{variant}")
    if variant == "actor":
        assert wf(n=3) == 3.0  # starts and warms the replica
    t = time.perf_counter()
    total = wf(n=n)
    seconds = time.perf_counter() - t
    assert total == n * (n - 1) / 2, total
    replicas = 0.0
    if variant == "actor":
        from flytekitplugins_actor.local import local_pools

        replicas = sum(peak_rss_mb(r.pid) for p in local_pools().pools() for r in p.replicas)
    print(json.dumps({"seconds": seconds, "driver_mb": peak_rss_mb(os.getpid()), "replicas_mb": replicas}))


def measure(variant: str, n: int) -> Dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, ROOT])}
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", variant, "--n", str(n)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if p.returncode != 0:
        raise RuntimeError(f"{variant} failed: {p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--child", choices=["actor", "plain"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.n)
        return
    runs: Dict[str, List[Dict[str, float]]] = {"plain": [], "actor": []}
    for r in range(a.reps):
        for variant in ("plain", "actor"):
            print(f"rep {r + 1}/{a.reps}: {variant} ...", flush=True)
            runs[variant].append(measure(variant, a.n))

    def med(variant: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[variant])

    def rss(variant: str) -> float:
        return statistics.median(x["driver_mb"] + x["replicas_mb"] for x in runs[variant])

    t_ratio = med("actor", "seconds") / med("plain", "seconds")
    m_ratio = rss("actor") / rss("plain")
    print()
    print(f"list[float] of {a.n:,} items from one task to another, in a local workflow ({a.reps} rep(s), medians):")
    print()
    print("| tasks | time | peak RSS (driver + replica) |")
    print("|---|---:|---:|")
    print(f"| plain flytekit | {med('plain', 'seconds'):.2f} s | {rss('plain'):.0f} MB |")
    print(
        f"| actor | {med('actor', 'seconds'):.2f} s | {rss('actor'):.0f} MB "
        f"({med('actor', 'driver_mb'):.0f} + {med('actor', 'replicas_mb'):.0f}) |"
    )
    print(
        f"| actor / plain | {t_ratio:.2f}x (goal <= {GOAL:g}x: {'met' if t_ratio <= GOAL else 'NOT met'}) | "
        f"{m_ratio:.2f}x (goal <= {GOAL:g}x: {'met' if m_ratio <= GOAL else 'NOT met'}) |"
    )


if __name__ == "__main__":
    main()

"""Benchmarks the Kubernetes replica backend through the loopback API stand-in (tests/kube), against the local
backend in the same run, both through a real `pyflyte serve connector` driven over gRPC as propeller drives it.

1. cold first execution on the kubernetes backend: CreateTask -> pod created -> ready -> SUCCEEDED;
2. warm create -> SUCCEEDED p50 on a warm replica pod vs a warm local replica (goal: within 1.5x);
3. pods created for 100 executions queued at once on a 2-replica environment (goal: 2);
4. API requests per replica per minute while idle (goal: <= 1, thanks to the watch).

The stand-in's pods are local processes, so this measures the backend's own overhead (API round trips, watch
latency, pod start without image pull or scheduling), not a cluster's.

    .venv/bin/python bench/bench_kubernetes.py [--runs 200] [--executions 100] [--idle-s 60]
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
from harness import PHASE, Attempt, ConnectorServer, Propeller, literal_map  # noqa: E402
from kube import NAMESPACE, standin  # noqa: E402
from table import WAIT_S, percentile, print_rows  # noqa: E402

POLL_S = float(os.environ.get("BENCH_POLL_S", "0.0005"))
WATCH_TIMEOUT_S = 300  # KubernetesBackend.watch_timeout_s


def cold_first(propeller: Propeller, base: str) -> float:
    a = Attempt(base, t.inc1, literal_map(t.inc1, x=0))
    t0 = time.perf_counter()
    r = propeller.wait(propeller.create(a), timeout=WAIT_S, interval=0.01)
    assert r.phase == PHASE.SUCCEEDED, r.message
    return time.perf_counter() - t0


def warm_p50(propeller: Propeller, base: str, runs: int) -> float:
    total = []
    for i in range(runs + 10):
        a = Attempt(base, t.inc1, literal_map(t.inc1, x=i))
        req = a.request()
        t0 = time.perf_counter()
        meta = propeller.server.stub.CreateTask(req, timeout=10).resource_meta
        r = propeller.wait(meta, timeout=WAIT_S, interval=POLL_S)
        assert r.phase == PHASE.SUCCEEDED, r.message
        if i >= 10:
            total.append(time.perf_counter() - t0)
    return percentile(total, 50) * 1e3


def pods_for_executions(cluster, propeller: Propeller, base: str, n: int) -> tuple:
    before = cluster.requests[("create", "pods")]
    metas = [propeller.create(Attempt(base, t.inc2, literal_map(t.inc2, x=i))) for i in range(n)]
    for meta in metas:
        r = propeller.wait(meta, timeout=WAIT_S, interval=0.01)
        assert r.phase == PHASE.SUCCEEDED, r.message
    pods = cluster.pods(NAMESPACE, "flyte-actor/env=conn-map")
    return cluster.requests[("create", "pods")] - before, len(pods)


def idle_requests(cluster, seconds: float) -> tuple:
    replicas = len(cluster.pods())
    before = dict(cluster.requests)
    time.sleep(seconds)  # a measurement window, not synchronisation
    by_verb = {f"{v} {r}": n - before.get((v, r), 0) for (v, r), n in cluster.requests.items()}
    by_verb = {k: n for k, n in sorted(by_verb.items()) if n}
    return sum(by_verb.values()), replicas, by_verb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--executions", type=int, default=100)
    parser.add_argument("--idle-s", type=float, default=60.0)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-kubernetes-")
    cluster = standin(os.path.join(work, "cluster"), image_paths=(os.path.join(ROOT, "tests", "connector"), ROOT))
    k8s = ConnectorServer(
        os.path.join(work, "k8s"), env={"FLYTE_ACTOR_BACKEND": "kubernetes", "KUBECONFIG": cluster.kubeconfig}
    ).start()
    local = ConnectorServer(os.path.join(work, "local"), env={"FLYTE_ACTOR_BACKEND": "local"}).start()
    pk, pl = Propeller(k8s), Propeller(local)
    base = os.path.join(work, "runs")
    try:
        cold_k8s = cold_first(pk, base)
        cold_local = cold_first(pl, base)
        warm_k8s = warm_p50(pk, base, args.runs)
        warm_local = warm_p50(pl, base, args.runs)
        created, live = pods_for_executions(cluster, pk, base, args.executions)
        made, replicas, by_verb = idle_requests(cluster, args.idle_s)
    finally:
        k8s.stop()
        local.stop()
        cluster.stop()
    per_min = made / max(1, replicas) / (args.idle_s / 60)
    rows = [
        ("cold first execution, kubernetes (pod create->ready->done)", f"{cold_k8s * 1e3:.0f} ms", ""),
        ("cold first execution, local backend", f"{cold_local * 1e3:.0f} ms", "same run"),
        ("warm create->SUCCEEDED p50, kubernetes", f"{warm_k8s:.2f} ms", f"{args.runs} runs, tight GetTask"),
        ("warm create->SUCCEEDED p50, local backend", f"{warm_local:.2f} ms", "same run"),
        ("ratio kubernetes / local (warm p50)", f"x{warm_k8s / warm_local:.2f}", "goal <= 1.5"),
        (f"pods created for {args.executions} executions, 2-replica env", f"{created}", f"goal 2; {live} live"),
        (
            "API requests per replica per minute, idle",
            f"{per_min:.2f}",
            f"goal <= 1; {made} requests in {args.idle_s:.0f} s ({by_verb or 'none'}), {replicas} replica pods; "
            f"steady state: one watch per namespace re-opened every {WATCH_TIMEOUT_S} s",
        ),
    ]
    print_rows(rows)


if __name__ == "__main__":
    main()

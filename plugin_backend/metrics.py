"""Prometheus metrics of the actor connector, served by `pyflyte serve connector` on its prometheus port.

Pool gauges are read from the pools at scrape time (no bookkeeping on the hot path); dispatch latency is a
histogram observed as each execution finishes.
"""

from __future__ import annotations

import weakref
from typing import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "flyte_actor_"

DISPATCH_LATENCY = Histogram(
    f"{PREFIX}dispatch_latency_seconds",
    "Time from an execution's arrival in its pool to its dispatch to a replica",
    ["env"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


SYNC_OVERRUNS = Counter(
    f"{PREFIX}sync_overruns",
    "actor_sync executions cancelled at the end of their budget (answered RETRYABLE_FAILED), by reason",
    ["env", "reason"],
)


def observe_done(execution) -> None:
    """on_done callback: records the queue wait of an execution that reached a replica."""
    if execution.started_at is not None:
        env = (execution.replica or "").rsplit("-", 1)[0]
        DISPATCH_LATENCY.labels(env=env).observe(execution.started_at - execution.queued_at)


class PoolCollector:
    """Queue depth, pool sizes, busy/idle/starting replicas, warm vs cold dispatches and replica deaths per pool."""

    def __init__(self, service) -> None:
        self._service = weakref.ref(service)

    def collect(self) -> Iterator:
        service = self._service()
        queued = GaugeMetricFamily(f"{PREFIX}queue_depth", "Executions waiting for a replica", labels=["env", "pool"])
        size = GaugeMetricFamily(f"{PREFIX}pool_size", "Configured replicas of a pool", labels=["env", "pool"])
        replicas = GaugeMetricFamily(f"{PREFIX}replicas", "Replicas by state", labels=["env", "pool", "state"])
        pools = GaugeMetricFamily(f"{PREFIX}pools", "Live pools")
        dispatches = CounterMetricFamily(
            f"{PREFIX}dispatches", "Dispatches to a replica, warm or cold (its first)", labels=["env", "pool", "kind"]
        )
        deaths = CounterMetricFamily(
            f"{PREFIX}replica_deaths", "Replicas that died (crash, signal, OOM, lost pod)", labels=["env", "pool"]
        )
        executions = GaugeMetricFamily(f"{PREFIX}executions_tracked", "Executions the connector answers from memory")
        live = service.manager.pools() if service is not None else []
        for p in live:
            s = p.stats()
            queued.add_metric([p.name, p.key], s["queued"])
            size.add_metric([p.name, p.key], p.size)
            for state in ("starting", "busy", "idle"):
                replicas.add_metric([p.name, p.key, state], s[state])
            dispatches.add_metric([p.name, p.key, "warm"], s["warm"])
            dispatches.add_metric([p.name, p.key, "cold"], s["cold"])
            deaths.add_metric([p.name, p.key], s["deaths"])
        pools.add_metric([], len(live))
        executions.add_metric([], service.entries() if service is not None else 0)
        yield from (queued, size, replicas, pools, dispatches, deaths, executions)


_registered = False


def register(service) -> None:
    global _registered
    if not _registered:
        REGISTRY.register(PoolCollector(service))
        _registered = True

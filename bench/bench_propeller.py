"""What a user on a real propeller 1.16.8 waits for an actor task: the connector driven as propeller drives it.

Propeller's connector plugin (flyteplugins webapi) sees an async task done only when its auto-refresh cache polls
it (GetTask right after CreateTask, then one per `webApi.caching.resyncInterval`: 30 s default, 5 s minimum) *and*
the workflow is evaluated again (`propeller.workflow-reeval-duration`, 10 s default; web-API plugins never
re-queue the workflow). The next node of a chain starts in that round. A sync task (`actor_sync`) is one
ExecuteTaskSync call inside the round that starts it; a terminal answer finishes the node in that same round.

The bench drives a real `pyflyte serve connector` with flyteidl's stubs (args rendered, header-then-inputs
ExecuteTaskSync streams) and measures every call. Waiting out 30 s intervals for real would take minutes per
row, so the long intervals are modelled arithmetically from the measured per-call costs and completion times:

    poll k (k = 0, 1, ...) answers at  create + k * resync + get        (k = 0 is the GetTask right after create)
    the first poll answering SUCCEEDED is acted on at the next evaluation round j * reeval (j >= 1)

and the model is checked against a real drive at scaled-down intervals (timers, not arithmetic) in the same run.
It reports, for the seeds' 4-task plus_one chain and a 100-item actor_map: async at propeller's defaults, async
at the minimum intervals, and sync; plus the warm ExecuteTaskSync round trip p50 against the async
create -> SUCCEEDED with a tight GetTask poll.

    .venv/bin/python bench/bench_propeller.py [--runs 200] [--chains 10] [--maps 3] [--items 100]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path[:0] = [BENCH, os.path.join(ROOT, "tests", "connector"), os.path.join(ROOT, "tests")]

import propeller_tasks as pt  # noqa: E402
from harness import PHASE, TERMINAL, Attempt, ConnectorServer, Propeller, literal_map  # noqa: E402

from flytekitplugins_actor.actor_map import map as actor_map  # noqa: E402

DEFAULTS = (30.0, 10.0)  # webApi.caching.resyncInterval, propeller.workflow-reeval-duration
MINIMUM_RESYNC = (5.0, 10.0)  # resyncInterval's enforced minimum, reeval at its default
MINIMUM = (5.0, 5.0)  # both at 5 s (any reeval <= 5 s dividing 5 s gives the same figures)


@dataclass
class AsyncTrace:
    """One async task as the connector served it, times in seconds from the start of its CreateTask."""

    create: float  # CreateTask round trip
    get: float  # one GetTask round trip (median of the polls)
    done: float  # when GetTask first answered a terminal phase (tight polling)


def noticed(trace: AsyncTrace, resync: float, reeval: float, phase: float) -> float:
    """When propeller acts on the task's SUCCEEDED, from the start of the round that created it: the GetTask
    right after CreateTask, else the cache's poll at `phase` + k * resync (its ticker is not aligned with the
    create: 0 < phase <= resync), seen at the next evaluation round j * reeval (j >= 1)."""
    if trace.done <= trace.create + trace.get:
        seen = trace.create + trace.get  # the GetTask right after CreateTask already saw it
    else:
        k = max(0, math.ceil((trace.done - phase) / resync))
        seen = phase + k * resync + trace.get
    return max(1, math.ceil(seen / reeval - 1e-9)) * reeval


PHASES = 100


def expected_noticed(trace: AsyncTrace, resync: float, reeval: float) -> float:
    """`noticed` averaged over the cache ticker's phase (uniform over (0, resync])."""
    return statistics.fmean(noticed(trace, resync, reeval, resync * (i + 1) / PHASES) for i in range(PHASES))


POLL_S = 0.0005
"""Sleep between the tight GetTasks: back-to-back polls would compete with the replica for the 2 cores."""


def run_async(propeller: Propeller, attempt: Attempt, task_type: str = "actor") -> AsyncTrace:
    """CreateTask, then GetTask every POLL_S until terminal: the completion time the model starts from."""
    t0 = time.perf_counter()
    meta = propeller.create(attempt)
    create = time.perf_counter() - t0
    gets = []
    while True:
        g0 = time.perf_counter()
        r = propeller.get(meta, task_type)
        gets.append(time.perf_counter() - g0)
        if r.phase in TERMINAL:
            break
        time.sleep(POLL_S)
    done = time.perf_counter() - t0
    assert r.phase == PHASE.SUCCEEDED, r.message
    return AsyncTrace(create, statistics.median(gets), done)


class SyncStream:
    """ExecuteTaskSync as propeller sends it (header, inputs, close, one answer), over grpc.aio: Python's blocking
    client consumes a stream's request iterator on a thread of its own, ~2.5 ms a call here that propeller's Go
    client does not pay (tests use the blocking client, harness.Propeller.execute_sync)."""

    def __init__(self, port: int):
        import asyncio

        import grpc
        from flyteidl.service import agent_pb2_grpc

        self.loop = asyncio.new_event_loop()

        async def connect():
            return grpc.aio.insecure_channel(f"127.0.0.1:{port}")

        self.channel = self.loop.run_until_complete(connect())
        self.stub = agent_pb2_grpc.SyncAgentServiceStub(self.channel)

    def __call__(self, attempt: Attempt):
        from flyteidl.admin import agent_pb2

        async def call():
            header = agent_pb2.CreateRequestHeader(
                template=attempt.template, output_prefix=attempt.dir, task_execution_metadata=attempt.metadata
            )
            stream = self.stub.ExecuteTaskSync(timeout=60)
            await stream.write(agent_pb2.ExecuteTaskSyncRequest(header=header))
            await stream.write(agent_pb2.ExecuteTaskSyncRequest(inputs=attempt.inputs))
            await stream.done_writing()
            answer = await stream.read()
            return answer.header.resource

        return self.loop.run_until_complete(call())

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()


def run_sync(sync: SyncStream, attempt: Attempt) -> tuple:
    t0 = time.perf_counter()
    r = sync(attempt)
    elapsed = time.perf_counter() - t0
    assert r.phase == PHASE.SUCCEEDED, r.message
    return elapsed, r


def _int_output(outputs) -> int:
    return outputs.literals["o0"].scalar.primitive.integer


def chain_async(propeller: Propeller, base: str) -> List[AsyncTrace]:
    """The seeds' wf: plus_one four times, each fed the previous one's outputs.pb."""
    value, traces = 0, []
    for _ in range(4):
        a = Attempt(base, pt.plus_one, literal_map(pt.plus_one, input=value))
        traces.append(run_async(propeller, a))
        value = _int_output(a.outputs())
    assert value == 4
    return traces


def chain_sync(sync: SyncStream, base: str) -> float:
    value, total = 0, 0.0
    for _ in range(4):
        elapsed, r = run_sync(sync, Attempt(base, pt.plus_one_sync, literal_map(pt.plus_one_sync, input=value)))
        total += elapsed
        value = _int_output(r.outputs)
    assert value == 4
    return total


def chain_async_real(propeller: Propeller, base: str, resync: float, reeval: float, phase: float) -> float:
    """The chain driven with real timers at (scaled-down) intervals, as the model describes it: GetTask right after
    CreateTask, then at `phase` + k * `resync` from the create; a SUCCEEDED is acted on at the next `reeval`
    round, where the next task is created. Returns the measured seconds."""
    value, start = 0, time.perf_counter()
    round_start = start
    for _ in range(4):
        a = Attempt(base, pt.plus_one, literal_map(pt.plus_one, input=value))
        meta = propeller.create(a)
        k = -1
        while propeller.get(meta).phase not in TERMINAL:
            k += 1
            _sleep_until(round_start + phase + k * resync)
        seen = time.perf_counter() - round_start
        round_start += max(1, math.ceil(seen / reeval)) * reeval
        _sleep_until(round_start)
        value = _int_output(a.outputs())
    assert value == 4
    return time.perf_counter() - start


def _sleep_until(t: float) -> None:
    while True:
        left = t - time.perf_counter()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def map_async(propeller: Propeller, base: str, items: int) -> AsyncTrace:
    m = actor_map(pt.plus_one)
    a = Attempt(base, m, literal_map(m, input=list(range(items))))
    trace = run_async(propeller, a, "actor_map")
    assert [lit.scalar.primitive.integer for lit in a.outputs().literals["o0"].collection.literals] == [
        i + 1 for i in range(items)
    ]
    return trace


def _p50(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _fmt(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.1f} s"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="warm round trips per path for the p50s")
    parser.add_argument("--chains", type=int, default=10, help="plus_one chains per path")
    parser.add_argument("--maps", type=int, default=3, help="100-item maps")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument(
        "--scratch", choices=("disk", "tmpfs"), default="disk", help="replica scratch (FLYTE_ACTOR_REPLICA_TMPDIR)"
    )
    parser.add_argument("--scaled-resync", type=float, default=0.5, help="resync of the real-timer check (s)")
    parser.add_argument("--scaled-reeval", type=float, default=0.2, help="reeval of the real-timer check (s)")
    args = parser.parse_args(argv)

    base = tempfile.mkdtemp(prefix="bench-propeller-")
    env = {"PYTHONPATH": os.pathsep.join([BENCH, os.path.join(ROOT, "tests", "connector"), ROOT])}
    if args.scratch == "tmpfs":
        env["FLYTE_ACTOR_REPLICA_TMPDIR"] = "/dev/shm"
    server = ConnectorServer(os.path.join(base, "connector"), env=env).start()
    propeller, sync = Propeller(server), SyncStream(server.port)
    try:
        # warm the pool (one replica, shared by both paths) and the connector's code paths
        for i in range(20):
            run_async(propeller, Attempt(base, pt.plus_one, literal_map(pt.plus_one, input=i)))
            run_sync(sync, Attempt(base, pt.plus_one_sync, literal_map(pt.plus_one_sync, input=i)))

        # 1. warm round trips, interleaved so both see the same machine load
        sync_rt, async_rt = [], []
        for i in range(args.runs):
            sync_attempt = Attempt(base, pt.plus_one_sync, literal_map(pt.plus_one_sync, input=i))
            sync_rt.append(run_sync(sync, sync_attempt)[0])
            async_rt.append(run_async(propeller, Attempt(base, pt.plus_one, literal_map(pt.plus_one, input=i))).done)

        # 2. the chain and the map
        chains = [chain_async(propeller, base) for _ in range(args.chains)]
        sync_chains = [chain_sync(sync, base) for _ in range(args.chains)]
        maps = [map_async(propeller, base, args.items) for _ in range(args.maps)]

        # 3. the model against real timers at scaled-down intervals
        half = args.scaled_resync / 2
        real = [chain_async_real(propeller, base, args.scaled_resync, args.scaled_reeval, half) for _ in range(3)]
    finally:
        sync.close()
        server.stop()

    def chain_at(resync: float, reeval: float) -> float:
        return _p50([sum(expected_noticed(tr, resync, reeval) for tr in c) for c in chains])

    def map_at(resync: float, reeval: float) -> float:
        return _p50([expected_noticed(tr, resync, reeval) for tr in maps])

    rs, re_, ph = args.scaled_resync, args.scaled_reeval, args.scaled_resync / 2
    predicted = _p50([sum(noticed(tr, rs, re_, ph) for tr in c) for c in chains])

    sync_p50, async_p50 = _p50(sync_rt), _p50(async_rt)
    chain_sync_p50 = _p50(sync_chains)
    chain_defaults = chain_at(*DEFAULTS)
    rows = [
        ("async, propeller defaults", DEFAULTS, chain_defaults, _fmt(map_at(*DEFAULTS))),
        ("async, minimum resync", MINIMUM_RESYNC, chain_at(*MINIMUM_RESYNC), _fmt(map_at(*MINIMUM_RESYNC))),
        ("async, minimum intervals", MINIMUM, chain_at(*MINIMUM), _fmt(map_at(*MINIMUM))),
        ("sync (actor_sync)", None, chain_sync_p50, "n/a: actor_map is async only"),
        (
            "connector alone (tight poll)",
            None,
            _p50([sum(tr.done for tr in c) for c in chains]),
            _fmt(_p50([tr.done for tr in maps])),
        ),
    ]
    lines = [
        f"# Propeller latency model (bench_propeller.py), {time.strftime('%Y-%m-%d %H:%M')}, scratch: {args.scratch}",
        "",
        f"warm ExecuteTaskSync round trip p50: {sync_p50 * 1e3:.2f} ms (goal <= 5 ms)",
        f"warm async create -> SUCCEEDED, tight GetTask poll, p50: {async_p50 * 1e3:.2f} ms",
        f"sync / async-tight ratio: {sync_p50 / async_p50:.2f} (goal <= 1.2)",
        "",
        f"| path | resyncInterval / workflow-reeval | plus_one chain (4 tasks) | {args.items}-item map |",
        "|---|---|---|---|",
    ]
    for name, intervals, chain, map_cell in rows:
        iv = f"{intervals[0]:g} s / {intervals[1]:g} s" if intervals else "-"
        lines.append(f"| {name} | {iv} | {_fmt(chain)} | {map_cell} |")
    lines += [
        "",
        f"chain, async at defaults / sync: {chain_defaults / chain_sync_p50:,.0f}x (goal >= 100x)",
        f"model check, chain driven with real timers at resync {rs:g} s / reeval {re_:g} s / cache phase {ph:g} s: "
        f"measured {', '.join(f'{m:.3f}' for m in real)} s; the model predicts {predicted:.3f} s",
        "async rows: the model's expectation over the cache ticker's phase, from each task's measured completion; "
        "sync calls over grpc.aio (see SyncStream), async calls over the blocking client",
        f"medians of {args.runs} round trips, {args.chains} chains, {args.maps} maps; propeller's own per-round "
        "work (etcd writes, event sends) is not modelled",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(BENCH, "results"), exist_ok=True)
    with open(os.path.join(BENCH, "results", "propeller.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

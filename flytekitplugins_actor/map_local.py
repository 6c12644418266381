"""Runs an actor map in a local driver: items on the environment's local replicas (or in the driver with
FLYTE_ACTOR_IN_PROCESS=1), under the map model's rules (`map_model`): the same window, tally and decision as the
connector's coordinator.

Ctrl-C: the first SIGINT stops dispatching, cancels the items in flight, stops the environment's replicas and
re-raises KeyboardInterrupt with one line saying so; a second SIGINT during that exits the driver at once.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import os
import signal
import sys
import threading
import uuid
from typing import Dict, List, Optional, Tuple

from flyteidl.core import literals_pb2
from flytekit.core.context_manager import FlyteContext
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.loggers import logger
from flytekit.models.literals import LiteralMap

from flytekitplugins_actor.constants import CANCEL_GRACE_S
from flytekitplugins_actor.errors import ReplicaDied
from flytekitplugins_actor.map_model import (
    MapDecision,
    MapPhase,
    MapPlan,
    MapTally,
    cancel_items,
)
from flytekitplugins_actor.replica.error import ExecutionError

INTERRUPT_GRACE_S = float(os.environ.get("FLYTE_ACTOR_MAP_INTERRUPT_GRACE_S", "1.0"))
"""On Ctrl-C, how long an item may take to honour its cancel before its replica is stopped."""

INTERRUPT_EXIT_CODE = 130
"""The exit code of a driver stopped by a second Ctrl-C (128 + SIGINT, as a shell reports it)."""

_CANCEL_ROUNDS = 3

_ItemResult = Tuple[int, Optional[literals_pb2.LiteralMap], Optional[BaseException]]


def _tell(line: str) -> None:
    """A line for the person who pressed Ctrl-C, on stderr whatever the log level (`pyflyte run` shows only
    CRITICAL log records by default), and in the log."""
    logger.info(line)
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed stderr must not stop the cleanup
        pass


class MapInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a local actor map: nothing more was dispatched, its items in flight were cancelled."""


class _SigintGuard:
    """While a map runs in the main thread, the first SIGINT raises KeyboardInterrupt (whatever handler flytekit
    installed, which would exit(1) mid-map) and a second one exits the process at once."""

    def __init__(self, what: str):
        self.what, self.count = what, 0
        self._previous = None
        self._installed = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "_SigintGuard":
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            _tell(f"{self.what}: second Ctrl-C, exiting at once (replicas exit with the driver)")
            os._exit(INTERRUPT_EXIT_CODE)
        raise KeyboardInterrupt


class LocalMapRun:
    """One run of an actor map in a local driver."""

    def __init__(self, task, plan: MapPlan, ctx: FlyteContext):
        self.task, self.plan, self.ctx = task, plan, ctx
        self.what = f"map({task.name})"
        self.tally = MapTally(plan.spec, plan.size)
        self.results: List[Optional[literals_pb2.LiteralMap]] = [None] * plan.size
        self.exceptions: Dict[int, BaseException] = {}
        self._ids = [f"local-map-{uuid.uuid4().hex[:12]}.{i}" for i in range(plan.size)]

    def run(self, in_process: bool) -> LiteralMap:
        """Runs every item (or fewer, if the map fails first) and gathers their outputs in input order."""
        guard = self._guard = _SigintGuard(self.what)
        with guard:
            try:
                decision = self._run_in_process() if in_process else self._run_on_replicas()
            except KeyboardInterrupt:
                if guard.count == 0:  # not the driver's Ctrl-C: the task's own code raised it, in-process
                    raise
                raise MapInterrupted(f"{self.what} was interrupted (Ctrl-C)") from None
        if decision.phase is MapPhase.FAILED:
            from flytekitplugins_actor.actor_map import MapFailed

            cause = self.exceptions.get(decision.first_failure)
            raise MapFailed(f"{self.what}: {decision.message}", recoverable=decision.recoverable) from cause
        names = list(self.task.python_interface.outputs)
        return LiteralMap.from_flyte_idl(MapPlan.gather(names, self.results))

    # ---- FLYTE_ACTOR_IN_PROCESS=1: one item after another, in the driver ----
    def _run_in_process(self) -> MapDecision:
        tally = self.tally
        while (decision := tally.decision()) is None:
            (i,) = tally.take(window=1)
            try:  # the subtask's own dispatch, which runs it here in this mode
                out = self.task.dispatch_execute(self.ctx, self._inputs(i))
            except KeyboardInterrupt as e:
                if self._guard.count:
                    raise  # the driver's Ctrl-C
                self._failed(i, e)  # the task's own KeyboardInterrupt: that item's failure
            except BaseException as e:  # sys.exit in one item is that item's failure
                self._failed(i, e)
            else:
                self._succeeded(i, out.to_flyte_idl() if isinstance(out, LiteralMap) else literals_pb2.LiteralMap())
        return decision

    # ---- replicas: a window of items in flight, each waited on by a thread of a bounded executor ----
    def _run_on_replicas(self) -> MapDecision:
        env = self.task.task_config
        stop = threading.Event()
        inflight: Dict[concurrent.futures.Future, int] = {}
        ex = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.tally.spec.window(env.replica_count), thread_name_prefix="actor-map"
        )
        try:
            try:
                decision = self._dispatch_until_decided(ex, inflight, stop)
            finally:
                stop.set()  # nothing more starts, whatever ended the loop
            self._cancel(inflight, grace=CANCEL_GRACE_S)  # a map that failed fast cancels the rest
            return decision
        except KeyboardInterrupt:
            self._interrupted(inflight)
            raise
        finally:
            ex.shutdown(wait=True)

    def _dispatch_until_decided(
        self, ex: concurrent.futures.Executor, inflight: Dict[concurrent.futures.Future, int], stop: threading.Event
    ) -> MapDecision:
        tally = self.tally
        window = tally.spec.window(self.task.task_config.replica_count)
        previous: Optional[threading.Event] = None  # set once the item dispatched before is in the pool's queue
        while (decision := tally.decision()) is None:
            for i in tally.take(window):
                context = contextvars.copy_context()  # each item in a copy of the driver's flytekit context
                queued = threading.Event()
                inflight[ex.submit(context.run, self._run_item, i, stop, previous, queued)] = i
                previous = queued
            done, _ = concurrent.futures.wait(inflight, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                del inflight[f]
                i, outputs, error = f.result()
                if error is not None:
                    self._failed(i, error)
                else:
                    self._succeeded(i, outputs)
        return decision

    def _run_item(
        self, i: int, stop: threading.Event, previous: Optional[threading.Event], queued: threading.Event
    ) -> _ItemResult:
        """Runs item i on a replica; it joins the pool's FIFO queue only after the item dispatched before it
        (`previous`), so items reach the replicas in input order, as the connector's coordinator sends them."""
        from flytekitplugins_actor.local import run_literals_on_replica

        try:
            if previous is not None:
                previous.wait()  # set by that item's thread, which started first (a FIFO executor of `window` threads)
            if stop.is_set():
                return i, None, None  # never started: nobody reads it, the map is decided or interrupted
            try:
                outputs = run_literals_on_replica(self.task, self._inputs(i), self._ids[i], queued.set)
                return i, outputs.to_flyte_idl(), None
            except BaseException as e:  # sys.exit, KeyboardInterrupt raised by the task: that item's failure
                return i, None, e
        finally:
            queued.set()  # also when it never reached the pool: the next item must not wait for it

    def _interrupted(self, inflight: Dict[concurrent.futures.Future, int]) -> None:
        """The driver's Ctrl-C: cancel what runs, stop the environment's replicas, say so."""
        from flytekitplugins_actor.local import local_pools

        env, n = self.task.task_config, len(inflight)
        _tell(
            f"{self.what}: Ctrl-C: cancelling {n} item(s) in flight, dispatching no more ({len(self.tally.pending)} "
            f"never started) and stopping the replicas of {env.name}; Ctrl-C again to exit at once"
        )
        self._cancel(inflight, grace=INTERRUPT_GRACE_S)
        pool = local_pools().get(env.key())
        if pool is not None:
            pool.shutdown(grace_seconds=INTERRUPT_GRACE_S)
        _tell(f"{self.what}: interrupted by Ctrl-C after {self.tally.done} of {self.tally.n} items; replicas stopped")

    def _cancel(self, inflight: Dict[concurrent.futures.Future, int], grace: float) -> None:
        """Cancels the items in flight and waits until their threads have returned."""
        from flytekitplugins_actor.local import local_pools

        for _ in range(_CANCEL_ROUNDS):
            if not inflight:
                return
            pool = local_pools().get(self.task.task_config.key())
            if pool is not None:
                ids = [self._ids[i] for f, i in inflight.items() if not f.done()]
                cancel_items(lambda x: pool.cancel(x, grace_seconds=grace), ids, self.what)
            # a thread may have been between its stop check and its submit when we cancelled: look again
            done, _ = concurrent.futures.wait(inflight, timeout=grace + 1.0)
            for f in done:
                del inflight[f]
        if inflight:
            logger.error(f"{self.what}: {len(inflight)} item(s) did not stop after {_CANCEL_ROUNDS} cancels")

    def _inputs(self, i: int) -> LiteralMap:
        return LiteralMap.from_flyte_idl(self.plan.item_inputs(i))

    def _succeeded(self, i: int, outputs: literals_pb2.LiteralMap) -> None:
        self.results[i] = outputs
        self.tally.succeed(i)

    def _failed(self, i: int, e: BaseException) -> None:
        self.exceptions[i] = e
        code, message = type(e).__name__, str(e) or repr(e)
        if isinstance(e, ReplicaDied):
            self.tally.fail(i, ExecutionError.system(code, message, recoverable=True))
        else:
            self.tally.fail(i, ExecutionError.user(code, message, recoverable=isinstance(e, FlyteRecoverableException)))

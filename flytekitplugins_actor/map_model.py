"""The one model of an actor map's run, shared by the local driver (`ActorMapTask.dispatch_execute`) and the
connector's coordinator (`plugin_backend.map_run.MapRun`): its spec and window, the split of its inputs (item i
gets the i-th element of every mapped input and every bound input as is; outputs are gathered in input order, a
none literal for a failed item), the per-item tally, and the decision, with one set of rules and messages.

The rules:
- window: at most `concurrency` items are in flight, else `WINDOW_PER_REPLICA` per replica of the pool (enough
  that a replica never waits for the driver, few enough that other executions of the environment interleave);
- the map fails fast: as soon as more items have failed than `min_success_ratio` allows, it is decided FAILED
  (recoverable only if every failed item was), nothing more is dispatched and the items in flight are cancelled;
- otherwise it succeeds once every item has finished, failed items gathered as none;
- an item is dispatched again only when it is known never to have reached a replica, at most
  `MAX_REDISPATCHES` times; an item that ran is never sent again.
"""

from __future__ import annotations

import collections
import enum
import math
import os
from dataclasses import dataclass
from typing import Callable, Collection, Deque, Dict, List, Optional, Sequence, Set, Tuple, Union

from flyteidl.core import literals_pb2
from flytekit.loggers import logger
from flytekit.models.literals import LiteralMap

from flytekitplugins_actor.replica.error import ExecutionError

WINDOW_PER_REPLICA = int(os.environ.get("FLYTE_ACTOR_MAP_WINDOW_PER_REPLICA", "2"))
"""Items in flight per replica when a map sets no `concurrency`."""

MAX_REDISPATCHES = 3
"""How many times an item that never reached a replica (its pool closed under it) is dispatched again."""


class MapSpecError(ValueError):
    """A map's parameters are invalid; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class MapSpec:
    """How an actor map fans out: which inputs are lists to split, which are bound as is, its window and ratio."""

    mapped_inputs: Tuple[str, ...]
    bound_inputs: Tuple[str, ...]
    subtask: str
    concurrency: Optional[int] = None
    min_success_ratio: float = 1.0

    def __post_init__(self) -> None:
        c = self.concurrency
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise MapSpecError(
                f"concurrency={c!r} is invalid: must be None (every replica busy, the default) or an int >= 1; "
                "an actor map never runs more items at once than its environment has replicas"
            )
        r = self.min_success_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise MapSpecError(f"min_success_ratio={r!r} is invalid: must be a number in [0, 1]")
        if not self.mapped_inputs:
            raise MapSpecError("mapped_inputs is empty: a map needs at least one list input to map over")
        both = set(self.mapped_inputs) & set(self.bound_inputs)
        if both:
            raise MapSpecError(f"inputs {sorted(both)} are both mapped and bound")
        object.__setattr__(self, "min_success_ratio", float(r))

    def window(self, replicas: int) -> int:
        """How many items may be in flight at once on a pool of `replicas` replicas."""
        return self.concurrency or WINDOW_PER_REPLICA * max(1, replicas)

    def required_successes(self, n: int) -> int:
        """How many of n items must succeed."""
        return min(n, math.ceil(n * self.min_success_ratio - 1e-9))


# ---- the split: per-item inputs, and outputs gathered back into lists ----
ProtoMap = literals_pb2.LiteralMap


class MapInputError(ValueError):
    """The map's inputs cannot be split: a mapped input is missing or not a list, or the lists differ in length."""


def _proto(m: Union[LiteralMap, ProtoMap, None]) -> ProtoMap:
    if m is None:
        return ProtoMap()
    return m if isinstance(m, ProtoMap) else m.to_flyte_idl()


def none_literal() -> literals_pb2.Literal:
    """The value of a failed item in a gathered list."""
    return literals_pb2.Literal(scalar=literals_pb2.Scalar(none_type=literals_pb2.Void()))


class MapPlan:
    """The split of one map's inputs. Works on flyteidl LiteralMaps (flytekit's models are accepted too)."""

    def __init__(self, inputs: Union[LiteralMap, ProtoMap, None], spec: MapSpec):
        self.spec = spec
        self._inputs = _proto(inputs)
        lengths: Dict[str, int] = {}
        self._lists: Dict[str, Sequence[literals_pb2.Literal]] = {}
        for name in spec.mapped_inputs:
            if name not in self._inputs.literals:
                raise MapInputError(f"mapped input {name!r} has no value")
            lit = self._inputs.literals[name]
            if not lit.HasField("collection"):
                raise MapInputError(f"mapped input {name!r} is not a list literal")
            self._lists[name] = lit.collection.literals
            lengths[name] = len(lit.collection.literals)
        if len(set(lengths.values())) > 1:
            raise MapInputError(f"mapped inputs have different lengths: {lengths}")
        self.size = next(iter(lengths.values()), 0)
        self._bound = {n: self._inputs.literals[n] for n in spec.bound_inputs if n in self._inputs.literals}

    def item_inputs(self, i: int) -> ProtoMap:
        """Item i's inputs: the i-th element of every mapped list, every bound input as is."""
        out = ProtoMap()
        for name, items in self._lists.items():
            out.literals[name].CopyFrom(items[i])
        for name, lit in self._bound.items():
            out.literals[name].CopyFrom(lit)
        return out

    @staticmethod
    def gather(output_names: Sequence[str], results: List[Optional[ProtoMap]]) -> ProtoMap:
        """One list per output name; results[i] is item i's outputs, or None for a failed item."""
        out = ProtoMap()
        for name in output_names:
            coll = out.literals[name].collection
            coll.SetInParent()  # an empty list is still a collection literal
            for r in results:
                if r is None or name not in r.literals:
                    coll.literals.append(none_literal())
                else:
                    coll.literals.append(r.literals[name])
        return out


class MapPhase(enum.Enum):
    """Where a map run is."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class MapDecision:
    """A map's end: its phase, the one message both drivers give, and whether a retry may help."""

    phase: MapPhase
    message: str
    recoverable: bool = False
    first_failure: Optional[int] = None  # the lowest failed item when the map failed

    def error(self) -> ExecutionError:
        """A failed map's error (its error.pb): a system error when a retry may help, else the user's."""
        if self.recoverable:
            return ExecutionError.system("MapItemsFailed", self.message, recoverable=True)
        return ExecutionError.user("MapItemsFailed", self.message)


ABORTED = MapDecision(MapPhase.ABORTED, "map was aborted")


class MapTally:
    """Per-item progress of one map run: what waits, what is in flight, what succeeded or failed, and the decision.

    Used by one coordinating thread; `progress()` only reads sizes, so another thread may call it."""

    def __init__(self, spec: MapSpec, n: int):
        self.spec, self.n = spec, n
        self.pending: Deque[int] = collections.deque(range(n))
        self.inflight: Set[int] = set()
        self.succeeded: Set[int] = set()
        self.failed: Dict[int, ExecutionError] = {}
        self.resumed = 0
        self._redispatches: Dict[int, int] = {}

    def resume(self, i: int, error: Optional[ExecutionError]) -> None:
        """Item i finished before this run started (a restarted connector): it is not dispatched."""
        self.pending.remove(i)
        self.resumed += 1
        self._record(i, error)

    def take(self, window: int) -> List[int]:
        """The items to dispatch now to keep `window` items in flight (`spec.window(replicas)`, or 1 to run one
        at a time); they count as in flight."""
        out: List[int] = []
        while self.pending and len(self.inflight) < window:
            i = self.pending.popleft()
            self.inflight.add(i)
            out.append(i)
        return out

    def succeed(self, i: int) -> None:
        self.inflight.discard(i)
        self._record(i, None)

    def fail(self, i: int, error: ExecutionError) -> None:
        self.inflight.discard(i)
        self._record(i, error)

    def never_ran(self, i: int) -> None:
        """Item i came back cancelled before any replica got it (its pool closed): it is dispatched again, first,
        at most MAX_REDISPATCHES times; after that it fails, retryably."""
        self.inflight.discard(i)
        count = self._redispatches[i] = self._redispatches.get(i, 0) + 1
        if count > MAX_REDISPATCHES:
            message = f"its pool closed before a replica could take it, {count} times in a row"
            self._record(i, ExecutionError.system("NeverStarted", message, recoverable=True))
        else:
            self.pending.appendleft(i)

    def _record(self, i: int, error: Optional[ExecutionError]) -> None:
        if i in self.succeeded or i in self.failed:
            raise ValueError(f"map item {i} finished twice")
        if error is None:
            self.succeeded.add(i)
        else:
            self.failed[i] = error

    @property
    def done(self) -> int:
        return len(self.succeeded) + len(self.failed)

    def decision(self) -> Optional[MapDecision]:
        """The map's end once it is known, else None: FAILED as soon as the ratio cannot be met any more."""
        need = self.spec.required_successes(self.n)
        if len(self.failed) > self.n - need:
            first = min(self.failed)
            err = self.failed[first]
            message = (
                f"{len(self.failed)} of {self.n} items failed; min_success_ratio={self.spec.min_success_ratio} "
                f"needs {need} successes. Item {first} failed: {err.code}: {err.message}"
            )
            recoverable = all(e.recoverable for e in self.failed.values())
            return MapDecision(MapPhase.FAILED, message, recoverable, first)
        if self.done == self.n:
            failed = len(self.failed)
            message = f"{self.n - failed} of {self.n} items succeeded" + (f", {failed} failed (none)" if failed else "")
            return MapDecision(MapPhase.SUCCEEDED, message)
        return None

    def progress(self) -> Dict[str, int]:
        """Counters for status reports (safe to read from another thread: sizes only)."""
        return {
            "total": self.n,
            "succeeded": len(self.succeeded),
            "failed": len(self.failed),
            "running": len(self.inflight),
            "resumed": self.resumed,
        }


def cancel_items(cancel: Callable[[str], None], execution_ids: Collection[str], what: str) -> None:
    """Cancels executions (a pool's cancel returns at once: its supervisor escalates past the grace); a failed
    cancel is logged and the others still go out."""
    for execution_id in execution_ids:
        try:
            cancel(execution_id)
        except Exception:
            logger.exception(f"{what}: could not cancel {execution_id}")

"""A replica worker with timing probes (diagnostic for breakdown_warm.py; patches internals at runtime).

Adds a `timings` op returning monotonic timestamps of each stage. With PROBE_IDLE_CLEANUP=1 it also tries a
what-if: each execution's scratch cleanup waits until the replica has been idle for 20 ms, instead of running
right after the outcome is recorded (where a back-to-back submit has to wait for it).
"""

import atexit
import os
import queue
import sys
import threading
import time

import flytekitplugins_actor.replica.worker as W
from flytekitplugins_actor.replica.execution import RUNTIME

T = {}
PENDING = []
IDLE_CLEANUP = os.environ.get("PROBE_IDLE_CLEANUP") == "1"


def stamp(key):
    T.setdefault(key, []).append(time.monotonic())


def wrap(obj, name, key):
    orig = getattr(obj, name)

    def f(*a, **k):
        stamp(key + ".in")
        r = orig(*a, **k)
        stamp(key + ".out")
        return r

    setattr(obj, name, f)


wrap(W.Worker, "op_submit", "submit")
wrap(W.Worker, "op_wait", "wait")
_run_deferred = RUNTIME.run_deferred


def run_deferred(spec):
    stamp("run.in")
    outcome, cleanup = _run_deferred(spec)
    stamp("run.out")

    def c():
        stamp("cleanup.in")
        PENDING.append(cleanup) if IDLE_CLEANUP else cleanup()
        stamp("cleanup.out")

    return outcome, c


RUNTIME.run_deferred = run_deferred
_get = queue.Queue.get


def get(self, *a, **k):
    main = threading.current_thread() is threading.main_thread()
    if main and PENDING:
        try:
            r = _get(self, timeout=0.02)
        except queue.Empty:
            while PENDING:
                PENDING.pop()()
            r = _get(self, *a, **k)
    else:
        r = _get(self, *a, **k)
    if main and r is not None:
        stamp("dequeued")
    return r


queue.Queue.get = get
atexit.register(lambda: [PENDING.pop()() for _ in list(PENDING)])
W.Worker.op_timings = lambda self, msg: {"timings": T}

if __name__ == "__main__":
    W.main(sys.argv[1:])

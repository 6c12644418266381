"""The replica worker: a long-lived process that runs actor executions one at a time in a warm interpreter.

Start it the same way everywhere (laptop, the connector's local backend, a pod's command):

    FLYTE_ACTOR_TOKEN=<pool token> python -m flytekitplugins_actor.replica.worker --port 8777

The main thread executes; a server thread per connection answers the control protocol (docs/replica-protocol.md).
"""

from __future__ import annotations

import argparse
import base64
import collections
import gc
import json
import logging
import os
import queue
import select
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from flytekit.loggers import logger

from flytekitplugins_actor.replica.error import CANCELLED
from flytekitplugins_actor.replica.execution import (
    RUNTIME,
    CancelRequested,
    ExecutionOutcome,
    ExecutionSpec,
    ReplicaTerminated,
)
from flytekitplugins_actor.replica.protocol import (
    PROTOCOL_VERSION,
    TOKEN_ENV,
    MessageReader,
    ProtocolError,
    Refusal,
    RefusalCode,
    ReplicaActivity,
    ReplicaExecutionState,
    encode_message,
    token_matches,
)

_KEEP_OUTCOMES = 1000
IDLE_CLEANUP_S = 0.02
"""Finished executions' temp dirs are removed once the replica has been idle this long, so removing them does
not delay the next execution; a replica that is never idle keeps at most MAX_PENDING_CLEANUPS of them."""
MAX_PENDING_CLEANUPS = 32
CANCEL_SIGNAL = signal.SIGUSR2
"""Sent to the main thread (signal.pthread_kill) to cancel the running execution: a real signal interrupts
time.sleep and blocking I/O, not only bytecode. Not SIGINT: importing flytekit installs a SIGINT handler that
calls exit(1), which would turn a cancel into a failure."""
ORPHAN_TIMEOUT_ENV = "FLYTE_ACTOR_ORPHAN_TIMEOUT_S"
"""Seconds without an authenticated request after which the replica exits on its own (unset: never). Its pool
pings idle replicas every 10 s and waits in bounded rounds, so only a replica whose pool is gone hits it."""
_CLOSED = "__closed__"
"""What the executing thread gives a parked connection back with when reading from it failed (never a request)."""
PARK_POLL_S = 0.05
"""How often a parked connection's thread looks whether a `wait` registered for it is due (an execution that
outlasts its first wait round)."""
SENT_ALONG_TIMEOUT_S = 5.0
"""How long the rest of a request that has started to arrive right after a submit may take."""
STOP_GRACE_S = 5.0
"""How long a replica that stops on its own gives its execution to end before it exits regardless."""


_ENDED_STATES = frozenset(s.value for s in ReplicaExecutionState if s.ended)


class Delivery:
    """One connection's reply on its way: a `wait`'s reply is sent by the executing thread the moment the execution
    ends (as far as the socket takes it without blocking), and its connection thread sends the rest, if any. One
    thread wake-up less between an execution's end and its reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = MessageReader(sock)
        self.told: Optional[str] = None
        """An end the last reply carried: received once the peer asks again (`Worker.collected`)."""
        self.direct = False
        """The last reply was the executing thread's: the connection then waits for its next request on the
        executing thread (`Worker.park`), which runs a submit read there without a hand-off."""
        self.turn = threading.Event()
        """Set when the executing thread gives a parked connection back to its thread."""
        self.handed: Optional[Dict[str, Any]] = None
        """The request the executing thread read and gives back with the connection, if any."""
        self.registered_for: Optional[str] = None
        """The execution whose `wait` (in `handed`) the executing thread registered for this connection."""
        self.deadline = 0.0
        """When that `wait`'s timeout runs out (monotonic): the connection's thread answers it then, if need be."""
        self.held: Optional[ExecutionSpec] = None
        """An execution this connection submitted, not started yet: it starts once the `wait` sent with it is
        registered (`Worker.release`), so the connection thread does its part before the execution runs, not during
        it (the two threads share one interpreter)."""
        self.reply: Optional[Dict[str, Any]] = None
        self.ended = threading.Event()
        """Set by the executing thread when the execution this connection waits for ends: the connection thread
        waits on it, not on the worker's lock, which the executing thread takes as it starts."""
        self._frame = b""
        self._sent = 0

    def send_now(self, reply: Dict[str, Any]) -> None:
        """From the executing thread, while the connection thread waits for this reply: never blocks."""
        self.reply, self._frame = reply, encode_message(reply)
        try:
            self._sent = self.sock.send(self._frame, socket.MSG_DONTWAIT)
        except OSError:  # full, or the peer is gone: the connection thread sends it (and sees the error)
            self._sent = 0

    def finish(self, reply: Dict[str, Any]) -> Dict[str, Any]:
        """Sends what is left of the reply (all of it if none was sent yet), from the thread that has the connection."""
        self.direct = self.reply is not None
        if self.reply is None:
            self.sock.sendall(encode_message(reply))
            return reply
        sent, frame, self.reply = self.reply, self._frame[self._sent :], None
        if frame:
            self.sock.sendall(frame)
        return sent


log = logger.getChild("replica")
"""The replica's own log (flytekit's logger): one plain line per event on stdout, whatever flytekit's level."""


def _setup_log(name: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[actor-replica {name}] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # flytekit's own handler wraps lines for a terminal; a replica log is read line by line


def _raise_cancel(signum, frame):
    if RUNTIME.cancel_armed:  # only while the task's code runs: in set-up, clean-up or bookkeeping it is ignored
        raise CancelRequested(f"execution cancelled (signal {signum})")


class Worker:
    """Accepts executions over the control protocol and runs them on the main thread, one at a time."""

    def __init__(self, token: str, name: str):
        self.token = token
        self.name = name
        self._lock = threading.Condition()
        self._queue: "queue.Queue[Optional[ExecutionSpec]]" = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()  # wakes the executing thread's wait: something was queued or parked
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._parked: Optional[Delivery] = None
        """The connection the executing thread waits on for its next request (at most one: the last to dispatch)."""
        self._running: Optional[str] = None
        self._accepted: Dict[str, ExecutionSpec] = {}
        self._outcomes: "collections.OrderedDict[str, ExecutionOutcome]" = collections.OrderedDict()
        self._waiting: Dict[str, List[Tuple[Delivery, bool]]] = {}
        """Connections blocked in `wait` for an execution, and whether each asked for the exception: the executing
        thread sends them the reply as the execution ends."""
        self._uncollected: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        """Ended executions whose end no peer is known to have received (e.g. one that finished while its connector
        was restarting): `health` names them, so a pool that adopts this replica collects them. A `wait` or `status`
        reply carrying an end counts once its connection sends its next request (`collected`): a reply sent to a
        connector that was killed meanwhile does not."""
        self.stopping = False
        self.last_request = time.monotonic()  # of an authenticated request: the orphan timeout counts from it

    # ---- control plane (server threads) ----
    def handle(self, msg: Dict[str, Any], delivery: Optional[Delivery] = None) -> Dict[str, Any]:
        if not token_matches(self.token, msg.get("token")):
            return Refusal(RefusalCode.UNAUTHENTICATED, "bad or missing pool token").to_wire()
        self.last_request = time.monotonic()
        op = msg.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return Refusal(
                RefusalCode.INVALID_ARGUMENT, f"unknown op {op!r}; expected submit, status, wait, cancel or health"
            ).to_wire()
        try:
            if op in ("submit", "wait") and delivery is not None:
                return {"ok": True, **handler(msg, delivery)}
            return {"ok": True, **handler(msg)}
        except Refusal as e:
            return e.to_wire()
        except (KeyError, TypeError, ValueError) as e:
            return Refusal(RefusalCode.INVALID_ARGUMENT, f"{op}: {e}").to_wire()
        finally:
            if op != "submit" and delivery is not None:
                self.release(delivery)

    def release(self, delivery: Delivery) -> None:
        """Starts the execution a connection holds (see `Delivery.held`), if any."""
        spec, delivery.held = delivery.held, None
        if spec is not None:
            self._start(spec)

    def _start(self, spec: ExecutionSpec) -> None:
        self._queue.put(spec)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def park(self, delivery: Delivery) -> bool:
        """From a connection thread whose last reply the executing thread sent: hands the connection to the executing
        thread, which waits for its next request itself, and blocks until it is given back (`Delivery.handed`).
        False, at once, if the executing thread has a parked connection already or the replica is stopping."""
        with self._lock:
            if self._parked is not None or self.stopping:
                return False
            self._parked = delivery
            delivery.turn.clear()
        self._wake()
        while not delivery.turn.wait(PARK_POLL_S):
            with self._lock:  # an execution outlasting its wait's timeout: its thread answers the wait (`running`)
                if (
                    self._parked is delivery
                    and delivery.registered_for is not None
                    and time.monotonic() >= delivery.deadline - PARK_POLL_S
                ):
                    self._parked = None
                    return True  # with the `wait` in `handed`
        return True

    def _give_back(self, delivery: Delivery, handed: Optional[Dict[str, Any]]) -> None:
        """Gives a parked connection back to its thread, with a request read here (or a `wait` registered here)
        for it to serve; it then reads the connection itself until the executing thread answers it again."""
        with self._lock:
            if self._parked is delivery:
                self._parked = None
            if handed is not None or delivery.registered_for is None:
                delivery.handed = handed
            delivery.direct = False
        delivery.turn.set()

    @staticmethod
    def waits_for_held(msg: Optional[Dict[str, Any]], delivery: Delivery) -> bool:
        """Whether a request read right after a submit is the `wait` for the execution that submit holds."""
        held = delivery.held
        return (
            held is not None
            and msg is not None
            and msg.get("op") == "wait"
            and str(msg.get("execution_id")) == held.execution_id
        )

    @staticmethod
    def carried_end(msg: Dict[str, Any], reply: Dict[str, Any]) -> Optional[str]:
        """The execution whose end a reply told its peer (a `wait` or `status` of an ended execution), or None."""
        if msg.get("op") not in ("wait", "status") or not reply.get("ok"):
            return None
        return str(reply.get("execution_id")) if reply.get("state") in _ENDED_STATES else None

    def collected(self, delivery: Delivery) -> None:
        """The connection's peer sent its next request: the end its last reply told (`Delivery.told`), if any, was
        received, so it is not uncollected any more."""
        told, delivery.told = delivery.told, None
        if told is not None:
            with self._lock:
                self._uncollected.pop(told, None)

    def _state_of(self, execution_id: str, include_exception: bool = False) -> Dict[str, Any]:
        outcome = self._outcomes.get(execution_id)
        if outcome is not None:
            wire = outcome.to_wire()
            if include_exception and outcome.exception is not None:
                wire["exception"] = _pickle_exception(outcome.exception)
            return wire
        if execution_id == self._running:
            state = ReplicaExecutionState.RUNNING
        elif execution_id in self._accepted:
            state = ReplicaExecutionState.ACCEPTED
        else:
            state = ReplicaExecutionState.UNKNOWN
        return {"execution_id": execution_id, "state": state.value}

    def op_health(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        with self._lock:
            busy = self._running is not None or bool(self._accepted)
            return {
                "replica": self.name,
                "pid": os.getpid(),
                "protocol": PROTOCOL_VERSION,
                "state": (
                    ReplicaActivity.STOPPING
                    if self.stopping
                    else ReplicaActivity.BUSY
                    if busy
                    else ReplicaActivity.IDLE
                ).value,
                # the execution it holds: the one running, or one accepted that has not started yet
                "running": self._running or next(iter(self._accepted), None),
                "uncollected": list(self._uncollected),
                "executions": RUNTIME.executions,
                "code_version": RUNTIME.code_version,
            }

    def op_submit(self, msg: Dict[str, Any], delivery: Optional[Delivery] = None) -> Dict[str, Any]:
        spec = ExecutionSpec.from_wire(msg)
        spec.parsed()  # refuse a malformed command now, not on the main thread
        with self._lock:
            known = self._state_of(spec.execution_id)
            if known["state"] != ReplicaExecutionState.UNKNOWN.value:  # idempotent: never run twice
                return known
            if self.stopping:
                raise Refusal(RefusalCode.STOPPING, "replica is stopping")
            if self._running is not None or self._accepted:
                raise Refusal(
                    RefusalCode.BUSY,
                    f"replica is busy with {self._running or next(iter(self._accepted))}; "
                    "it runs one execution at a time",
                )
            self._accepted[spec.execution_id] = spec
        if delivery is not None:
            delivery.held = spec  # its connection thread releases it (see Delivery.held)
        else:
            self._start(spec)
        return {"execution_id": spec.execution_id, "state": ReplicaExecutionState.ACCEPTED.value}

    def op_status(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        with self._lock:
            return self._state_of(str(msg["execution_id"]), bool(msg.get("include_exception")))

    def op_wait(self, msg: Dict[str, Any], delivery: Optional[Delivery] = None) -> Dict[str, Any]:
        execution_id = str(msg["execution_id"])
        timeout = msg.get("timeout")
        include_exception = bool(msg.get("include_exception"))

        def ended() -> bool:
            return (
                execution_id in self._outcomes
                or self._state_of(execution_id)["state"] == ReplicaExecutionState.UNKNOWN.value
            )

        with self._lock:
            if delivery is not None and delivery.registered_for == execution_id:
                delivery.registered_for = None  # the executing thread registered it as it took the submit
            elif delivery is None or ended():
                self._lock.wait_for(ended, timeout)
                return self._state_of(execution_id, include_exception)
            else:
                self._register_locked(delivery, execution_id, include_exception)
        try:
            self.release(delivery)  # the execution this connection submitted starts now
            delivery.ended.wait(timeout)
        finally:
            with self._lock:
                self._unregister_locked(delivery, execution_id)
        with self._lock:
            if delivery.reply is not None:  # the executing thread sent it (or its start)
                return {k: v for k, v in delivery.reply.items() if k != "ok"}
            return self._state_of(execution_id, include_exception)

    def op_cancel(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        execution_id = str(msg["execution_id"])
        with self._lock:
            if self._accepted.pop(execution_id, None) is not None:
                self._record(ExecutionOutcome(execution_id, ReplicaExecutionState.CANCELLED, error=CANCELLED))
            elif self._running == execution_id and execution_id not in RUNTIME.cancelled:
                RUNTIME.cancelled.add(execution_id)  # seen as the task starts, if the signal lands before that
                signal.pthread_kill(threading.main_thread().ident, CANCEL_SIGNAL)
            return self._state_of(execution_id)

    def _record(self, outcome: ExecutionOutcome) -> None:
        self._outcomes[outcome.execution_id] = outcome
        self._uncollected[outcome.execution_id] = None
        while len(self._outcomes) > _KEEP_OUTCOMES:
            forgotten, _ = self._outcomes.popitem(last=False)
            self._uncollected.pop(forgotten, None)
        for delivery, include_exception in self._waiting.get(outcome.execution_id, ()):
            delivery.send_now({"ok": True, **self._state_of(outcome.execution_id, include_exception)})
            delivery.ended.set()
        self._lock.notify_all()

    # ---- execution (main thread) ----
    def serve_forever(self) -> None:
        cleanups: List[Callable[[], None]] = []  # temp dirs of finished executions, removed once idle
        try:
            self._serve(cleanups)
        finally:
            _run_all(cleanups)

    def _next(self, cleanups: List[Callable[[], None]]) -> Optional[ExecutionSpec]:
        """The next execution to run: one a connection thread queued, or a submit read here from the parked
        connection (no hand-off between threads). None when the replica is stopping."""
        while True:
            self._answered_parked()  # e.g. an execution cancelled before it started
            try:
                spec = self._queue.get_nowait()
            except queue.Empty:
                pass
            else:  # a parked connection goes back to its thread: it must be served while this one runs
                if self._parked is not None:
                    self._give_back(self._parked, None)
                return spec
            parked = self._parked
            waits_on = [self._wake_r] if parked is None else [self._wake_r, parked.sock]
            # with a timeout: the kernel may deliver SIGTERM to another thread, which does not end this wait, and
            # Python runs signal handlers only on the main thread
            ready = select.select(waits_on, [], [], IDLE_CLEANUP_S if cleanups else 0.5)[0]
            if not ready:  # idle: clean up now, off any execution's critical path; the parked connection goes back
                if self._parked is not None and (cleanups or self.stopping):  # to its thread, which serves it meanwhile
                    self._give_back(self._parked, None)
                _run_all(cleanups)
                if self.stopping:
                    return None
                continue
            if self._wake_r in ready:
                _drain(self._wake_r)
            if parked is not None and parked.sock in ready and self._parked is parked:
                spec = self._take_parked(parked)
                if spec is not None:
                    return spec

    def _take_parked(self, delivery: Delivery) -> Optional[ExecutionSpec]:
        """Reads the parked connection's next request. A `health` is answered here. A submit is answered here and
        returned to run at once; the `wait` sent with it is registered, and the connection stays parked while the
        execution runs (its thread takes it back if the wait's timeout comes first: `park`). Anything else goes
        back to the connection's thread, unanswered, for it to serve."""
        try:
            msg = delivery.reader.arrived(SENT_ALONG_TIMEOUT_S)
            if msg is None:  # nothing after all
                return None
            self.collected(delivery)
            if msg.get("op") == "health":
                delivery.finish(self.handle(msg, delivery))
                return None
            if msg.get("op") != "submit":
                self._give_back(delivery, msg)
                return None
            reply = self.handle(msg, delivery)
            spec, pending = delivery.held, None
            if spec is not None:
                pending = delivery.reader.arrived(SENT_ALONG_TIMEOUT_S)
                timeout = pending.get("timeout") if pending is not None else None
                if (
                    self.waits_for_held(pending, delivery)
                    and token_matches(self.token, pending.get("token"))
                    and isinstance(timeout, (int, float))
                ):
                    with self._lock:
                        self._register_locked(delivery, spec.execution_id, bool(pending.get("include_exception")))
                        delivery.registered_for = spec.execution_id
                        delivery.handed, delivery.deadline = pending, time.monotonic() + timeout
                    pending = None
            delivery.finish(reply)  # on the wire before the task starts
        except (ProtocolError, OSError, ValueError) as e:  # the connection failed: its thread ends it
            with self._lock:
                if delivery.registered_for is not None:
                    self._unregister_locked(delivery, delivery.registered_for)
                    delivery.registered_for = None
            self.release(delivery)  # an accepted execution runs, as when its connection thread sees the failure
            self._give_back(delivery, {"op": _CLOSED, "error": str(e)})
            return None
        delivery.held = None
        if delivery.registered_for is None:  # no wait registered here: its thread serves what follows
            self._give_back(delivery, pending)
        return spec

    def _register_locked(self, delivery: Delivery, execution_id: str, include_exception: bool) -> None:
        """The connection waits for the execution's end: the executing thread will send it the reply (`_record`)."""
        self._waiting.setdefault(execution_id, []).append((delivery, include_exception))
        delivery.ended.clear()

    def _unregister_locked(self, delivery: Delivery, execution_id: str) -> None:
        waiting = self._waiting.get(execution_id, [])
        for waiter in [w for w in waiting if w[0] is delivery]:
            waiting.remove(waiter)
        if not waiting:
            self._waiting.pop(execution_id, None)

    def _answered_parked(self) -> None:
        """Completes, on the executing thread, a `wait` it registered for the parked connection once the execution
        ended: the reply went out in `_record`; what is left of it is sent here and the connection stays parked."""
        with self._lock:
            delivery = self._parked
            execution_id = None if delivery is None else delivery.registered_for
            if execution_id is None or execution_id not in self._outcomes:
                return
            msg, delivery.handed, delivery.registered_for = delivery.handed, None, None
            self._unregister_locked(delivery, execution_id)
            reply = delivery.reply or {"ok": True, **self._state_of(execution_id, bool(msg.get("include_exception")))}
        try:
            delivery.told = self.carried_end(msg, delivery.finish(reply))
        except OSError as e:
            self._give_back(delivery, {"op": _CLOSED, "error": str(e)})

    def _serve(self, cleanups: List[Callable[[], None]]) -> None:
        while True:
            spec = self._next(cleanups)
            if spec is None:
                return
            with self._lock:
                if self._accepted.pop(spec.execution_id, None) is None:
                    continue  # cancelled while queued
                self._running = spec.execution_id
            log.info("execution %s started", spec.execution_id)
            output_before = _output_size()
            outcome, retire = RUNTIME.run_deferred(spec)  # it arms the cancel around the task's own code only
            if output_before is not None:
                outcome.printed = _output_size() != output_before
            log.info("execution %s %s in %.4fs", spec.execution_id, outcome.state.value, outcome.duration_s)
            with self._lock:
                self._running = None
                RUNTIME.cancelled.discard(spec.execution_id)
                self._record(outcome)  # replies to its waiting peers
            self._answered_parked()
            retire()  # its dir is moved away now, after the reply and before anything else runs here
            cleanups.append(RUNTIME.dirs.tidy_one)
            if len(cleanups) > MAX_PENDING_CLEANUPS:  # never idle: pay one cleanup per execution, no bursts
                cleanups.pop(0)()
            if self.stopping:
                return


def _output_size() -> Optional[int]:
    """The size of the one file the replica's stdout and stderr go to (a local replica's log), or None when they go
    elsewhere (a pod's pipes): then nobody can tell from here whether a task printed."""
    try:
        out, err = os.fstat(1), os.fstat(2)
    except OSError:
        return None
    if not stat.S_ISREG(out.st_mode) or (out.st_dev, out.st_ino) != (err.st_dev, err.st_ino):
        return None
    return out.st_size


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _run_all(cleanups: List[Callable[[], None]]) -> None:
    while cleanups:
        try:
            cleanups.pop()()
        except Exception:  # a temp dir that cannot be removed must not stop the replica
            log.warning("could not clean up after an execution", exc_info=True)


def _pickle_exception(exc: BaseException) -> Optional[str]:
    try:
        import cloudpickle

        return base64.b64encode(cloudpickle.dumps(exc)).decode()
    except Exception as e:  # the driver then raises ActorTaskFailed with the message instead of the original type
        log.warning("the task's %s cannot be pickled back to the driver: %r", type(exc).__name__, e)
        return None


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.setblocking(True)  # whatever default timeout task code set: MSG_DONTWAIT sends must not wait
        worker: Worker = self.server.worker  # type: ignore[attr-defined]
        delivery = Delivery(self.request)
        pending: Optional[Dict[str, Any]] = None  # a request read early: the one sent together with a submit
        try:
            while True:
                if pending is None and delivery.direct and worker.park(delivery):
                    pending, delivery.handed = delivery.handed, None  # given back, with what was read there
                    if pending is not None and pending.get("op") == _CLOSED:
                        return
                msg, pending = pending if pending is not None else delivery.reader.read(), None
                worker.collected(delivery)
                reply = delivery.finish(worker.handle(msg, delivery))
                delivery.told = worker.carried_end(msg, reply)
                if delivery.held is not None:  # a submit: read its `wait` now if it came with it
                    pending = delivery.reader.arrived(SENT_ALONG_TIMEOUT_S)
                    if not worker.waits_for_held(pending, delivery):
                        worker.release(delivery)
        except (ProtocolError, OSError, ValueError):
            return
        finally:
            worker.release(delivery)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _group_members() -> List[int]:
    """The live processes of this replica's process group other than itself (its task's subprocesses)."""
    me, group = os.getpid(), os.getpgrp()
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def stop_process_group(grace_s: float = 1.0) -> None:
    """Takes the task's subprocesses along when the replica stops: SIGTERM to its process group, SIGKILL to what
    is left after `grace_s`. Only when the replica leads its group (as the local backend and pods start it), so a
    worker started inside someone else's group never signals strangers."""
    if os.getpgrp() != os.getpid() or not os.path.isdir("/proc"):
        return
    members = _group_members()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while members and time.monotonic() < deadline:
            time.sleep(0.02)  # polling for other processes to exit: there is no event to wait on
            members = _group_members()
        if not members:
            return


def _exit_now(code: int, reason: str) -> None:
    """Ends the replica at once (from any thread), its task's process group with it."""
    log.warning("%s: exiting", reason)
    stop_process_group()
    os._exit(code)


def _watch_parent_stdin() -> None:
    """Exits the replica when its parent's end of stdin closes: the parent died, even by SIGKILL."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    _exit_now(0, "parent process is gone (stdin closed)")


def _watch_orphan(worker: Worker, timeout_s: float) -> None:
    """Stops the replica once no authenticated request came for `timeout_s`: its pool (and connector) is gone."""
    while True:
        idle = time.monotonic() - worker.last_request
        if idle < timeout_s:
            time.sleep(min(timeout_s - idle, 1.0) + 0.01)  # a deadline to sleep to, not a synchronisation
            continue
        log.warning("no request from any pool for %.0fs (%s=%g): stopping", idle, ORPHAN_TIMEOUT_ENV, timeout_s)
        # a clean stop, delivered to the main thread so a blocking call is interrupted: a running execution fails
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
        _exit_now(1, f"did not stop within {STOP_GRACE_S:g}s of the orphan timeout")


def _orphan_timeout(parser: argparse.ArgumentParser) -> Optional[float]:
    raw = os.environ.get(ORPHAN_TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        parser.error(f"{ORPHAN_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0 (unset: never)")
    return value


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(prog="actor-replica", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("FLYTE_ACTOR_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("FLYTE_ACTOR_PORT", "8777")))
    parser.add_argument("--name", default=os.environ.get("FLYTE_ACTOR_REPLICA_NAME", socket.gethostname()))
    parser.add_argument(
        "--ready-fd", type=int, default=None, help="write {host, port, pid} as JSON here once listening"
    )
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin reaches EOF (parent died)")
    args = parser.parse_args(argv)

    token = os.environ.pop(TOKEN_ENV, "")  # the task code never sees the pool token
    if not token:
        parser.error(f"{TOKEN_ENV} must be set: every control request is authenticated with the pool token")
    orphan_timeout = _orphan_timeout(parser)
    os.environ["FLYTE_ACTOR_REPLICA"] = args.name
    _setup_log(args.name)
    if args.watch_stdin:
        threading.Thread(target=_watch_parent_stdin, name="parent-watch", daemon=True).start()

    import flytekit  # noqa: F401  -- pay the import before the first execution, not during it

    # what is loaded now (flytekit, this package; no task code yet) lives as long as the replica: the collector need
    # not walk it again on every collection (~20% less CPU per warm execution)
    gc.freeze()

    worker = Worker(token, args.name)
    server = _Server((args.host, args.port), _Handler)
    server.worker = worker  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    if orphan_timeout is not None:
        threading.Thread(target=_watch_orphan, args=(worker, orphan_timeout), name="orphan-watch", daemon=True).start()

    def _terminate(signum, frame):
        # Raise, never take a lock here: the handler runs between any two bytecodes of the main thread,
        # possibly while it holds the queue's lock inside get(). Idle or running, this ends serve_forever: a
        # running execution is neither recorded nor given an error.pb (its pool decides what becomes of it).
        worker.stopping = True
        raise ReplicaTerminated(f"replica {args.name} received signal {signum}")

    signal.signal(CANCEL_SIGNAL, _raise_cancel)
    host, port = server.server_address[:2]
    try:  # from here on a SIGTERM (even one right after the ready line) is a clean stop, exit code 0
        signal.signal(signal.SIGTERM, _terminate)
        if args.ready_fd is not None:
            with os.fdopen(args.ready_fd, "w") as f:
                f.write(json.dumps({"host": host, "port": port, "pid": os.getpid()}) + "\n")
        log.info("listening on %s:%s (pid %d)", host, port, os.getpid())
        worker.serve_forever()
    except (KeyboardInterrupt, ReplicaTerminated):
        pass
    finally:
        server.shutdown()
        stop_process_group()  # whatever stopped the replica, its task's subprocesses stop with it
        sys.stdout.flush()


if __name__ == "__main__":
    main()

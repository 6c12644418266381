"""The replica control protocol: length-prefixed JSON messages over TCP, each authenticated by the pool token.

A request is ``{"op": ..., "token": ..., ...}``; a reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": ...}``. See docs/replica-protocol.md.
"""

from __future__ import annotations

import base64
import enum
import hmac
import json
import socket
import struct
import threading
from typing import Any, Dict, List, Optional, Tuple, Union

PROTOCOL_VERSION = 2
"""2: `inputs_pb`, `return_outputs`/`outputs_pb` and `uncollected` (a version-1 replica ignores them)."""
INLINE_PROTOCOL = 2
"""The first version whose replicas read `inputs_pb`: older ones get the inputs as a file."""
TOKEN_ENV = "FLYTE_ACTOR_TOKEN"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct("!I")
INLINE_LIMIT_BYTES = 16 * 1024
"""Inputs and outputs up to this size may travel in the control messages instead of as files (`inputs_pb`,
`return_outputs`); bigger ones always go through storage. It also bounds what a replica keeps per remembered
outcome."""


class ProtocolError(ConnectionError):
    """The peer sent something that is not a protocol message, or closed the connection."""


class ReplicaExecutionState(enum.Enum):
    """An execution's state as a replica reports it (`state` in replies): one vocabulary for worker and pool."""

    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"
    """The replica has no record of it (never submitted there, or forgotten)."""

    @property
    def ended(self) -> bool:
        return self in (ReplicaExecutionState.SUCCEEDED, ReplicaExecutionState.FAILED, ReplicaExecutionState.CANCELLED)

    @classmethod
    def from_wire(cls, value: Any) -> "ReplicaExecutionState":
        """Reads a reply's `state`; anything outside the vocabulary is a protocol error, never a guess."""
        try:
            return cls(value)
        except ValueError:
            raise ProtocolError(
                f"replica reported execution state {value!r}; expected one of {[s.value for s in cls]}"
            ) from None


class ReplicaActivity(enum.Enum):
    """What a replica is doing (`state` in a `health` reply)."""

    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"


class RefusalCode(enum.Enum):
    """Why a replica refused a request (`code` in a refusal): clients branch on it, never on the message."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    """The token does not match the pool token: a misconfiguration, never retried."""
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    """The request is malformed (unknown op, missing field, a command that is not pyflyte-execute)."""
    BUSY = "BUSY"
    """The replica already runs (or holds) another execution: it runs one at a time."""
    STOPPING = "STOPPING"
    """The replica is shutting down and takes no new execution."""

    @property
    def transient(self) -> bool:
        """The same request may succeed on another (or a later) replica."""
        return self in (RefusalCode.BUSY, RefusalCode.STOPPING)


class ReplyLost(ProtocolError):
    """The request was sent but its reply never came (connection lost, timeout): it may have taken effect."""


class RequestRefused(ProtocolError):
    """The replica answered, but refused the request; `code` says why."""

    def __init__(self, message: str, code: RefusalCode):
        super().__init__(message)
        self.code = code

    @property
    def transient(self) -> bool:
        return self.code.transient


class Refusal(Exception):
    """Raised by a replica's op handler to refuse a request with a code (answered as `{"ok": false, ...}`)."""

    def __init__(self, code: RefusalCode, message: str):
        super().__init__(message)
        self.code = code

    def to_wire(self) -> Dict[str, Any]:
        return {"ok": False, "code": self.code.value, "error": str(self)}


class AuthenticationError(PermissionError):
    """The request's token does not match the replica's pool token: a misconfiguration, never a transient fault."""


def encode_bytes(data: Optional[bytes]) -> Optional[str]:
    """Bytes (a serialized protobuf) as a JSON string field."""
    return None if data is None else base64.b64encode(data).decode("ascii")


def decode_bytes(field: Any) -> Optional[bytes]:
    """A field written by `encode_bytes`; anything else than a string or null is a protocol error."""
    if field is None:
        return None
    if not isinstance(field, str):
        raise ProtocolError(f"expected a base64 string, got {type(field).__name__}")
    try:
        return base64.b64decode(field, validate=True)
    except ValueError as e:
        raise ProtocolError(f"not base64: {e}") from None


def encode_message(message: Dict[str, Any]) -> bytes:
    """One message as it goes on the wire: its length, then its JSON."""
    data = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(data)) + data


def send_message(sock: socket.socket, message: Dict[str, Any]) -> None:
    sock.sendall(encode_message(message))


def _parsed(data: bytes) -> Dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


class MessageReader:
    """Reads one connection's messages through a buffer: one `recv` usually brings a whole message, or the several a
    peer sent together (a pipeline), instead of one `recv` for the length and one for the body of each."""

    CHUNK = 1 << 16

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def read(self) -> Dict[str, Any]:
        """The next message, waiting for it (under the socket's timeout)."""
        size = self._size()
        while size is None or len(self._buf) < _HEADER.size + size:
            missing = _HEADER.size if size is None else _HEADER.size + size - len(self._buf)
            chunk = self.sock.recv(max(self.CHUNK, min(missing, 1 << 20)))
            if not chunk:
                raise ProtocolError("connection closed by peer")
            self._buf += chunk
            size = self._size()
        data = bytes(self._buf[_HEADER.size : _HEADER.size + size])
        del self._buf[: _HEADER.size + size]
        return _parsed(data)

    def arrived(self, timeout: float) -> Optional[Dict[str, Any]]:
        """The next message if it has (started to) come in already, else None at once. A message that has started
        to arrive is read to its end, waiting up to `timeout` for the rest."""
        if not self._buf:
            try:
                chunk = self.sock.recv(self.CHUNK, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            if not chunk:
                raise ProtocolError("connection closed by peer")
            self._buf += chunk
        size = self._size()
        if size is not None and len(self._buf) >= _HEADER.size + size:
            return self.read()
        previous = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.read()
        finally:
            self.sock.settimeout(previous)

    def _size(self) -> Optional[int]:
        if len(self._buf) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buf)
        if size > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {size} bytes exceeds the {MAX_MESSAGE_BYTES} byte limit")
        return size


def token_matches(expected: str, given: Optional[str]) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


class ReplicaClient:
    """One connection to a replica's control port. Thread-safe: requests are serialized on the connection."""

    def __init__(self, address: str, token: str, timeout: Optional[float] = 10.0):
        host, port = address.rsplit(":", 1)
        self.address = address
        self._token = token
        self._lock = threading.Lock()
        self._sock = socket.create_connection((host, int(port)), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(None)
        self._reader = MessageReader(self._sock)
        self.broken: Optional[str] = None
        """Why the connection was given up (an exchange failed half-way), or None: a broken client sends nothing."""

    def request(self, op: str, io_timeout: Optional[float] = None, **fields: Any) -> Dict[str, Any]:
        """Sends one request and returns the reply; raises ProtocolError if the replica went away.

        `io_timeout` bounds the socket wait here; a `timeout` field is the op's own (e.g. how long `wait` waits)."""
        reply = self.pipeline([(op, fields)], io_timeout)[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def pipeline(
        self, requests: List[Tuple[str, Dict[str, Any]]], io_timeout: Optional[float] = None
    ) -> List[Union[Dict[str, Any], Exception]]:
        """Sends several requests at once and reads their replies in order: one round trip instead of one each
        (the replica serves a connection's requests in order). Each reply, or the error that stands in for it (a
        refusal, or `ReplyLost`: the request went out and its reply never came), is returned in its request's
        place, so the caller knows which requests may have taken effect. Raises ProtocolError when nothing was
        sent (none took effect). A connection that failed mid-exchange is closed for good (`broken`): a late reply
        must never be read as the answer to a later request."""
        with self._lock:
            if self.broken is not None:
                raise ProtocolError(f"connection to replica at {self.address} is broken ({self.broken})")
            sent = 0  # requests wholly handed to the socket: only those can have taken effect
            lost: Optional[BaseException] = None  # why no further reply can be read
            try:
                frames = [encode_message({"op": op, "token": self._token, **fields}) for op, fields in requests]
                self._sock.settimeout(io_timeout)
                data, done, end = memoryview(b"".join(frames)), 0, 0
                for frame in frames:  # one write for all (they arrive together); counted per request
                    end += len(frame)
                    while done < end:
                        done += self._sock.send(data[done:])
                    sent += 1
            except (OSError, ValueError) as e:
                self._break(e)
                if not sent:
                    raise ProtocolError(f"{requests[0][0]} to replica at {self.address} failed: {e}") from e
                lost = e
            replies: List[Union[Dict[str, Any], Exception]] = []
            for i, (op, _) in enumerate(requests):
                if i >= sent:  # never sent: it cannot have taken effect
                    replies.append(ProtocolError(f"{op} to replica at {self.address} was not sent ({self.broken})"))
                    continue
                if lost is None:
                    try:
                        replies.append(self._checked(op, self._reader.read()))
                        continue
                    except (OSError, ValueError) as e:
                        self._break(e)
                        lost = e
                replies.append(ReplyLost(f"{op} to replica at {self.address} failed: {lost}"))
            return replies

    def _break(self, cause: BaseException) -> None:
        self.broken = f"{type(cause).__name__}: {cause}"
        try:
            self._sock.close()
        except OSError:
            pass

    def _checked(self, op: str, reply: Dict[str, Any]) -> Union[Dict[str, Any], Exception]:
        """The reply, or the error a refusal stands for (AuthenticationError for a bad token)."""
        if reply.get("ok"):
            return reply
        error = reply.get("error", "unknown error")
        try:
            code = RefusalCode(reply.get("code"))
        except ValueError:
            return ProtocolError(
                f"replica at {self.address} refused {op} with unknown code {reply.get('code')!r}: {error}"
            )
        if code is RefusalCode.UNAUTHENTICATED:
            return AuthenticationError(f"replica at {self.address} refused {op}: {error}")
        return RequestRefused(f"replica at {self.address} refused {op}: {error}", code)

    def abort(self) -> None:
        """Unblocks a request waiting on this connection (from another thread): it fails with ProtocolError."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

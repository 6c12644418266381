"""The stand-in's object store: pods and secrets by namespace, resource versions, an event log for watches,
label selectors, patches and owner-reference garbage collection, as the API server and etcd behave."""

from __future__ import annotations

import collections
import copy
import datetime
import re
import threading
import uuid
from typing import Callable, Deque, Dict, Iterator, List, Optional, Tuple

KINDS = {"pods": "Pod", "secrets": "Secret"}
EVENT_WINDOW = 2000
"""Events kept for watches; a watch from an older resource version gets 410 Gone, as after an etcd compaction."""


class ApiError(Exception):
    """An API answer other than success: becomes a `Status` object with this code and reason."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_REQ = re.compile(r"^\s*(!?)([A-Za-z0-9./_-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def parse_selector(selector: str) -> Callable[[Dict[str, str]], bool]:
    """A label selector (`a=b,c!=d,e,!f,g in (x,y),h notin (z)`) as a predicate over labels; 400 when malformed."""
    parts, depth, cur = [], 0, ""
    for ch in selector or "":
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    tests = []
    for part in parts:
        m = _REQ.match(part)
        if m is None:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        neg, key, op, value, setop, values = m.groups()
        if neg and (op or setop):
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        if op in ("=", "=="):
            tests.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif op == "!=":
            tests.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif setop:
            vs = {v.strip() for v in values.split(",")}
            if setop == "in":
                tests.append(lambda lb, k=key, vs=vs: lb.get(k) in vs)
            else:
                tests.append(lambda lb, k=key, vs=vs: lb.get(k) not in vs)
        elif neg:
            tests.append(lambda lb, k=key: k not in lb)
        else:
            tests.append(lambda lb, k=key: k in lb)
    return lambda labels: all(t(labels or {}) for t in tests)


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (strategic merge is treated the same: we send no list directives)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def json_patch(doc, ops: list):
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)

    def walk(path: str):
        if not path.startswith("/"):
            raise ApiError(422, "Invalid", f"json patch path {path!r} must start with '/'")
        keys = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
        parent = doc
        for k in keys[:-1]:
            parent = parent[int(k)] if isinstance(parent, list) else parent[k]
        return parent, keys[-1]

    def get(path):
        parent, k = walk(path)
        return parent[int(k)] if isinstance(parent, list) else parent[k]

    def remove(path):
        parent, k = walk(path)
        return parent.pop(int(k)) if isinstance(parent, list) else parent.pop(k)

    def add(path, value):
        parent, k = walk(path)
        if isinstance(parent, list):
            parent.insert(len(parent) if k == "-" else int(k), value)
        else:
            parent[k] = value

    try:
        for op in ops:
            kind, path = op["op"], op["path"]
            if kind == "add":
                add(path, copy.deepcopy(op["value"]))
            elif kind == "remove":
                remove(path)
            elif kind == "replace":
                remove(path)
                add(path, copy.deepcopy(op["value"]))
            elif kind == "move":
                add(path, remove(op["from"]))
            elif kind == "copy":
                add(path, copy.deepcopy(get(op["from"])))
            elif kind == "test":
                if get(path) != op["value"]:
                    raise ApiError(422, "Invalid", f"json patch test failed at {path}")
            else:
                raise ApiError(422, "Invalid", f"unknown json patch op {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ApiError(422, "Invalid", f"json patch cannot be applied: {e!r}")
    return doc


Event = Tuple[int, str, str, str, dict]  # resource version, type, resource, namespace, object


class Store:
    """Objects by (resource, namespace, name). Every write bumps the resource version and appends a watch event."""

    def __init__(self, validate: Callable[[dict], None]):
        self.validate = validate
        self.cond = threading.Condition()
        self.rv = 0
        self.objects: Dict[Tuple[str, str, str], dict] = {}
        self.events: Deque[Event] = collections.deque(maxlen=EVENT_WINDOW)
        self.oldest_rv = 0  # a watch may resume from any version >= this one
        self.namespaces = {"default"}
        self.service_accounts = {("default", "default")}
        self.on_delete: List[Callable[[str, dict], None]] = []
        self.admission: List[Callable[[str, str, dict], None]] = []  # (verb, resource, object) -> raise ApiError

    # ---- namespaces ----
    def add_namespace(self, ns: str, service_accounts=("default",)) -> None:
        with self.cond:
            self.namespaces.add(ns)
            self.service_accounts.update((ns, sa) for sa in service_accounts)

    def require_namespace(self, ns: str) -> None:
        if ns not in self.namespaces:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')

    # ---- reads ----
    def get(self, resource: str, ns: str, name: str) -> dict:
        with self.cond:
            obj = self.objects.get((resource, ns, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
            return copy.deepcopy(obj)

    def list(self, resource: str, ns: Optional[str], selector: str = "") -> Tuple[List[dict], int]:
        match = parse_selector(selector)
        with self.cond:
            items = [
                copy.deepcopy(o)
                for (r, n, _), o in sorted(self.objects.items())
                if r == resource and (ns is None or n == ns) and match(o["metadata"].get("labels"))
            ]
            return items, self.rv

    def find(self, resource: str, pred: Callable[[dict], bool]) -> List[dict]:
        with self.cond:
            return [copy.deepcopy(o) for (r, _, _), o in self.objects.items() if r == resource and pred(o)]

    # ---- writes ----
    def _record_locked(self, kind: str, resource: str, obj: dict) -> None:
        if len(self.events) == self.events.maxlen:
            self.oldest_rv = self.events[0][0] + 1
        self.events.append((self.rv, kind, resource, obj["metadata"]["namespace"], copy.deepcopy(obj)))
        self.cond.notify_all()

    def create(self, resource: str, ns: str, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the request")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", KINDS[resource])
        meta["namespace"] = ns
        if resource == "secrets" and "stringData" in obj:
            import base64

            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(v.encode()).decode()
        with self.cond:
            self.require_namespace(ns)
            if (resource, ns, meta.get("name")) in self.objects:
                raise ApiError(409, "AlreadyExists", f'{resource} "{meta.get("name")}" already exists')
            for check in self.admission:
                check("create", resource, obj)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
            meta.pop("resourceVersion", None)
            self.validate(obj)
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            self.objects[(resource, ns, meta["name"])] = obj
            self._record_locked("ADDED", resource, obj)
            self._collect_locked()
            return copy.deepcopy(obj)

    def update(self, resource: str, ns: str, name: str, change: Callable[[dict], Optional[dict]]) -> dict:
        """Applies `change` (returns the new object, or mutates in place) and stores it, validated."""
        with self.cond:
            current = self.objects.get((resource, ns, name))
            if current is None:
                raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
            new = copy.deepcopy(current)
            new = change(new) or new
            for key in ("uid", "name", "namespace", "creationTimestamp"):  # immutable: what the server keeps
                new.setdefault("metadata", {})[key] = current["metadata"][key]
            new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            if new == current:
                return copy.deepcopy(current)
            self.validate(new)
            self.rv += 1
            new["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[(resource, ns, name)] = new
            self._record_locked("MODIFIED", resource, new)
            return copy.deepcopy(new)

    def remove(self, resource: str, ns: str, name: str) -> Optional[dict]:
        """Deletes an object from storage at once (the end of a graceful deletion, or grace 0)."""
        with self.cond:
            obj = self.objects.pop((resource, ns, name), None)
            if obj is None:
                return None
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._record_locked("DELETED", resource, obj)
            self._collect_locked()
        for fn in self.on_delete:
            fn(resource, obj)
        return obj

    def _collect_locked(self) -> None:
        """Garbage collection: objects whose every owner (by uid) is gone are deleted, as the GC controller does."""
        while True:
            uids = {o["metadata"]["uid"] for o in self.objects.values()}
            orphans = [
                key
                for key, o in self.objects.items()
                if o["metadata"].get("ownerReferences")
                and not any(ref["uid"] in uids for ref in o["metadata"]["ownerReferences"])
            ]
            if not orphans:
                return
            for key in orphans:
                obj = self.objects.pop(key)
                self.rv += 1
                obj["metadata"]["resourceVersion"] = str(self.rv)
                self._record_locked("DELETED", key[0], obj)

    def compact(self) -> None:
        """Forgets every event so far, as an etcd compaction does: older watches get 410 Gone."""
        with self.cond:
            self.events.clear()
            self.oldest_rv = self.rv + 1

    # ---- watch ----
    def watch(
        self, resource: str, ns: Optional[str], selector: str, since: int, stop: Callable[[], bool], timeout: float
    ) -> Iterator[Tuple[int, Optional[str], Optional[dict]]]:
        """Yields (rv, type, object) after `since`, and (rv, None, None) on every idle wake-up: the version the watch
        has seen up to (events of other objects included), which is what a bookmark carries."""
        match = parse_selector(selector)
        last = since
        import time

        deadline = time.monotonic() + timeout
        while not stop() and time.monotonic() < deadline:
            with self.cond:
                if last + 1 < self.oldest_rv:
                    raise ApiError(410, "Expired", f"too old resource version: {since} ({self.oldest_rv - 1})")
                batch = [e for e in self.events if e[0] > last]
                if not batch:
                    self.cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                    batch = [e for e in self.events if e[0] > last]
            if not batch:
                yield last, None, None
                continue
            for rv, kind, res, n, obj in batch:
                last = rv
                if res == resource and (ns is None or n == ns) and match(obj["metadata"].get("labels")):
                    yield rv, kind, obj

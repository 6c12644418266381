"""The stand-in Kubernetes API server: a real HTTP server on 127.0.0.1 speaking the core/v1 REST API for pods and
secrets, so the unmodified `kubernetes` client (and the connector using it) talks to it through a kubeconfig."""

from __future__ import annotations

import collections
import json
import os
import re
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Tuple

from kubernetes.utils.quantity import parse_quantity

from . import policy
from .kubelet import Kubelet
from .store import KINDS, ApiError, Store, json_patch, merge_patch, now

_PATH = re.compile(r"^/api/v1(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>pods|secrets)(?:/(?P<name>[^/]+))?$")
_TRUE = ("true", "True", "1")
ADMIN = "system:admin"


class Cluster:
    """Store + API server + kubelet, with the RBAC of the manifests in `manifest_dir` bound to `service_account`."""

    def __init__(
        self,
        workdir: str,
        manifest_dir: str,
        service_account: Tuple[str, str],
        token: str,
        base_env: Optional[Dict[str, str]] = None,
    ):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.store = Store(policy.validate)
        self.store.admission.append(self._admit_pod)
        self.rbac = policy.Rbac(manifest_dir, service_account)
        self.user = f"system:serviceaccount:{service_account[0]}:{service_account[1]}"
        self.token = token
        self.admin_token = uuid.uuid4().hex
        self.tokens = {token: self.user, self.admin_token: ADMIN}  # the admin (tests) is not subject to RBAC
        self.quotas: Dict[str, Dict[str, str]] = {}
        self.requests: collections.Counter = collections.Counter()  # (verb, resource) -> count
        self.refused: list = []  # the messages of requests RBAC refused
        self.bookmark_interval = 60.0
        env = base_env if base_env is not None else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.kubelet = Kubelet(self.store, workdir, env)
        self._stopping = threading.Event()
        handler = type("Handler", (_Handler,), {"cluster": self})
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self._thread = threading.Thread(target=self.http.serve_forever, name="stand-in-apiserver", daemon=True)

    def start(self) -> "Cluster":
        self._thread.start()
        self.kubelet.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.http.shutdown()
        self.http.server_close()
        self.kubelet.stop()

    def api(self, token: Optional[str] = None):
        """A CoreV1Api of the unmodified client, as the connector (default) or with another token."""
        from kubernetes import client, config

        path = self.write_kubeconfig(os.path.join(self.workdir, f"kubeconfig-{uuid.uuid4().hex[:6]}"), token)
        return client.CoreV1Api(config.new_client_from_config(path))

    def write_kubeconfig(self, path: str, token: Optional[str] = None) -> str:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "connector", "user": {"token": token or self.token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "connector"}}],
            "current-context": "stand-in",
        }
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        return path

    def add_quota(self, namespace: str, hard: Dict[str, str]) -> None:
        """A ResourceQuota on limits (e.g. {"limits.cpu": "4"}): pods without those limits are refused, as
        flyte-core's per-project quotas refuse them."""
        self.quotas[namespace] = hard

    def pods(self, namespace: Optional[str] = None, selector: str = "") -> list:
        return self.store.list("pods", namespace, selector)[0]

    def secrets(self, namespace: Optional[str] = None, selector: str = "") -> list:
        return self.store.list("secrets", namespace, selector)[0]

    def delete_pod(self, namespace: str, name: str, grace: Optional[int] = None) -> None:
        """Someone else (kubectl, an eviction) deletes a pod."""
        self.delete("pods", namespace, name, grace)

    # ---- admission ----
    def _admit_pod(self, verb: str, resource: str, pod: dict) -> None:
        if resource != "pods":
            return
        ns, name, spec = pod["metadata"]["namespace"], pod["metadata"].get("name"), pod.get("spec") or {}
        sa = spec.setdefault("serviceAccountName", "default")
        if (ns, sa) not in self.store.service_accounts:
            raise ApiError(
                403,
                "Forbidden",
                f'pods "{name}" is forbidden: error looking up service account {ns}/{sa}: '
                f'serviceaccount "{sa}" not found',
            )
        hard = self.quotas.get(ns)
        if hard:
            containers = spec.get("containers") or []
            missing = [
                f"{k} for: {c['name']}"
                for k in sorted(hard)
                for c in containers
                if k.split(".", 1)[1] not in ((c.get("resources") or {}).get(k.split(".", 1)[0]) or {})
            ]
            if missing:
                raise ApiError(
                    403,
                    "Forbidden",
                    f'pods "{name}" is forbidden: failed quota: quota: must specify ' + "; ".join(missing),
                )
            for k, limit in sorted(hard.items()):
                kind, res = k.split(".", 1)
                used = sum(
                    float(parse_quantity((c.get("resources") or {}).get(kind, {}).get(res, "0")))
                    for p in self.store.list("pods", ns)[0]
                    if p["status"].get("phase") not in ("Succeeded", "Failed")
                    for c in p["spec"]["containers"]
                )
                wanted = sum(float(parse_quantity(c["resources"][kind][res])) for c in containers)
                if used + wanted > float(parse_quantity(limit)):
                    raise ApiError(
                        403,
                        "Forbidden",
                        f'pods "{name}" is forbidden: exceeded quota: quota, requested: {k}={wanted:g}, '
                        f"used: {k}={used:g}, limited: {k}={limit}",
                    )
        pod["status"] = {"phase": "Pending", "qosClass": _qos(containers=spec.get("containers") or [])}

    # ---- the REST verbs ----
    def delete(self, resource: str, ns: str, name: str, grace: Optional[int]) -> dict:
        obj = self.store.get(resource, ns, name)
        if resource != "pods":
            self.store.remove(resource, ns, name)
            return {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": name, "kind": resource},
            }
        if grace is None:
            grace = int(obj["spec"].get("terminationGracePeriodSeconds", 30))
        if grace == 0 or not obj["spec"].get("nodeName"):
            return self.store.remove(resource, ns, name) or obj

        def mark(p: dict) -> dict:
            current = p["metadata"].get("deletionGracePeriodSeconds")
            if current is None or grace < current:
                p["metadata"]["deletionTimestamp"] = p["metadata"].get("deletionTimestamp") or now()
                p["metadata"]["deletionGracePeriodSeconds"] = grace
            return p

        return self.store.update(resource, ns, name, mark)


def _qos(containers: list) -> str:
    res = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in res):
        return "BestEffort"
    guaranteed = all(
        (r.get("limits") or {}).get(k) and (r.get("requests") or {}).get(k, r["limits"][k]) == r["limits"][k]
        for r in res
        for k in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"


class _Handler(BaseHTTPRequestHandler):
    cluster: Cluster
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        cluster = self.cluster
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        body = self._body()
        try:
            m = _PATH.match(url.path)
            if m is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource {url.path}")
            ns, res, name = m.group("ns"), m.group("res"), m.group("name")
            watch = query.get("watch") in _TRUE
            verb = {
                "GET": "watch" if watch else ("get" if name else "list"),
                "POST": "create",
                "PATCH": "patch",
                "PUT": "update",
                "DELETE": "delete",
            }[method]
            auth = self.headers.get("Authorization", "")
            user = cluster.tokens.get(auth[len("Bearer ") :]) if auth.startswith("Bearer ") else None
            if user is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if user != ADMIN:
                cluster.requests[(verb, res)] += 1
                try:
                    cluster.rbac.check(verb, res, ns, user)
                except ApiError as e:
                    cluster.refused.append(e.message)
                    raise
            if verb == "watch":
                return self._watch(res, ns, query)
            if verb == "list":
                items, rv = cluster.store.list(res, ns, query.get("labelSelector", ""))
                kind = KINDS[res]
                return self._send(
                    200,
                    {
                        "kind": f"{kind}List",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(rv)},
                        "items": items,
                    },
                )
            if verb == "create":
                if name:
                    raise ApiError(405, "MethodNotAllowed", "create on a named resource")
                return self._send(201, cluster.store.create(res, ns, body))
            if verb == "get":
                return self._send(200, cluster.store.get(res, ns, name))
            if verb == "patch":
                kind = self.headers.get("Content-Type", "").split(";")[0]
                if kind == "application/json-patch+json":
                    change = lambda o: json_patch(o, body)  # noqa: E731
                elif kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    change = lambda o: merge_patch(o, body)  # noqa: E731
                else:
                    raise ApiError(
                        415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {kind}"
                    )
                return self._send(200, cluster.store.update(res, ns, name, change))
            if verb == "update":
                return self._send(200, cluster.store.update(res, ns, name, lambda o: body))
            grace = query.get("gracePeriodSeconds", (body or {}).get("gracePeriodSeconds"))
            return self._send(200, cluster.delete(res, ns, name, None if grace is None else int(grace)))
        except ApiError as e:
            self._send(e.code, e.status())

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if not n:
            return None
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _send(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, obj: dict) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, res: str, ns: Optional[str], query: Dict[str, str]) -> None:
        """A watch stream: chunked JSON events; 410 Gone (as an ERROR event) for a compacted resource version."""
        cluster, store = self.cluster, self.cluster.store
        rv = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks") in _TRUE
        timeout = float(query.get("timeoutSeconds") or 1800)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        selector = query.get("labelSelector", "")
        try:
            if rv in ("", "0"):  # from now, starting with the current state as ADDED events
                items, since = store.list(res, ns, selector)
                for item in items:
                    self._chunk({"type": "ADDED", "object": item})
            else:
                since = int(rv)
            last_bookmark = time.monotonic()
            for since, kind, obj in store.watch(res, ns, selector, since, cluster._stopping.is_set, timeout):
                if kind is not None:
                    self._chunk({"type": kind, "object": obj})
                if bookmarks and time.monotonic() - last_bookmark >= cluster.bookmark_interval:
                    last_bookmark = time.monotonic()
                    self._chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": KINDS[res],
                                "apiVersion": "v1",
                                "metadata": {"resourceVersion": str(since)},
                            },
                        }
                    )
        except ApiError as e:
            self._chunk({"type": "ERROR", "object": e.status()})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

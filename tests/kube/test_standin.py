"""The stand-in behaves as the API server and kubelet do where the connector relies on it, through the unmodified
`kubernetes` client; and the shipped manifests are valid Kubernetes 1.30 objects."""

import glob
import os
import sys
import time

import kubernetes_validate
import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from . import DEPLOY_DIR, NAMESPACE, standin
from .store import json_patch, merge_patch

pytestmark = pytest.mark.timeout(60)
PY = sys.executable


@pytest.fixture
def cluster(tmp_path):
    c = standin(str(tmp_path))
    yield c
    c.stop()


def _pod(name, command, labels=None, **container):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "img:1", "command": command, **container}],
        },
    }


def _wait(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _status(e: ApiException) -> tuple:
    import json

    return e.status, json.loads(e.body)["message"]


# ---- manifests ----


def _manifests():
    docs = []
    for path in sorted(glob.glob(os.path.join(DEPLOY_DIR, "*.yaml"))):
        with open(path) as f:
            docs += [(os.path.basename(path), d) for d in yaml.safe_load_all(f) if d]
    return docs


def test_every_shipped_manifest_is_a_valid_kubernetes_1_30_object():
    docs = _manifests()
    kustomization = next(d for name, d in docs if name == "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(DEPLOY_DIR, "*.yaml")) if "kustomization" not in p
    )
    kinds = set()
    for name, d in docs:
        if name == "kustomization.yaml":
            continue
        kubernetes_validate.validate(d, "1.30.0", strict=True)
        kinds.add(d["kind"])
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "NetworkPolicy"}
    deployment = next(d for _, d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"] and container["livenessProbe"]
    assert {"name": "metrics", "containerPort": 9090} in container["ports"]
    policy = next(d for _, d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8777}]
    role = next(d for _, d in docs if d["kind"] == "ClusterRole")
    assert {r["resources"][0]: sorted(r["verbs"]) for r in role["rules"]} == {
        "pods": ["create", "delete", "list", "watch"],
        "secrets": ["create", "get"],
    }


# ---- API server ----


def test_rbac_allows_only_the_shipped_role_and_needs_a_token(cluster):
    api = cluster.api()
    api.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    with pytest.raises(ApiException) as e:
        api.patch_namespaced_secret("s", NAMESPACE, {"metadata": {"labels": {"a": "b"}}})
    assert e.value.status == 403 and 'cannot patch resource "secrets"' in _status(e.value)[1]
    with pytest.raises(ApiException) as e:
        api.list_namespaced_secret(NAMESPACE)
    assert e.value.status == 403
    with pytest.raises(ApiException) as e:
        cluster.api(token="forged").list_namespaced_pod(NAMESPACE)
    assert e.value.status == 401


def test_objects_are_validated_strictly_with_422(cluster):
    api = cluster.api()
    snake = client.V1OwnerReference(api_version="v1", kind="Pod", name="p", uid="u").to_dict()
    with pytest.raises(ApiException) as e:  # the bug the mocked tests missed: to_dict() gives snake_case keys
        api.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "s", "ownerReferences": [snake]}})
    assert e.value.status == 422 and "apiVersion" in _status(e.value)[1]
    with pytest.raises(ApiException) as e:
        api.create_namespaced_pod(NAMESPACE, _pod("p", ["true"], labels={"a": "not a value!"}))
    assert e.value.status == 422
    with pytest.raises(ApiException) as e:
        api.create_namespaced_pod(NAMESPACE, _pod("p", ["true"], readinessProbe={"tcp_socket": {"port": 1}}))
    assert e.value.status == 422 and "tcp_socket" in _status(e.value)[1]


def test_label_selectors_namespaces_and_listing_across_namespaces(cluster):
    admin = cluster.api(cluster.admin_token)
    cluster.store.add_namespace("other")
    for ns, name, labels in [(NAMESPACE, "a", {"x": "1"}), (NAMESPACE, "b", {"x": "2", "y": ""}), ("other", "c", {})]:
        admin.create_namespaced_secret(ns, {"metadata": {"name": name, "labels": labels}})

    def names(selector, ns=NAMESPACE):
        items = admin.list_namespaced_secret(ns, label_selector=selector).items
        return sorted(s.metadata.name for s in items)

    assert names("x=1") == ["a"] and names("x!=1") == ["b"] and names("x in (1,2)") == ["a", "b"]
    assert names("y") == ["b"] and names("!y") == ["a"] and names("x notin (2),x") == ["a"]
    assert sorted(s.metadata.name for s in admin.list_secret_for_all_namespaces().items) == ["a", "b", "c"]
    with pytest.raises(ApiException) as e:
        admin.create_namespaced_secret("nowhere", {"metadata": {"name": "s"}})
    assert _status(e.value) == (404, 'namespaces "nowhere" not found')
    assert admin.list_namespaced_pod("nowhere").items == []  # listing a missing namespace is empty, as on a cluster


def test_watch_resumes_from_a_version_sends_bookmarks_and_answers_410_after_compaction(cluster):
    api = cluster.api()
    cluster.bookmark_interval = 0.2
    first = api.create_namespaced_pod(NAMESPACE, _pod("p1", ["sleep", "30"], labels={"w": "1"}))
    _wait(lambda: cluster.pods()[0]["status"].get("phase") == "Running", what="p1 running")
    rv = cluster.store.rv
    api.create_namespaced_pod(NAMESPACE, _pod("p2", ["sleep", "30"], labels={"w": "1"}))
    events = []
    for e in watch.Watch().stream(
        api.list_namespaced_pod,
        NAMESPACE,
        label_selector="w=1",
        resource_version=str(rv),
        allow_watch_bookmarks=True,
        timeout_seconds=2,
    ):
        events.append((e["type"], e["raw_object"]["metadata"].get("name")))
        if e["type"] == "BOOKMARK":
            break
    assert events[0] == ("ADDED", "p2") and ("ADDED", "p1") not in events and events[-1][0] == "BOOKMARK"
    cluster.store.compact()
    with pytest.raises(ApiException) as e:
        list(
            watch.Watch().stream(
                api.list_namespaced_pod, NAMESPACE, resource_version=first.metadata.resource_version, timeout_seconds=2
            )
        )
    assert e.value.status == 410


def test_patches_merge_strategic_and_json():
    doc = {"metadata": {"labels": {"a": "1", "b": "2"}}, "data": {"k": "v"}}
    assert merge_patch(doc, {"metadata": {"labels": {"a": None, "c": "3"}}})["metadata"]["labels"] == {
        "b": "2",
        "c": "3",
    }
    patched = json_patch(
        doc, [{"op": "add", "path": "/metadata/labels/d", "value": "4"}, {"op": "remove", "path": "/data"}]
    )
    assert patched == {"metadata": {"labels": {"a": "1", "b": "2", "d": "4"}}}


def test_patches_through_the_api_are_validated(cluster):
    admin = cluster.api(cluster.admin_token)
    admin.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "s"}})
    admin.patch_namespaced_secret("s", NAMESPACE, {"metadata": {"labels": {"a": "b"}}})
    admin.patch_namespaced_secret("s", NAMESPACE, [{"op": "add", "path": "/metadata/labels/c", "value": "d"}])
    assert cluster.store.get("secrets", NAMESPACE, "s")["metadata"]["labels"] == {"a": "b", "c": "d"}
    with pytest.raises(ApiException) as e:
        admin.patch_namespaced_secret("s", NAMESPACE, {"metadata": {"ownerReferences": [{"uid": "x"}]}})
    assert e.value.status == 422


def test_graceful_deletion_sends_sigterm_then_sigkill_and_collects_owned_objects(cluster):
    api = cluster.api()
    ignore_term = (
        "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    )
    pod = api.create_namespaced_pod(NAMESPACE, _pod("p", ["python", "-c", ignore_term]))
    _wait(lambda: "up" in cluster.kubelet.log("p"), what="the container's process")
    pid = cluster.kubelet.pid("p")
    owner = {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": pod.metadata.uid}
    api.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "owned", "ownerReferences": [owner]}})
    orphan = dict(owner, uid="no-such-uid")
    api.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "orphan", "ownerReferences": [orphan]}})
    assert [s["metadata"]["name"] for s in cluster.secrets()] == ["owned"]  # an absent owner: collected at once
    started = time.monotonic()
    deleted = api.delete_namespaced_pod("p", NAMESPACE, grace_period_seconds=1)
    assert deleted.metadata.deletion_timestamp is not None
    _wait(lambda: not cluster.pods(), what="the pod removed after its grace")
    assert time.monotonic() - started >= 1.0  # SIGTERM was ignored: SIGKILL came after the grace
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert cluster.secrets() == []


def test_quota_refuses_pods_without_limits_and_pods_over_it(cluster):
    api = cluster.api()
    cluster.add_quota(NAMESPACE, {"limits.cpu": "2", "limits.memory": "2Gi"})
    with pytest.raises(ApiException) as e:
        api.create_namespaced_pod(NAMESPACE, _pod("p", ["sleep", "5"]))
    assert e.value.status == 403 and "failed quota" in _status(e.value)[1] and "limits.cpu" in _status(e.value)[1]
    big = {"limits": {"cpu": "4", "memory": "1Gi"}}
    with pytest.raises(ApiException) as e:
        api.create_namespaced_pod(NAMESPACE, _pod("p", ["sleep", "5"], resources=big))
    assert e.value.status == 403 and "exceeded quota" in _status(e.value)[1]
    api.create_namespaced_pod(NAMESPACE, _pod("p", ["sleep", "5"], resources={"limits": {"cpu": "1", "memory": "1Gi"}}))


# ---- kubelet ----


def test_the_kubelet_runs_the_command_with_its_env_resolved_on_its_own_ip(cluster):
    api = cluster.api()
    api.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "creds"}, "stringData": {"token": "t0k"}})
    env = [
        {"name": "PLAIN", "value": "v"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    script = "import os; print(*(os.environ[k] for k in ('PLAIN','TOKEN','IP','NAME','NS')), flush=True)"
    for name in ("p1", "p2"):
        api.create_namespaced_pod(NAMESPACE, _pod(name, ["python", "-c", script], env=env))
    _wait(lambda: all(p["status"].get("phase") == "Succeeded" for p in cluster.pods()), what="both pods done")
    ips = [p["status"]["podIP"] for p in cluster.pods()]
    assert len(set(ips)) == 2 and "127.0.0.1" not in ips
    assert cluster.kubelet.log("p1").split() == ["v", "t0k", ips[0], "p1", NAMESPACE]
    (cs,) = cluster.pods()[0]["status"]["containerStatuses"]
    assert cs["state"]["terminated"]["exitCode"] == 0 and cs["state"]["terminated"]["reason"] == "Completed"


def test_readiness_probe_conditions_and_faults(cluster):
    api = cluster.api()
    serve = "import os,socket,time; s=socket.socket(); s.bind((os.environ['IP'],8777)); s.listen(); time.sleep(60)"
    env = [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    probe = {"tcpSocket": {"port": 8777}, "periodSeconds": 1}
    api.create_namespaced_pod(NAMESPACE, _pod("p", ["python", "-c", serve], env=env, readinessProbe=probe))

    def condition(kind):
        pods = cluster.pods()
        return next((c for c in pods[0]["status"].get("conditions", []) if c["type"] == kind), {}) if pods else {}

    _wait(lambda: condition("Ready").get("status") == "True", what="ready")
    cluster.kubelet.oom_kill("p")
    _wait(lambda: cluster.pods()[0]["status"]["phase"] == "Failed", what="OOM kill")
    term = cluster.pods()[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["reason"], term["exitCode"]) == ("OOMKilled", 137)

    cluster.kubelet.bad_images.add("gone:1")
    api.create_namespaced_pod(
        NAMESPACE, dict(_pod("q", ["sleep", "1"]), spec={"containers": [{"name": "main", "image": "gone:1"}]})
    )

    def waiting():
        pod = cluster.store.get("pods", NAMESPACE, "q")
        return pod["status"].get("containerStatuses", [{}])[0].get("state", {}).get("waiting", {}).get("reason")

    _wait(lambda: waiting() == "ErrImagePull", what="ErrImagePull")
    _wait(lambda: waiting() == "ImagePullBackOff", what="ImagePullBackOff")
    assert cluster.kubelet.pid("q") is None

    unschedulable = _pod("r", ["sleep", "1"])
    unschedulable["spec"]["nodeSelector"] = {"gpu": "a100"}
    api.create_namespaced_pod(NAMESPACE, unschedulable)
    _wait(lambda: cluster.store.get("pods", NAMESPACE, "r")["status"].get("conditions"), what="scheduling verdict")
    (scheduled,) = cluster.store.get("pods", NAMESPACE, "r")["status"]["conditions"]
    assert (scheduled["type"], scheduled["status"], scheduled["reason"]) == ("PodScheduled", "False", "Unschedulable")


def test_node_loss_freezes_the_process_marks_it_not_ready_then_deletes_the_pod(cluster):
    api = cluster.api()
    cluster.kubelet.node_loss_grace = 1.0
    api.create_namespaced_pod(NAMESPACE, _pod("p", ["sleep", "30"]))
    _wait(
        lambda: (
            cluster.kubelet.pid("p")
            if cluster.pods() and cluster.pods()[0]["status"].get("phase") == "Running"
            else None
        )
    )
    pid = cluster.kubelet.pid("p")
    cluster.kubelet.lose_node("p")
    with open(f"/proc/{pid}/stat") as f:
        assert f.read().split()[2] == "T"  # stopped
    ready = next(c for c in cluster.pods()[0]["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    _wait(lambda: cluster.pods() and cluster.pods()[0]["metadata"].get("deletionTimestamp"), what="taint eviction")
    with open(f"/proc/{pid}/stat") as f:
        assert f.read().split()[2] == "T"  # no kubelet confirms the deletion: the pod stays, its process frozen
    _wait(lambda: not cluster.pods(), what="the pod gone with its node")
    assert not os.path.exists(f"/proc/{pid}")  # force-deleted with its node: it never wakes up to write anything


def test_an_evicted_pod_is_failed_with_its_containers_stopped_and_stays_until_deleted(cluster):
    api = cluster.api()
    api.create_namespaced_pod(NAMESPACE, _pod("e", ["sleep", "30"]))
    _wait(lambda: cluster.kubelet.pid("e") if cluster.pods()[0]["status"].get("phase") == "Running" else None)
    pid = cluster.kubelet.pid("e")
    cluster.kubelet.evict("e")
    _wait(lambda: cluster.pods()[0]["status"].get("phase") == "Failed", what="the eviction reported")
    (pod,) = cluster.pods()
    assert pod["status"]["reason"] == "Evicted" and "low on resource: memory" in pod["status"]["message"]
    disruption = next(c for c in pod["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert (disruption["status"], disruption["reason"]) == ("True", "TerminationByKubelet")
    assert "terminated" in pod["status"]["containerStatuses"][0]["state"]
    assert not os.path.exists(f"/proc/{pid}")
    assert not pod["metadata"].get("deletionTimestamp")  # the object stays until someone deletes it

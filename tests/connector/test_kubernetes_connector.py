"""End to end on the stand-in cluster: the real `pyflyte serve connector` with FLYTE_ACTOR_BACKEND=kubernetes and a
kubeconfig pointing at tests/kube's API server, driven over gRPC as propeller drives it. Replica pods are local
processes at their own 127.a.b.N, started by the stand-in's kubelet from the pods the connector creates."""

import functools
import os
import sys
import time

import k8s_tasks as k
import pytest
from harness import PHASE, Attempt, ConnectorServer, Propeller, literal_map, output_value, serialize
from waiting import wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kube import NAMESPACE, ROOT, standin  # noqa: E402

from flytekitplugins_actor.actor_map import map as actor_map  # noqa: E402

pytestmark = pytest.mark.timeout(120)
QUOTA_NAMESPACE = "quota-team"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = standin(str(tmp_path_factory.mktemp("cluster")), image_paths=(HERE, ROOT))
    c.store.add_namespace(QUOTA_NAMESPACE)
    c.add_quota(QUOTA_NAMESPACE, {"limits.cpu": "4", "limits.memory": "8Gi"})  # as flyte-core's project quotas
    yield c
    c.stop()


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    env = {
        "FLYTE_ACTOR_BACKEND": "kubernetes",
        "KUBECONFIG": cluster.kubeconfig,
        "FLYTE_ACTOR_K8S_NOT_READY_GRACE_S": "2",
        "FLYTE_ACTOR_SYSTEM_RETRIES": "1",
        "FLYTE_ACTOR_K8S_EXIT_CONFIRM_S": "15",
    }
    s = ConnectorServer(str(tmp_path_factory.mktemp("connector")), env=env).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def propeller(server):
    return Propeller(server)


def _pods(cluster, env: str, namespace: str = NAMESPACE) -> list:
    return cluster.pods(namespace, f"flyte-actor/env={env}")


def _ready_pods(cluster, env: str, namespace: str = NAMESPACE) -> list:
    return [
        p
        for p in _pods(cluster, env, namespace)
        if not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def _running_in_replica(gate: str) -> None:
    """Waits until the task runs in its replica (RUNNING is answered once dispatched, before the replica has it)."""
    wait_until(lambda: os.path.exists(f"{gate}.started"), 60, "the task running in its replica")


def _with_image(task, image: str):
    """The task's template as from an environment with another image (its own pool: the image is the code version)."""
    template = serialize(task)
    template.container.image = image
    template.custom.fields["spec"].struct_value.fields["container_image"].string_value = image
    return template


def _too_big(task, image: str, cpu: str = "64"):
    """The task's template, from an environment of its own (`image`) whose pods request more CPU than a node has."""
    from flyteidl.core import tasks_pb2

    template = _with_image(task, image)
    del template.container.resources.requests[:]
    template.container.resources.requests.add(name=tasks_pb2.Resources.CPU, value=cpu)
    return template


def _run(propeller, base, task, timeout=60.0, **inputs):
    a = Attempt(base, task, literal_map(task, **inputs))
    meta = propeller.create(a)
    return a, meta, propeller.wait(meta, timeout=timeout)


def test_a_task_runs_on_a_replica_pod_and_the_next_one_reuses_it(cluster, propeller, base):
    a, _, r = _run(propeller, base, k.add, a=1, b=2)
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", int) == 3
    (pod,) = _pods(cluster, "k8s-main")
    creates = cluster.requests[("create", "pods")]
    a, _, r = _run(propeller, base, k.host)
    assert r.phase == PHASE.SUCCEEDED, r.message
    ip, _, pod_name = output_value(a.outputs(), "o0", str).split("/")
    assert ip == pod["status"]["podIP"] and pod_name == pod["metadata"]["name"]  # ran in that pod, bound to its IP
    assert cluster.requests[("create", "pods")] == creates  # warm: no new pod
    assert "warm" in r.message or r.log_links, r.message
    assert r.log_links[0].uri == f"k8s://{NAMESPACE}/{pod['metadata']['name']}/primary"


def test_a_map_fans_out_over_two_replica_pods(cluster, propeller, base):
    m = actor_map(k.where)
    a = Attempt(base, m, literal_map(m, x=list(range(8))))
    r = propeller.wait(propeller.create(a), task_type="actor_map", timeout=60)
    assert r.phase == PHASE.SUCCEEDED, r.message
    values = output_value(a.outputs(), "o0", list[str])
    assert [int(v.split(":")[0]) for v in values] == list(range(8))
    ips = {p["status"]["podIP"] for p in _pods(cluster, "k8s-map")}
    assert len(ips) == 2 and {v.split(":")[1] for v in values} <= ips


def test_replica_pods_fit_a_namespace_quota(cluster, propeller, base):
    a = Attempt(base, k.add, literal_map(k.add, a=2, b=3), namespace=QUOTA_NAMESPACE)
    r = propeller.wait(propeller.create(a), timeout=60)
    assert r.phase == PHASE.SUCCEEDED, r.message  # the pods carry limits (connector defaults), so the quota admits them
    (pod,) = _pods(cluster, "k8s-main", QUOTA_NAMESPACE)
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "1000m", "memory": "1024Mi"}


def _runs(gate: str) -> list:
    """What `k8s_tasks.counted` recorded: (event, pod IP) per line, in order."""
    try:
        with open(f"{gate}.runs") as f:
            return [tuple(line.split(" ", 1)) for line in f.read().splitlines()]
    except FileNotFoundError:
        return []


def _starts(gate: str) -> list:
    return [ip for event, ip in _runs(gate) if event == "start"]


def _pod_at(cluster, ip: str) -> dict:
    (pod,) = [p for p in _pods(cluster, "k8s-faults") if p["status"].get("podIP") == ip]
    return pod


def _counted(propeller, base, exit_code: int = 0):
    """Creates a `counted` execution and waits until it runs; returns (attempt, meta, gate)."""
    gate = os.path.join(base, "gate")
    a = Attempt(base, k.counted, literal_map(k.counted, gate=gate, exit_code=exit_code))
    meta = propeller.create(a)
    wait_until(lambda: _starts(gate), 60, "the task running in its replica")
    return a, meta, gate


@pytest.mark.parametrize("fault", ["oom", "exit"])
def test_a_replica_its_task_killed_fails_its_execution_retryably_without_a_system_retry(
    cluster, propeller, base, fault
):
    a, meta, gate = _counted(propeller, base, exit_code=3 if fault == "exit" else 0)
    if fault == "oom":
        cluster.kubelet.oom_kill(_pod_at(cluster, _starts(gate)[0])["metadata"]["name"])
    r = propeller.wait(meta, timeout=30)
    assert r.phase == PHASE.RETRYABLE_FAILED, r.message
    if fault == "oom":
        assert "OOMKilled" in r.message and "137" in r.message, r.message
    else:
        assert "exit code 3" in r.message, r.message
    assert "system retr" not in r.message and len(_starts(gate)) == 1  # the task's own doing: never run again


def _take_away(cluster, pod_name: str, fault: str) -> None:
    """The platform takes a replica pod away: its node is lost, the kubelet evicts it, or someone deletes it."""
    if fault == "node-loss":
        cluster.kubelet.lose_node(pod_name)
    elif fault == "evicted":
        cluster.kubelet.evict(pod_name)
    else:
        cluster.delete_pod(NAMESPACE, pod_name, grace=30)


@pytest.mark.parametrize("fault", ["node-loss", "evicted", "deleted"])
def test_a_replica_lost_to_the_infrastructure_has_its_execution_run_again_on_a_new_pod(cluster, propeller, base, fault):
    a, meta, gate = _counted(propeller, base)
    (lost_ip,) = _starts(gate)
    pod = _pod_at(cluster, lost_ip)
    lost, pid = pod["metadata"]["name"], cluster.kubelet.pid(pod["metadata"]["name"])
    _take_away(cluster, lost, fault)
    wait_until(lambda: len(_starts(gate)) == 2, 60, "the execution dispatched again (a system retry)")
    # only once the old run was seen ended: its process is gone, its pod gone (or reported Failed: evicted)
    assert not os.path.exists(f"/proc/{pid}"), "dispatched again while the old run's process still existed"
    old = [p for p in cluster.pods(NAMESPACE) if p["metadata"]["name"] == lost]
    assert not old or old[0]["status"].get("phase") == "Failed", old
    r = propeller.get(meta)
    assert r.phase == PHASE.RUNNING, r.message
    open(gate, "w").close()
    r = propeller.wait(meta, timeout=60)
    assert r.phase == PHASE.SUCCEEDED, r.message
    new_ip = output_value(a.outputs(), "o0", str)
    assert new_ip != lost_ip
    assert _runs(gate) == [("start", lost_ip), ("start", new_ip), ("done", new_ip)]  # completed once, on the new pod


def test_a_lost_nodes_pod_never_removed_ends_its_execution_retryably_within_60s_and_never_runs_it_twice(
    cluster, propeller, base
):
    grace = cluster.kubelet.node_loss_grace
    cluster.kubelet.node_loss_grace = 600.0  # the node lifecycle does not remove the pod: nobody sees its end
    try:
        a, meta, gate = _counted(propeller, base)
        lost = _pod_at(cluster, _starts(gate)[0])["metadata"]["name"]
        taken = time.monotonic()
        cluster.kubelet.lose_node(lost)
        r = propeller.wait(meta, timeout=60)
        assert time.monotonic() - taken < 60
        assert r.phase == PHASE.RETRYABLE_FAILED, r.message
        assert "not ready" in r.message and "did not see it end within 15s" in r.message, r.message
        assert len(_starts(gate)) == 1  # not dispatched again: the frozen run may still be there
        assert [p for p in cluster.pods(NAMESPACE) if p["metadata"]["name"] == lost]  # deleted gracefully, not forced
    finally:
        cluster.kubelet.node_loss_grace = grace  # the node lifecycle removes the pod (and kills its process) now


def test_system_retries_are_bounded_then_the_execution_fails_retryably_naming_the_cause(cluster, propeller, base):
    a, meta, gate = _counted(propeller, base)  # this connector allows one system retry (FLYTE_ACTOR_SYSTEM_RETRIES)
    cluster.kubelet.evict(_pod_at(cluster, _starts(gate)[0])["metadata"]["name"])
    wait_until(lambda: len(_starts(gate)) == 2, 60, "the execution dispatched again (the one system retry)")
    cluster.kubelet.evict(_pod_at(cluster, _starts(gate)[1])["metadata"]["name"])
    r = propeller.wait(meta, timeout=60)
    assert r.phase == PHASE.RETRYABLE_FAILED, r.message
    assert "evicted" in r.message and "infrastructure" in r.message, r.message
    assert "gave up after 1 system retries of 1" in r.message, r.message
    assert [event for event, _ in _runs(gate)] == ["start", "start"]


def test_an_image_that_cannot_be_pulled_fails_queued_executions_fast(cluster, propeller, base):
    template = _with_image(k.add, "ghcr.io/example/missing:1")
    cluster.kubelet.bad_images.add("ghcr.io/example/missing:1")
    a = Attempt(base, k.add, literal_map(k.add, a=1, b=1), template=template)
    meta = propeller.create(a)
    r = propeller.wait(meta, timeout=60)
    assert r.phase == PHASE.RETRYABLE_FAILED and "ErrImagePull" in r.message, r.message
    assert "ghcr.io/example/missing:1" in r.message


def test_an_unschedulable_replica_reports_waiting_for_resources_and_delete_aborts(cluster, propeller, base):
    template = _too_big(k.add, "ghcr.io/example/huge:1")
    a = Attempt(base, k.add, literal_map(k.add, a=1, b=1), template=template)
    meta = propeller.create(a)
    r = propeller.wait(meta, phases={PHASE.WAITING_FOR_RESOURCES}, timeout=30)
    assert "Insufficient cpu" in r.message and "Unschedulable" in r.message, r.message
    propeller.delete(meta)
    assert propeller.get(meta).phase == PHASE.ABORTED


def test_a_map_whose_replicas_cannot_be_scheduled_waits_for_resources_then_runs(cluster, propeller, base):
    gate = os.path.join(base, "gate")
    m = actor_map(functools.partial(k.where_gated, gate=gate))
    a = Attempt(base, m, literal_map(m, x=[0, 1, 2]), template=_too_big(m, "ghcr.io/example/huge-map:1", cpu="40"))
    meta = propeller.create(a)
    r = propeller.wait(meta, task_type="actor_map", phases={PHASE.WAITING_FOR_RESOURCES}, timeout=30)
    assert "Insufficient cpu" in r.message and "Unschedulable" in r.message, r.message
    capacity = cluster.kubelet.node.capacity["cpu"]
    # a node with room for these pods joins (the autoscaler), not for the other tests' 64-CPU ones still pending
    cluster.kubelet.node.capacity["cpu"] = "48"
    try:
        r = propeller.wait(meta, task_type="actor_map", phases={PHASE.RUNNING}, timeout=60)
        assert "0 of 3 items done" in r.message, r.message
        open(gate, "w").close()
        r = propeller.wait(meta, task_type="actor_map", timeout=60)
    finally:
        cluster.kubelet.node.capacity["cpu"] = capacity
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert [int(v.split(":")[0]) for v in output_value(a.outputs(), "o0", list[str])] == [0, 1, 2]


def test_delete_aborts_a_map_waiting_for_resources(cluster, propeller, base):
    m = actor_map(k.where)
    a = Attempt(base, m, literal_map(m, x=[0, 1]), template=_too_big(m, "ghcr.io/example/huge-map:2"))
    meta = propeller.create(a)
    r = propeller.wait(meta, task_type="actor_map", phases={PHASE.WAITING_FOR_RESOURCES}, timeout=30)
    assert "Insufficient cpu" in r.message, r.message
    propeller.delete(meta, task_type="actor_map")
    r = propeller.get(meta, task_type="actor_map")
    assert r.phase == PHASE.ABORTED, r.message
    assert not os.path.exists(os.path.join(a.dir, "items", "0", "outputs.pb"))  # no item ran


def test_delete_task_aborts_a_running_execution_on_a_pod(cluster, propeller, base):
    gate = os.path.join(base, "gate")
    a = Attempt(base, k.held, literal_map(k.held, gate=gate))
    meta = propeller.create(a)
    _running_in_replica(gate)
    propeller.delete(meta)
    assert propeller.wait(meta, timeout=15).phase == PHASE.ABORTED
    a, _, r = _run(propeller, base, k.add, a=5, b=5)  # the environment still serves
    assert r.phase == PHASE.SUCCEEDED and output_value(a.outputs(), "o0", int) == 10


def test_an_idle_pool_past_its_ttl_leaves_no_pod_and_no_secret(cluster, propeller, base):
    _, _, r = _run(propeller, base, k.quick)
    assert r.phase == PHASE.SUCCEEDED, r.message
    wait_until(lambda: not _pods(cluster, "k8s-ttl"), 30, "the idle pool's pod deleted after ttl_seconds")
    assert not cluster.secrets(NAMESPACE, "flyte-actor/env=k8s-ttl")


def test_a_connector_killed_and_restarted_adopts_its_warm_pods(cluster, server, propeller, base):
    _, _, r = _run(propeller, base, k.add, a=1, b=1)
    assert r.phase == PHASE.SUCCEEDED, r.message
    (pod,) = _ready_pods(cluster, "k8s-main")
    creates, token_reads = cluster.requests[("create", "pods")], cluster.requests[("get", "secrets")]
    server.kill()  # SIGKILL: no cleanup runs; the replica pods stay
    server.start()
    a, _, r = _run(propeller, base, k.host)
    assert r.phase == PHASE.SUCCEEDED, r.message + server.log()
    assert output_value(a.outputs(), "o0", str).split("/")[2] == pod["metadata"]["name"]  # the same, warm pod
    assert cluster.requests[("create", "pods")] == creates
    assert cluster.requests[("get", "secrets")] == token_reads + 1  # it read the pool token from the pod's Secret


def _counted_run(base: str) -> Attempt:
    gate, counter = os.path.join(base, "gate"), os.path.join(base, "runs")
    return Attempt(base, k.counted_run, literal_map(k.counted_run, gate=gate, counter=counter))


def _killed_mid_execution(cluster, server, propeller, base: str):
    """Creates a `counted_run`, waits until its replica pod runs it, then SIGKILLs the connector (the pod keeps
    running it): (attempt, resource meta, the pod, how many pods were created until then)."""
    a = _counted_run(base)
    meta = propeller.create(a)
    _running_in_replica(os.path.join(base, "gate"))
    (pod,) = _ready_pods(cluster, "k8s-restart")
    creates = cluster.requests[("create", "pods")]
    server.kill()
    return a, meta, pod, creates


def _uncollected(cluster, pod: dict) -> list:
    """What the replica pod's worker reports as ended but never collected, asked with its pool token (its Secret)."""
    return _health(cluster, pod)["uncollected"]


def _health(cluster, pod: dict) -> dict:
    """The replica pod's `health`, asked with its pool token (its Secret)."""
    import base64
    import contextlib

    from flytekitplugins_actor.replica.protocol import ReplicaClient
    from plugin_backend.pod_spec import TOKEN_KEY, WORKER_PORT

    (secret,) = [s for s in cluster.secrets(NAMESPACE) if s["metadata"]["name"] == f"{pod['metadata']['name']}-token"]
    token = base64.b64decode(secret["data"][TOKEN_KEY]).decode()
    with contextlib.closing(ReplicaClient(f"{pod['status']['podIP']}:{WORKER_PORT}", token, timeout=5)) as c:
        return c.request("health")


def _run_count(base: str) -> int:
    with open(os.path.join(base, "runs")) as f:
        return f.read().count("run")


def test_an_execution_running_when_the_connector_died_is_re_attached_and_its_result_collected(
    cluster, server, propeller, base
):
    a, meta, pod, creates = _killed_mid_execution(cluster, server, propeller, base)
    server.start()
    r = propeller.get(meta)  # the first request after the restart: no CreateTask of this environment came
    assert r.phase == PHASE.RUNNING and "re-attached" in r.message, r.message + server.log()
    assert r.log_links[0].uri == f"k8s://{NAMESPACE}/{pod['metadata']['name']}/primary"
    open(os.path.join(base, "gate"), "w").close()
    r = propeller.wait(meta, timeout=60)
    assert r.phase == PHASE.SUCCEEDED, r.message + server.log()
    assert output_value(a.outputs(), "o0", str) == pod["status"]["podIP"]  # its result, from the pod that ran it
    assert _run_count(base) == 1  # ran exactly once
    assert propeller.create(a) == meta and propeller.get(meta).phase == PHASE.SUCCEEDED  # a late CreateTask: no rerun
    assert cluster.requests[("create", "pods")] == creates  # no new pod: the busy one was adopted
    (still,) = _ready_pods(cluster, "k8s-restart")
    assert still["metadata"]["name"] == pod["metadata"]["name"]
    assert _run_count(base) == 1


def test_an_execution_that_finished_while_the_connector_was_down_is_collected_after_the_restart(
    cluster, server, propeller, base
):
    a, meta, pod, creates = _killed_mid_execution(cluster, server, propeller, base)
    open(os.path.join(base, "gate"), "w").close()
    wait_until(
        lambda: [i for i in _uncollected(cluster, pod) if i.startswith(f"{a.exec_name}-")],
        30,
        "the task finishing with no connector to collect it",
    )
    assert os.path.exists(os.path.join(a.dir, "outputs.pb"))
    server.start()
    # another execution of the environment comes first: its pool adopts the pod and collects the finished one
    b = Attempt(base, k.counted_run, literal_map(k.counted_run, gate=os.path.join(base, "gate"), counter=base + "-b"))
    r = propeller.wait(propeller.create(b), timeout=60)
    assert r.phase == PHASE.SUCCEEDED, r.message + server.log()
    assert output_value(b.outputs(), "o0", str) == pod["status"]["podIP"]  # the same warm pod served it
    # the adopting pool collected the end before serving its queue (b's is told, and counts at the pool's next request)
    assert not [i for i in _uncollected(cluster, pod) if i.startswith(f"{a.exec_name}-")]
    r = propeller.get(meta)
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", str) == pod["status"]["podIP"]
    assert _run_count(base) == 1
    assert cluster.requests[("create", "pods")] == creates


def test_delete_task_after_a_restart_aborts_the_execution_running_on_an_adopted_replica(
    cluster, server, propeller, base
):
    a, meta, pod, creates = _killed_mid_execution(cluster, server, propeller, base)
    server.start()
    propeller.delete(meta)  # the first request after the restart: it must reach the replica running it
    assert propeller.get(meta).phase == PHASE.ABORTED
    # the replica interrupted it and serves the next execution at once (the gate of `a` never opens)
    b_base = os.path.join(base, "b")
    os.makedirs(b_base)
    open(os.path.join(b_base, "gate"), "w").close()
    b = _counted_run(b_base)
    r = propeller.wait(propeller.create(b), timeout=30)
    assert r.phase == PHASE.SUCCEEDED, r.message + server.log()
    assert output_value(b.outputs(), "o0", str) == pod["status"]["podIP"]
    assert not os.path.exists(os.path.join(a.dir, "outputs.pb")) and _run_count(base) == 1
    assert cluster.requests[("create", "pods")] == creates


def test_an_execution_whose_replica_died_with_the_connector_is_not_run_twice(cluster, server, propeller, base):
    a, meta, pod, _ = _killed_mid_execution(cluster, server, propeller, base)
    cluster.kubelet.oom_kill(pod["metadata"]["name"])  # the replica dies too, before any connector adopts it
    wait_until(lambda: not _ready_pods(cluster, "k8s-restart"), 30, "the replica pod no longer ready")
    server.start()
    r = propeller.get(meta)
    assert r.phase == PHASE.RETRYABLE_FAILED and "not run twice" in r.message, r.message
    assert "no replica adopted" in r.message, r.message
    open(os.path.join(base, "gate"), "w").close()
    assert _run_count(base) == 1 and not os.path.exists(os.path.join(a.dir, "outputs.pb"))


def test_a_map_resumed_after_a_restart_collects_its_in_flight_items_from_the_adopted_pods(
    cluster, server, propeller, base
):
    gate, counter = os.path.join(base, "gate"), os.path.join(base, "runs")
    m = actor_map(functools.partial(k.counted_square, gate=gate, counter=counter))
    xs = [1, 2, 100, 101]
    a = Attempt(base, m, literal_map(m, x=xs))
    meta = propeller.create(a)
    items = os.path.join(a.dir, "items")

    def ran() -> list:
        with open(counter) as f:
            return [int(line) for line in f.read().split()]

    wait_until(
        lambda: (
            all(os.path.exists(os.path.join(items, str(i), "outputs.pb")) for i in range(2))
            and os.path.exists(counter)
            and {100, 101} <= set(ran())
        ),
        60,
        "items 0-1 finished and items 2-3 running",
    )
    creates = cluster.requests[("create", "pods")]
    server.kill()
    server.start()
    open(gate, "w").close()
    r = propeller.wait(meta, task_type="actor_map", timeout=60)
    assert r.phase == PHASE.SUCCEEDED, r.message + server.log()
    assert output_value(a.outputs(), "o0", list[int]) == [x * x for x in xs]
    assert sorted(ran()) == sorted(xs)  # every item ran once: the two in flight were collected, not run again
    assert cluster.requests[("create", "pods")] == creates


def test_delete_task_of_a_map_after_a_restart_cancels_its_items_on_the_adopted_pods(cluster, server, propeller, base):
    gate, counter = os.path.join(base, "gate"), os.path.join(base, "runs")
    m = actor_map(functools.partial(k.counted_square, gate=gate, counter=counter))
    a = Attempt(base, m, literal_map(m, x=[100, 101]))
    meta = propeller.create(a)
    wait_until(
        lambda: os.path.exists(counter) and sorted(open(counter).read().split()) == ["100", "101"],
        60,
        "both items running, one per pod",
    )
    pods = _ready_pods(cluster, "k8s-restart-map")
    assert len(pods) == 2 and all(_health(cluster, p)["state"] == "busy" for p in pods)
    server.kill()
    server.start()
    propeller.delete(meta, task_type="actor_map")  # the first request after the restart
    wait_until(lambda: all(_health(cluster, p)["state"] == "idle" for p in pods), 60, "both items cancelled")
    open(gate, "w").close()  # too late for them: they ended cancelled, and wrote nothing
    items = os.path.join(a.dir, "items")
    assert not any(os.path.exists(os.path.join(items, str(i), "outputs.pb")) for i in range(2))
    assert propeller.get(meta, task_type="actor_map").phase == PHASE.ABORTED
    assert sorted(open(counter).read().split()) == ["100", "101"]  # each ran once, and nothing ran them again


def test_the_connector_used_exactly_the_verbs_deploy_grants(cluster):
    """Every request above passed the stand-in's RBAC, built from deploy/rbac.yaml (a missing verb is a 403 there),
    none was refused, and every verb the ClusterRole grants was used: the role is exactly what the code needs."""
    granted = {(verb, resource) for rule in cluster.rbac.rules for resource in rule.resources for verb in rule.verbs}
    assert set(cluster.requests) == granted
    assert not cluster.refused, cluster.refused
    assert not cluster.kubelet.errors, cluster.kubelet.errors  # and the stand-in itself never failed

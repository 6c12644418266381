"""The kubernetes replica backend against the loopback API stand-in (tests/kube): real pods (local processes at
127.a.b.N) created, watched, faulted and deleted through the unmodified `kubernetes` client, every object
validated strictly against Kubernetes 1.30 and every request checked against deploy/'s ClusterRole."""

import contextlib
import json
import os
import sys

import pytest
from kubernetes import client, config

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from harness import Attempt, literal_map  # noqa: E402
from kube import NAMESPACE, ROOT, standin  # noqa: E402
from waiting import wait_until  # noqa: E402

from flytekitplugins_actor.replica.backend import DeathCause, ReplicaSpec, ReplicaState  # noqa: E402
from flytekitplugins_actor.replica.protocol import ReplicaClient  # noqa: E402
from plugin_backend.kubernetes import KubernetesBackend  # noqa: E402
from plugin_backend.pod_spec import ORPHAN_TIMEOUT_ENV, PodDefaults, resolve_resources  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cluster(tmp_path):
    c = standin(str(tmp_path), image_paths=(HERE, ROOT))
    yield c
    c.stop()


def _backend(cluster, **kw) -> KubernetesBackend:
    api = client.CoreV1Api(config.new_client_from_config(cluster.kubeconfig))
    kw = {"namespace": NAMESPACE, "not_ready_grace_s": 1.0, "config_error_grace_s": 3.0, **kw}
    return KubernetesBackend(api=api, **kw)


@pytest.fixture
def backend(cluster):
    b = _backend(cluster)
    yield b
    b.shutdown()


def _spec(name="env-a-1", token="sekret", image="ghcr.io/x/img:1", resources=None, env=None, **kw) -> ReplicaSpec:
    container = {"name": "primary", "image": image, "resources": resolve_resources(resources or {}, PodDefaults())}
    container["env"] = env or []
    return ReplicaSpec(
        name=name,
        token=token,
        env={"A": "1", ORPHAN_TIMEOUT_ENV: "120"},
        labels={"flyte-actor/env": "env-a", "flyte-actor/pool": "pool-digest-1"},
        image=image,
        pod_spec={"containers": [container]},
        namespace=NAMESPACE,
        service_account="team-sa",
        **kw,
    )


def _pod(cluster, replica) -> dict:
    return cluster.store.get("pods", replica.namespace, replica.pod_name)


def test_a_replica_pod_starts_binds_its_pod_ip_and_reads_its_token_from_an_owned_secret(cluster, backend):
    replica = backend.start(_spec())
    assert replica.wait_ready(30) is ReplicaState.READY, cluster.kubelet.log(replica.pod_name)
    pod = _pod(cluster, replica)
    ip = pod["status"]["podIP"]
    assert ip.startswith("127.") and ip != "127.0.0.1" and replica.address == f"{ip}:8777"
    assert pod["spec"]["serviceAccountName"] == "team-sa" and pod["spec"]["restartPolicy"] == "Never"
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "1000m", "memory": "1024Mi"}  # propeller's defaults: a quota'd namespace admits it
    with contextlib.closing(ReplicaClient(replica.address, "sekret")) as c:  # the worker has the Secret's token
        assert c.request("health")["replica"] == "env-a-1"
    (secret,) = cluster.secrets(NAMESPACE)
    assert secret["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": replica.pod_name, "uid": pod["metadata"]["uid"]}
    ]
    replica.terminate(1)
    death = replica.wait_dead(15)
    assert death is not None and "terminated" in death.reason
    wait_until(lambda: not cluster.pods() and not cluster.secrets(), 15, "pod and Secret gone (owner GC)")
    assert cluster.requests[("create", "secrets")] == 1 and ("patch", "secrets") not in cluster.requests


def test_an_oom_killed_replica_is_a_task_death_and_its_pod_is_deleted(cluster, backend):
    replica = backend.start(_spec())
    assert replica.wait_ready(30) is ReplicaState.READY
    cluster.kubelet.oom_kill(replica.pod_name)
    death = replica.wait_dead(15)
    assert death.cause is DeathCause.TASK and death.exit_code == 137 and "OOMKilled" in death.reason
    wait_until(lambda: not cluster.pods(), 15, "the dead replica's pod deleted")


def test_an_image_pull_failure_fails_the_start_at_once(cluster, backend):
    cluster.kubelet.bad_images.add("ghcr.io/x/missing:1")
    replica = backend.start(_spec(image="ghcr.io/x/missing:1"))
    assert replica.wait_ready(15) is ReplicaState.DEAD
    assert replica.death.cause is DeathCause.START and "ErrImagePull" in replica.death.reason
    assert "ghcr.io/x/missing:1" in replica.death.reason
    wait_until(lambda: not cluster.pods(), 15, "the pod that cannot start deleted")


def test_a_lasting_config_error_fails_the_start_with_its_cause(cluster, backend):
    env = [{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db-creds", "key": "password"}}}]
    replica = backend.start(_spec(env=env))
    assert replica.wait_ready(15) is ReplicaState.DEAD
    assert replica.death.cause is DeathCause.START
    assert "CreateContainerConfigError" in replica.death.reason and "db-creds" in replica.death.reason


def test_an_unschedulable_replica_waits_and_says_why(cluster, backend):
    replica = backend.start(_spec(resources={"limits": {"nvidia.com/gpu": "1"}}))
    wait_until(lambda: replica.waiting_reason, 15, "the scheduler's reason on the replica")
    assert "Insufficient nvidia.com/gpu" in replica.waiting_reason and "Unschedulable" in replica.waiting_reason
    assert replica.state is ReplicaState.STARTING
    tolerations = _pod(cluster, replica)["spec"].get("tolerations")
    assert tolerations is None  # tolerations come from replica_pod_spec (see test_pod_spec), not this bare spec
    replica.terminate(0)
    wait_until(lambda: not cluster.pods(), 15, "the pending pod deleted")


def test_a_lost_node_ends_the_replica_as_infrastructure(cluster, backend):
    replica = backend.start(_spec())
    assert replica.wait_ready(30) is ReplicaState.READY
    cluster.kubelet.lose_node(replica.pod_name)
    death = replica.wait_dead(15)
    assert death is not None and death.cause is DeathCause.INFRASTRUCTURE and "not ready" in death.reason


def _frozen(pid: int) -> bool:
    """The process exists and is stopped (SIGSTOP): a lost node's container, neither running nor ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def test_a_lost_nodes_replica_is_seen_ended_only_once_the_node_lifecycle_removes_its_pod(cluster, backend):
    replica = backend.start(_spec())
    assert replica.wait_ready(30) is ReplicaState.READY
    pid = cluster.kubelet.pid(replica.pod_name)
    cluster.kubelet.lose_node(replica.pod_name)
    assert replica.wait_dead(15).cause is DeathCause.INFRASTRUCTURE
    # deleted gracefully, never forced: the pod object stays until someone confirms its end, its process frozen
    wait_until(lambda: _pod(cluster, replica)["metadata"].get("deletionTimestamp"), 15, "the pod marked for deletion")
    assert not replica.exited and _frozen(pid)
    assert replica.wait_exited(15), "the end of a pod the node lifecycle removed was not seen"
    assert not cluster.pods() and not _frozen(pid)
    wait_until(lambda: not backend._replicas, 15, "the dead replica no longer followed")


def test_a_dead_replica_whose_end_is_never_seen_is_followed_only_for_a_bounded_time(cluster):
    backend = _backend(cluster, exit_confirm_s=0.5)
    cluster.kubelet.node_loss_grace = 120.0  # the node lifecycle never removes the pod within the test
    try:
        replica = backend.start(_spec())
        assert replica.wait_ready(30) is ReplicaState.READY
        cluster.kubelet.lose_node(replica.pod_name)
        assert replica.wait_dead(15).cause is DeathCause.INFRASTRUCTURE
        assert not replica.wait_exited(0.5)
        wait_until(lambda: not backend._replicas, 15, "the dead replica no longer followed (no tracker leaks)")
        assert _pod(cluster, replica)["metadata"].get("deletionTimestamp")  # still there, as on a silent node
        assert not replica.exited
    finally:
        backend.shutdown()


def test_an_evicted_replica_is_an_infrastructure_death_seen_ended_at_once(cluster, backend):
    replica = backend.start(_spec())
    assert replica.wait_ready(30) is ReplicaState.READY
    cluster.kubelet.evict(replica.pod_name)
    death = replica.wait_dead(15)
    assert death.cause is DeathCause.INFRASTRUCTURE and "evicted" in death.reason and "low on resource" in death.reason
    assert replica.wait_exited(0)  # its containers were stopped: the kubelet said so with the Failed phase
    wait_until(lambda: not cluster.pods(), 15, "the evicted pod deleted")


@pytest.mark.parametrize("grace", [0, 30])
def test_a_pod_deleted_by_someone_else_is_an_infrastructure_death_seen_ended_once_its_pod_is_gone(
    cluster, backend, grace
):
    replica = backend.start(_spec())
    assert replica.wait_ready(30) is ReplicaState.READY
    cluster.delete_pod(NAMESPACE, replica.pod_name, grace)
    death = replica.wait_dead(15)
    assert death is not None and death.cause is DeathCause.INFRASTRUCTURE and "someone else" in death.reason
    assert replica.wait_exited(15)  # the worker stops on SIGTERM, the kubelet confirms, the pod object goes
    assert not cluster.pods()


def test_the_watch_relists_after_410_gone_and_still_sees_deaths(cluster):
    backend = _backend(cluster, watch_timeout_s=1)
    try:
        replica = backend.start(_spec())
        assert replica.wait_ready(30) is ReplicaState.READY
        lists = cluster.requests[("list", "pods")]
        cluster.store.create("secrets", "default", {"metadata": {"name": "unrelated"}})  # a version it never saw
        cluster.store.compact()  # the next watch resumes from a version etcd no longer has
        wait_until(lambda: cluster.requests[("list", "pods")] > lists, 15, "a relist after 410 Gone")
        cluster.kubelet.oom_kill(replica.pod_name)
        assert replica.wait_dead(15).cause is DeathCause.TASK
    finally:
        backend.shutdown()


def test_a_missing_namespace_or_service_account_is_a_clear_start_error(cluster, backend):
    with pytest.raises(RuntimeError, match='namespaces "nowhere" not found'):
        backend.start(_with(_spec(), namespace="nowhere"))
    with pytest.raises(RuntimeError, match='serviceaccount "ghost" not found'):
        backend.start(_with(_spec(), service_account="ghost"))
    assert not cluster.pods()


def _with(spec: ReplicaSpec, **changes) -> ReplicaSpec:
    for k, v in changes.items():
        setattr(spec, k, v)
    return spec


def test_a_restarted_connector_adopts_live_replicas_with_their_token(cluster, backend):
    first = backend.start(_spec(token="pool-token"))
    assert first.wait_ready(30) is ReplicaState.READY
    backend.shutdown()  # the connector goes; its pod stays

    successor = _backend(cluster)
    try:
        assert successor.take_inventory() == 1
        assert successor.live_replicas("another-pool") == (None, [])
        token, (adopted,) = successor.live_replicas("pool-digest-1")
        assert token == "pool-token" and adopted.name == "env-a-1"
        assert adopted.state is ReplicaState.READY and adopted.address == first.address
        with contextlib.closing(ReplicaClient(adopted.address, token)) as c:
            assert c.request("health")["replica"] == "env-a-1"
        cluster.kubelet.oom_kill(adopted.pod_name)  # the successor's watch follows the adopted pod
        assert adopted.wait_dead(15).cause is DeathCause.TASK
    finally:
        successor.shutdown()


def test_pods_no_pool_claims_are_deleted_after_their_orphan_timeout(cluster, backend):
    spec = _spec()
    spec.env[ORPHAN_TIMEOUT_ENV] = "4"  # counts from the replica's start: the inventory must come before it expires
    replica = backend.start(spec)
    assert replica.wait_ready(30) is ReplicaState.READY
    backend.shutdown()
    successor = _backend(cluster)
    try:
        assert successor.take_inventory() == 1
        wait_until(lambda: not cluster.pods() and not cluster.secrets(), 15, "the unclaimed pod and its Secret deleted")
    finally:
        successor.shutdown()


def test_a_replica_whose_connector_is_gone_exits_and_the_next_connector_removes_its_pod(cluster, backend):
    spec = _spec()
    spec.env[ORPHAN_TIMEOUT_ENV] = "2"  # ttl_seconds + margin, shortened
    replica = backend.start(spec)
    assert replica.wait_ready(30) is ReplicaState.READY
    backend.shutdown()  # the connector is gone for good: nobody talks to the replica any more
    wait_until(
        lambda: cluster.pods()[0]["status"]["phase"] in ("Succeeded", "Failed"), 30, "the replica exiting on its own"
    )
    assert "no request from any pool" in cluster.kubelet.log(replica.pod_name)
    successor = _backend(cluster)
    try:
        assert successor.take_inventory() == 0  # nothing to adopt: the finished pod is deleted, its Secret with it
        wait_until(lambda: not cluster.pods() and not cluster.secrets(), 15, "the finished pod and its Secret deleted")
    finally:
        successor.shutdown()


# ---- pods built from real task templates (strictly validated by the stand-in when created) ----


def _pod_for(cluster, backend, task, tmp_path, **inputs) -> dict:
    """CreateTask-like: parse and (for a pod template) render the template, start its pool, return the pod made."""
    from flytekit.models.literals import LiteralMap
    from flytekit.models.task import TaskTemplate

    from flytekitplugins_actor.replica.execution import ExecutionSpec
    from plugin_backend.pools import PoolKey, PoolManager
    from plugin_backend.service import ActorService
    from plugin_backend.template import parse_template

    a = Attempt(str(tmp_path), task, literal_map(task, **inputs))
    template = parse_template(TaskTemplate.from_flyte_idl(a.template), "actor")
    if template.needs_render:
        template = ActorService._render(template, a.dir, LiteralMap.from_flyte_idl(a.inputs))
    manager = PoolManager(backend=backend, state_dir=str(tmp_path / "state"))
    try:
        pool = manager.pool_for(PoolKey(NAMESPACE, "team-sa", template.env_key, template.code_version), template)
        pool.submit(ExecutionSpec("e1", template.args, {}))
        (pod,) = wait_until(lambda: cluster.pods(NAMESPACE), 15, "the replica pod to be created")
        return pod
    finally:
        manager.shutdown()


def test_pod_template_environments_keep_their_pod_spec(cluster, backend, tmp_path):
    import actor_tasks as t

    pod = _pod_for(cluster, backend, t.get_and_set, tmp_path, x=1)
    spec = pod["spec"]
    main = next(c for c in spec["containers"] if c["name"] == "main")
    assert main["command"] == ["python", "-m", "flytekitplugins_actor.replica.worker", "--port", "8777"]
    assert "args" not in main
    assert main["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    assert {"name": "ENV_KEY", "value": "from-environment"} in main["env"]
    assert {"name": "FLYTE_ACTOR_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in main["env"]
    sidecar = next(c for c in spec["containers"] if c["name"] == "sidecar")
    assert sidecar["image"] == "busybox:1.36" and sidecar["args"] == ["sleep", "infinity"]
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    assert spec["nodeSelector"] == {"pool": "ml"}
    assert pod["metadata"]["labels"]["team"] == "ml" and pod["metadata"]["labels"]["flyte-actor/env"] == "conn-pod"
    assert pod["metadata"]["annotations"]["example.com/note"] == "from-pod-template"
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "main"


def test_gpu_interruptible_and_default_settings_reach_the_pod(cluster, backend, tmp_path, monkeypatch):
    import actor_tasks as t

    monkeypatch.setenv("FLYTE_ACTOR_K8S_INTERRUPTIBLE_TOLERATIONS", json.dumps([{"key": "spot", "operator": "Exists"}]))
    monkeypatch.setenv("FLYTE_ACTOR_K8S_INTERRUPTIBLE_NODE_SELECTOR", json.dumps({"lifecycle": "spot"}))
    monkeypatch.setenv("FLYTE_ACTOR_K8S_DEFAULT_ENV_VARS", json.dumps({"TEAM": "ml", "A": "platform"}))
    monkeypatch.setenv("FLYTE_ACTOR_K8S_DEFAULT_NODE_SELECTOR", json.dumps({"zone": "a"}))
    pod = _pod_for(cluster, backend, t.gpu_task, tmp_path)
    c = pod["spec"]["containers"][0]
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
        "limits": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
    }
    assert pod["spec"]["nodeSelector"] == {
        "k8s.amazonaws.com/accelerator": "nvidia-tesla-t4",
        "lifecycle": "spot",
        "zone": "a",
    }
    assert pod["spec"]["tolerations"] == [
        {"key": "spot", "operator": "Exists"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]
    assert {"name": "TEAM", "value": "ml"} in c["env"]
    assert pod["metadata"]["labels"]["inject-flyte-secrets"] == "true"  # flyte's pod webhook injects the secret
    assert "flyte.secrets/s0" in pod["metadata"]["annotations"]
    orphan = next(e for e in c["env"] if e["name"] == ORPHAN_TIMEOUT_ENV)
    assert int(orphan["value"]) > 60  # ttl_seconds + margin: the replica outlives no connector by more


def test_resources_follow_propellers_defaulting():
    d = PodDefaults(cpu="500m", memory="1Gi")
    assert resolve_resources({}, d) == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "500m", "memory": "1Gi"},
    }
    assert resolve_resources({"limits": {"cpu": "2"}}, d)["requests"]["cpu"] == "2"  # request = limit
    assert resolve_resources({"requests": {"memory": "4Gi"}}, d)["limits"]["memory"] == "4Gi"  # limit = request
    assert resolve_resources({"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}, d)["requests"]["cpu"] == "2"
    gpu = resolve_resources({"requests": {"nvidia.com/gpu": "1"}}, d)
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"


def test_malformed_pod_defaults_are_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("FLYTE_ACTOR_K8S_DEFAULT_CPU", "lots")
    with pytest.raises(ValueError, match="FLYTE_ACTOR_K8S_DEFAULT_CPU.*'lots'"):
        PodDefaults.from_env()
    monkeypatch.delenv("FLYTE_ACTOR_K8S_DEFAULT_CPU")
    monkeypatch.setenv("FLYTE_ACTOR_K8S_DEFAULT_TOLERATIONS", '{"key": "x"}')
    with pytest.raises(ValueError, match="FLYTE_ACTOR_K8S_DEFAULT_TOLERATIONS must be a JSON list"):
        PodDefaults.from_env()


def test_executions_without_a_namespace_use_the_configured_one(monkeypatch):
    from plugin_backend.identity import identity_of

    monkeypatch.setenv("FLYTE_ACTOR_K8S_NAMESPACE", "actors")
    assert identity_of(None, "t").namespace == "actors"
    monkeypatch.delenv("FLYTE_ACTOR_K8S_NAMESPACE")
    assert identity_of(None, "t").namespace == "local"


def test_readiness_timeout_is_long_and_configurable(cluster, monkeypatch):
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", cluster.kubeconfig)  # $KUBECONFIG, read at import
    monkeypatch.setenv("FLYTE_ACTOR_K8S_READY_TIMEOUT_S", "900")
    backend = KubernetesBackend.from_env()
    try:
        assert backend.ready_timeout_s == 900.0
    finally:
        backend.shutdown()
    assert KubernetesBackend.ready_timeout_s == 600.0  # image pulls of big GPU images take minutes

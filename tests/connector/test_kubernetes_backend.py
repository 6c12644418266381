"""The kubernetes replica backend against a mocked CoreV1Api (pytest-mock): manifests, readiness, loss, deletion."""

import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from flytekitplugins_actor.replica.backend import ReplicaSpec, ReplicaState
from flytekitplugins_actor.replica.protocol import TOKEN_ENV
from plugin_backend.kubernetes import LABEL_INSTANCE, WORKER_PORT, KubernetesBackend

pytestmark = pytest.mark.timeout(30)


def _pod(phase="Pending", ip=None, ready=False, terminated=None, waiting=None):
    state = client.V1ContainerState(
        terminated=terminated,
        waiting=waiting,
        running=client.V1ContainerStateRunning() if phase == "Running" and not terminated else None,
    )
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="p", uid="uid-1"),
        status=client.V1PodStatus(
            phase=phase,
            pod_ip=ip,
            conditions=[client.V1PodCondition(type="Ready", status="True" if ready else "False")],
            container_statuses=[
                client.V1ContainerStatus(
                    name="primary", ready=ready, restart_count=0, image="img", image_id="", state=state
                )
            ],
        ),
    )


@pytest.fixture
def api(mocker):
    api = mocker.Mock(name="CoreV1Api")
    api.create_namespaced_pod.return_value = client.V1Pod(metadata=client.V1ObjectMeta(name="p", uid="uid-1"))
    api.read_namespaced_pod.return_value = _pod()
    return api


@pytest.fixture
def backend(api):
    return KubernetesBackend(api=api, namespace="actors", poll_interval=0.01, instance="inst1")


def _spec(**kw):
    base = dict(
        name="env-a-1",
        token="sekret",
        env={"A": "1"},
        labels={"flyte-actor/env": "env-a"},
        image="ghcr.io/x/img:1",
        pod_spec={
            "containers": [
                {
                    "name": "primary",
                    "image": "old",
                    "resources": {"limits": {"memory": "1Gi"}},
                    "args": ["pyflyte-execute"],
                }
            ]
        },
        namespace="team-a",
        service_account="sa-a",
    )
    base.update(kw)
    return ReplicaSpec(**base)


def test_start_creates_a_token_secret_and_a_worker_pod(backend, api):
    replica = backend.start(_spec())
    replica.wait_ready(0.5)
    ns, secret = api.create_namespaced_secret.call_args.args
    assert ns == "team-a" and secret.string_data == {"token": "sekret"}
    ns, pod = api.create_namespaced_pod.call_args.args
    assert ns == "team-a"
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "flytekitplugins_actor.replica.worker", "--port", str(WORKER_PORT)]
    assert "args" not in c and c["image"] == "ghcr.io/x/img:1" and c["resources"] == {"limits": {"memory": "1Gi"}}
    token = next(e for e in c["env"] if e["name"] == TOKEN_ENV)
    assert token["valueFrom"]["secretKeyRef"]["name"] == secret.metadata.name and "value" not in token
    assert {"name": "A", "value": "1"} in c["env"]
    assert pod["spec"]["serviceAccountName"] == "sa-a" and pod["spec"]["restartPolicy"] == "Never"
    labels = pod["metadata"]["labels"]
    assert labels["flyte-actor/env"] == "env-a" and labels[LABEL_INSTANCE] == "inst1"
    patched = api.patch_namespaced_secret.call_args.args[2]
    assert patched["metadata"]["ownerReferences"][0]["uid"] == "uid-1"  # the Secret is deleted with its pod
    replica.terminate(0)


def test_ready_pod_gives_the_replica_its_address(backend, api):
    api.read_namespaced_pod.return_value = _pod("Running", ip="10.1.2.3", ready=True)
    replica = backend.start(_spec())
    assert replica.wait_ready(5) is ReplicaState.READY
    assert replica.address == f"10.1.2.3:{WORKER_PORT}"
    assert replica.log_uri.startswith("k8s://team-a/env-a-1-")
    replica.terminate(0)


def test_oom_killed_container_is_a_named_death(backend, api):
    api.read_namespaced_pod.return_value = _pod("Running", ip="10.1.2.3", ready=True)
    replica = backend.start(_spec())
    assert replica.wait_ready(5) is ReplicaState.READY
    api.read_namespaced_pod.return_value = _pod(
        "Failed", terminated=client.V1ContainerStateTerminated(exit_code=137, reason="OOMKilled")
    )
    death = replica.wait_dead(5)
    assert death is not None and "OOMKilled" in death.reason and death.exit_code == 137
    assert "replica env-a-1" in str(death)
    api.delete_namespaced_pod.assert_called()


def test_image_pull_failure_is_a_death_before_ready(backend, api):
    api.read_namespaced_pod.return_value = _pod(
        waiting=client.V1ContainerStateWaiting(reason="ImagePullBackOff", message="not found")
    )
    replica = backend.start(_spec())
    assert replica.wait_ready(5) is ReplicaState.DEAD
    assert "ImagePullBackOff" in replica.death.reason


def test_terminate_deletes_the_pod_and_the_replica_dies(backend, api):
    api.read_namespaced_pod.return_value = _pod("Running", ip="10.1.2.3", ready=True)
    replica = backend.start(_spec())
    assert replica.wait_ready(5) is ReplicaState.READY

    def gone(*a, **k):
        api.read_namespaced_pod.side_effect = ApiException(status=404, reason="Not Found")

    api.delete_namespaced_pod.side_effect = gone
    replica.terminate(3)
    death = replica.wait_dead(5)
    assert death is not None and "terminated" in death.reason
    name, ns = api.delete_namespaced_pod.call_args.args
    assert ns == "team-a" and api.delete_namespaced_pod.call_args.kwargs["grace_period_seconds"] == 3


def test_deleted_pod_is_a_death(backend, api):
    api.read_namespaced_pod.side_effect = ApiException(status=404, reason="Not Found")
    replica = backend.start(_spec())
    assert replica.wait_dead(5).reason == "pod was deleted"


def test_forbidden_create_is_a_death_with_the_api_reason(backend, api):
    api.create_namespaced_pod.side_effect = ApiException(status=403, reason="Forbidden")
    replica = backend.start(_spec())
    death = replica.wait_dead(5)
    assert "could not be created" in death.reason and "403" in death.reason
    api.delete_namespaced_secret.assert_called()


def test_orphans_of_a_previous_connector_are_deleted(backend, api, mocker):
    orphan = client.V1Pod(metadata=client.V1ObjectMeta(name="old-1", namespace="team-a"))
    api.list_pod_for_all_namespaces.return_value = client.V1PodList(items=[orphan])
    assert backend.delete_orphans() == 1
    selector = api.list_pod_for_all_namespaces.call_args.kwargs["label_selector"]
    assert f"{LABEL_INSTANCE}!=inst1" in selector
    api.delete_namespaced_pod.assert_called_with("old-1", "team-a", grace_period_seconds=0)


def test_pools_start_replica_pods_in_the_executions_namespace_and_service_account(api, backend, tmp_path):
    """PoolManager -> KubernetesBackend: the pool key's namespace and service account become the pod's."""
    import actor_tasks as t
    from flytekit.models.task import TaskTemplate
    from harness import Attempt, literal_map, wait_for

    from flytekitplugins_actor.replica.execution import ExecutionSpec
    from plugin_backend.pools import PoolKey, PoolManager
    from plugin_backend.template import parse_template

    a = Attempt(str(tmp_path), t.add, literal_map(t.add, a=1, b=2))
    template = parse_template(TaskTemplate.from_flyte_idl(a.template), "actor")
    manager = PoolManager(backend=backend, state_dir=str(tmp_path / "state"))
    try:
        pool = manager.pool_for(PoolKey("team-z", "sa-z", template.env_key, template.code_version), template)
        pool.submit(ExecutionSpec("e1", template.args, {}))
        wait_for(lambda: api.create_namespaced_pod.called, 5, "the replica pod to be created")
        ns, pod = api.create_namespaced_pod.call_args.args
        assert ns == "team-z" and pod["spec"]["serviceAccountName"] == "sa-z"
        assert pod["spec"]["containers"][0]["image"] == template.image
        assert pod["metadata"]["labels"]["flyte-actor/env"] == "conn-test"
    finally:
        manager.shutdown()


def _pod_for(task, api, backend, tmp_path, **inputs):
    """CreateTask-like: parse and (for a pod template) render the template, start its pool, return the pod made."""
    from flytekit.models.literals import LiteralMap
    from flytekit.models.task import TaskTemplate
    from harness import Attempt, literal_map, wait_for

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
        pool = manager.pool_for(PoolKey("team-z", "sa-z", template.env_key, template.code_version), template)
        pool.submit(ExecutionSpec("e1", template.args, {}))
        wait_for(lambda: api.create_namespaced_pod.called, 5, "the replica pod to be created")
        return template, api.create_namespaced_pod.call_args.args[1]
    finally:
        manager.shutdown()


def test_pod_template_environment_pods_carry_the_pod_templates_spec_and_resources(api, backend, tmp_path):
    import actor_tasks as t

    template, pod = _pod_for(t.get_and_set, api, backend, tmp_path, x=1)
    assert "{{" not in " ".join(template.args) and template.command.inputs.endswith("_actor.inputs.pb")
    spec = pod["spec"]
    main = next(c for c in spec["containers"] if c["name"] == "main")
    assert main["command"] == ["python", "-m", "flytekitplugins_actor.replica.worker", "--port", str(WORKER_PORT)]
    assert "args" not in main and main["image"] == template.image
    assert main["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    assert {"name": "COMP_KEY_EX", "value": "compile_time"} in main["env"]
    assert {"name": "ENV_KEY", "value": "from-environment"} in main["env"]
    sidecar = next(c for c in spec["containers"] if c["name"] == "sidecar")
    assert sidecar["image"] == "busybox:1.36" and sidecar["args"] == ["sleep", "infinity"]
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    assert spec["nodeSelector"] == {"pool": "ml"}
    assert spec["serviceAccountName"] == "sa-z" and spec["restartPolicy"] == "Never"
    assert pod["metadata"]["labels"]["team"] == "ml" and pod["metadata"]["labels"]["flyte-actor/env"] == "conn-pod"
    assert pod["metadata"]["annotations"] == {"example.com/note": "from-pod-template"}
    assert len(json.dumps(template.to_record())) < 4096  # the request record stays small


def test_container_environment_pods_carry_requests_limits_gpus_secrets_and_interruptible(
    api, backend, tmp_path, monkeypatch
):
    import actor_tasks as t

    monkeypatch.setenv("FLYTE_ACTOR_K8S_INTERRUPTIBLE_TOLERATIONS", json.dumps([{"key": "spot", "operator": "Exists"}]))
    monkeypatch.setenv("FLYTE_ACTOR_K8S_INTERRUPTIBLE_NODE_SELECTOR", json.dumps({"lifecycle": "spot"}))
    _, pod = _pod_for(t.gpu_task, api, backend, tmp_path)
    c = pod["spec"]["containers"][0]
    assert c["name"] == "primary"
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
        "limits": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
    }
    assert pod["spec"]["nodeSelector"] == {"k8s.amazonaws.com/accelerator": "nvidia-tesla-t4", "lifecycle": "spot"}
    assert pod["spec"]["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    assert pod["metadata"]["labels"]["inject-flyte-secrets"] == "true"  # flyte's pod webhook injects the secret
    assert list(pod["metadata"]["annotations"]) == ["flyte.secrets/s0"]


def test_pod_whose_secret_cannot_be_owned_is_deleted_too(backend, api):
    api.patch_namespaced_secret.side_effect = ApiException(status=403, reason="Forbidden")
    api.delete_namespaced_pod.side_effect = ApiException(status=404, reason="Not Found")  # already gone: fine
    replica = backend.start(_spec())
    death = replica.wait_dead(5)
    assert death is not None and "could not be created" in death.reason and "403" in death.reason
    name, ns = api.delete_namespaced_pod.call_args.args
    assert name == replica.pod_name and ns == "team-a"  # no pod is left running without its owner
    api.delete_namespaced_secret.assert_called()


def test_pods_get_a_long_configurable_readiness_timeout(api, monkeypatch):
    assert KubernetesBackend(api=api).ready_timeout_s == 600.0  # image pulls of big GPU images take minutes
    from kubernetes import config

    monkeypatch.setattr(config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(client, "CoreV1Api", lambda: api)
    api.list_pod_for_all_namespaces.return_value = client.V1PodList(items=[])
    monkeypatch.setenv("FLYTE_ACTOR_K8S_READY_TIMEOUT_S", "900")
    assert KubernetesBackend.from_env().ready_timeout_s == 900.0

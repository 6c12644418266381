"""Serialization of actor tasks and actor maps through flytekit's own translator (what `pyflyte register` does)."""

import functools
import re
import typing
from collections import OrderedDict

import pytest
from flyteidl.core import execution_envs_pb2
from flytekit import PodTemplate, Resources, Secret, task, workflow
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.extras.accelerators import A100, T4
from flytekit.tools.translator import get_serializable
from google.protobuf import json_format
from kubernetes.client import V1Container, V1EnvVar, V1PodSpec

import flytekitplugins_actor
from flytekitplugins_actor import ActorEnvironment

SETTINGS = SerializationSettings(
    image_config=ImageConfig.auto(img_name="ghcr.io/default/image:1"), project="proj", domain="dev", version="v1"
)


def serialize(entity, mapping=None):
    return get_serializable(OrderedDict() if mapping is None else mapping, SETTINGS, entity)


def pod_template(env_value="pv", args=None, node_selector=None, image=None):
    return PodTemplate(
        primary_container_name="primary",
        labels={"team": "ml"},
        pod_spec=V1PodSpec(
            containers=[
                V1Container(name="primary", image=image, args=args, env=[V1EnvVar(name="POD_VAR", value=env_value)])
            ],
            node_selector=node_selector or {"pool": "cpu"},
        ),
    )


BASE = dict(name="ser", container_image="ghcr.io/x/actor:1", replica_count=2, ttl_seconds=60)
ENV = ActorEnvironment(**BASE)


@ENV.task
def add_one(x: int) -> int:
    return x + 1


@ENV.task
def concat(a: str, b: str) -> str:
    return a + b


# ---- the task template ----
def test_actor_task_template_type_and_version():
    t = serialize(add_one).template
    assert t.type == "actor"
    assert t.task_type_version == 0
    assert t.id.name.endswith("add_one")


def test_custom_is_an_execution_env_in_union_shape():
    custom = serialize(add_one).template.custom
    assert set(custom) == {"name", "version", "type", "spec"}
    assert custom["name"] == "ser"
    assert custom["type"] == "actor"
    assert re.fullmatch(r"[0-9a-f]{15}", custom["version"]), custom["version"]
    assert custom["version"] == ENV.key(SETTINGS.image_config)
    spec = custom["spec"]
    assert spec["container_image"] == "ghcr.io/x/actor:1"
    assert spec["replica_count"] == 2
    assert spec["ttl_seconds"] == 60


def test_custom_parses_as_flyteidl_execution_env():
    custom = serialize(add_one).template.custom
    msg = json_format.ParseDict(custom, execution_envs_pb2.ExecutionEnv())
    assert msg.name == "ser" and msg.type == "actor" and msg.version == custom["version"]
    assert msg.spec["container_image"] == "ghcr.io/x/actor:1"
    assert msg.spec["replica_count"] == 2


def test_default_ttl_and_default_image_in_spec():
    env = ActorEnvironment(name="defaults")

    @env.task
    def f() -> None:
        pass

    spec = serialize(f).template.custom["spec"]
    assert spec["ttl_seconds"] == 300
    assert spec["replica_count"] == 1
    # no image on the environment: the image flytekit would use for any task under these settings
    assert spec["container_image"] == "ghcr.io/default/image:1"
    assert serialize(f).template.container.image == "ghcr.io/default/image:1"


def test_container_runs_pyflyte_execute_with_the_default_resolver():
    c = serialize(add_one).template.container
    assert c.image == "ghcr.io/x/actor:1"
    assert c.args[0] == "pyflyte-execute"
    assert "{{.input}}" in c.args and "{{.outputPrefix}}" in c.args
    i = c.args.index("--resolver")
    assert c.args[i + 1] == "flytekit.core.python_auto_container.default_task_resolver"
    assert c.args[-4:] == ["task-module", "test_sdk_serialization", "task-name", "add_one"]


# ---- resources, env, secrets, pod template: exactly as flytekit serializes them for any task ----
SHAPE = dict(
    environment={"A": "1", "B": "2"},
    requests=Resources(cpu="1", mem="1Gi"),
    limits=Resources(cpu="2", mem="2Gi"),
    secret_requests=[Secret(group="grp", key="key", mount_requirement=Secret.MountType.ENV_VAR)],
    accelerator=T4,
    interruptible=True,
)
SHAPED = ActorEnvironment(name="shaped", container_image="ghcr.io/x/actor:1", **SHAPE)


@SHAPED.task
def shaped_actor(x: int) -> int:
    return x


@task(container_image="ghcr.io/x/actor:1", **SHAPE)
def shaped_plain(x: int) -> int:
    return x


def test_resources_env_secrets_serialize_as_flytekit_does():
    a, p = serialize(shaped_actor).template, serialize(shaped_plain).template
    assert a.container.resources == p.container.resources
    assert dict(a.container.env) == {"A": "1", "B": "2"}
    assert a.container.env == p.container.env
    assert a.security_context == p.security_context
    assert [s.key for s in a.security_context.secrets] == ["key"]
    assert a.metadata.interruptible is True and p.metadata.interruptible is True
    assert a.extended_resources == p.extended_resources
    assert a.extended_resources.gpu_accelerator.device == "nvidia-tesla-t4"
    assert a.container.image == p.container.image


POD_ENV = ActorEnvironment(name="podded", pod_template=pod_template())


@POD_ENV.task
def pod_actor(x: int) -> int:
    return x


@task(pod_template=pod_template())
def pod_plain(x: int) -> int:
    return x


def _normalized_pod(template):
    import copy

    spec = copy.deepcopy(template.k8s_pod.pod_spec)
    for c in spec["containers"]:
        c["args"] = [a for a in c["args"] if a not in ("pod_actor", "pod_plain")]
    return spec


def test_pod_template_serializes_as_flytekit_does():
    a, p = serialize(pod_actor).template, serialize(pod_plain).template
    assert a.container is None and a.k8s_pod is not None
    assert a.k8s_pod.metadata.labels == {"team": "ml"} == p.k8s_pod.metadata.labels
    assert _normalized_pod(a) == _normalized_pod(p)
    primary = _normalized_pod(a)["containers"][0]
    assert primary["name"] == "primary"
    assert {"name": "POD_VAR", "value": "pv"} in primary["env"]
    assert primary["args"][0] == "pyflyte-execute"
    assert a.custom["spec"]["container_image"] == "ghcr.io/default/image:1"


# ---- the environment key ----
def test_two_tasks_of_one_environment_share_the_key():
    k1 = serialize(add_one).template.custom["version"]
    k2 = serialize(concat).template.custom["version"]
    assert k1 == k2 == ENV.key(SETTINGS.image_config)


def test_an_equal_environment_defined_twice_has_the_same_key():
    assert ActorEnvironment(**BASE).key() == ENV.key()
    assert (
        ActorEnvironment(name="p", pod_template=pod_template()).key()
        == ActorEnvironment(name="p", pod_template=pod_template()).key()
    )


VARIANTS = {
    "name": dict(name="ser-2"),
    "image": dict(container_image="ghcr.io/x/actor:2"),
    "requests": dict(requests=Resources(cpu="1")),
    "requests-value": dict(requests=Resources(cpu="2")),
    "limits": dict(limits=Resources(mem="1Gi")),
    "accelerator": dict(accelerator=T4),
    "accelerator-value": dict(accelerator=A100),
    "environment": dict(environment={"A": "1"}),
    "environment-value": dict(environment={"A": "2"}),
    "secrets": dict(secret_requests=[Secret(group="g", key="k")]),
    "secrets-key": dict(secret_requests=[Secret(group="g", key="other")]),
    "pod-template": dict(pod_template=pod_template()),
    "pod-template-env": dict(pod_template=pod_template(env_value="other")),
    "pod-template-node-selector": dict(pod_template=pod_template(node_selector={"pool": "gpu"})),
    "interruptible": dict(interruptible=True),
    "interruptible-false": dict(interruptible=False),
    "replica-count": dict(replica_count=3),
    "ttl": dict(ttl_seconds=61),
    "ttl-default": dict(ttl_seconds=None),
}


def test_every_shaping_field_changes_the_key():
    keys = {"base": ActorEnvironment(**BASE).key()}
    for variant, change in VARIANTS.items():
        keys[variant] = ActorEnvironment(**{**BASE, **change}).key()
    # every variant differs from the base and from every other variant
    assert len(set(keys.values())) == len(keys), {k: v for k, v in keys.items() if list(keys.values()).count(v) > 1}


def test_key_changes_with_the_serialized_image_config():
    env = ActorEnvironment(name="noimage")
    other = SerializationSettings(image_config=ImageConfig.auto(img_name="ghcr.io/default/image:2"))
    assert env.key(SETTINGS.image_config) != env.key(other.image_config)


def test_key_ignores_pod_template_container_args():
    a = ActorEnvironment(name="p", pod_template=pod_template(args=["--one"]))
    b = ActorEnvironment(name="p", pod_template=pod_template(args=["--two", "x"]))
    c = ActorEnvironment(name="p", pod_template=pod_template())
    assert a.key() == b.key() == c.key()


def test_key_does_not_depend_on_the_order_of_environment_vars():
    a = ActorEnvironment(name="o", environment={"A": "1", "B": "2"})
    b = ActorEnvironment(name="o", environment={"B": "2", "A": "1"})
    assert a.key() == b.key()


# ---- flytekitplugins_actor.map serializes as ONE task ----
@task
def to_strs(xs: typing.List[int]) -> typing.List[str]:
    return [str(x) for x in xs]


@workflow
def map_wf(xs: typing.List[int]) -> typing.List[typing.Optional[str]]:
    return flytekitplugins_actor.map(functools.partial(concat, b="!"), concurrency=2, min_success_ratio=0.5)(
        a=to_strs(xs=xs)
    )


def test_map_serializes_as_one_actor_map_task_node():
    mapping = OrderedDict()
    wf = serialize(map_wf, mapping)
    nodes = wf.template.nodes
    map_nodes = [n for n in nodes if n.task_node is not None and "actor_map" in n.task_node.reference_id.name]
    assert len(map_nodes) == 1
    node = map_nodes[0]
    assert node.array_node is None
    assert all(n.array_node is None for n in nodes)
    tasks = {
        spec.template.id.name: spec.template
        for spec in mapping.values()
        if hasattr(spec, "template") and hasattr(spec.template, "type")
    }
    t = tasks[node.task_node.reference_id.name]
    assert t.type == "actor_map"
    # no other task of the workflow is an actor subtask registered for an ArrayNode
    assert [n for n, tt in tasks.items() if tt.type == "actor"] == []
    # the subtask's container: the replica runs the subtask itself, item by item
    sub = serialize(concat).template
    assert t.container.args == sub.container.args
    assert t.container.image == sub.container.image
    custom = t.custom
    assert custom["name"] == "ser" and custom["type"] == "actor" and custom["version"] == sub.custom["version"]
    assert custom["spec"]["replica_count"] == 2
    assert custom["spec"]["map"] == {
        "concurrency": 2,
        "min_success_ratio": 0.5,
        "mapped_inputs": ["a"],
        "bound_inputs": ["b"],
        "subtask": concat.name,
    }
    json_format.ParseDict(custom, execution_envs_pb2.ExecutionEnv())
    # mapped inputs become lists, bound inputs stay scalar; outputs are optional lists below ratio 1
    ins = t.interface.inputs
    assert ins["a"].type.collection_type.simple == 3  # STRING
    assert ins["b"].type.simple == 3
    out = t.interface.outputs["o0"].type.collection_type
    assert out.union_type is not None and len(out.union_type.variants) == 2


def test_plain_map_has_non_optional_outputs():
    m = flytekitplugins_actor.map(add_one)
    t = serialize(m).template
    assert t.type == "actor_map"
    assert t.interface.outputs["o0"].type.collection_type.simple == 1  # INTEGER
    assert t.custom["spec"]["map"]["concurrency"] is None
    assert t.custom["spec"]["map"]["mapped_inputs"] == ["x"]


def test_map_refuses_non_actor_tasks_and_bad_arguments():
    with pytest.raises(TypeError, match="actor task"):
        flytekitplugins_actor.map(to_strs)
    with pytest.raises(ValueError, match="concurrency"):
        flytekitplugins_actor.map(add_one, concurrency=0)
    with pytest.raises(ValueError, match="min_success_ratio"):
        flytekitplugins_actor.map(add_one, min_success_ratio=1.5)
    with pytest.raises(TypeError, match="not inputs"):
        flytekitplugins_actor.map(functools.partial(add_one, y=1))
    with pytest.raises(TypeError, match="nothing is left to map"):
        flytekitplugins_actor.map(functools.partial(add_one, x=1))


IMAGE_IN_POD_TEMPLATE = ActorEnvironment(
    name="pod-image", pod_template=pod_template(image="ghcr.io/x/from-pod-template:3")
)


@IMAGE_IN_POD_TEMPLATE.task
def pod_image_task() -> None:
    pass


def test_spec_image_is_the_image_the_primary_container_runs():
    t = serialize(pod_image_task).template
    primary = [c for c in t.k8s_pod.pod_spec["containers"] if c["name"] == "primary"][0]
    assert primary["image"] == "ghcr.io/x/from-pod-template:3"
    assert t.custom["spec"]["container_image"] == primary["image"]

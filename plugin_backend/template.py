"""Reads an actor task template as sent by propeller, refusing what the connector cannot serve with a clear reason.

Accepts the `custom` shape both this SDK and Union's SDK emit: the JSON form of flyteidl's core.ExecutionEnv,
`{name, version: <environment key>, type: "actor", spec: {container_image, replica_count, ttl_seconds, ...}}`,
plus `spec.map` for the map task type.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from flytekit.models.task import TaskTemplate

from flytekitplugins_actor.constants import (
    ACTOR_MAP_TASK_TYPE,
    ACTOR_SYNC_TASK_TYPE,
    ACTOR_TASK_TYPE,
    DEFAULT_TTL_SECONDS,
)
from flytekitplugins_actor.map_model import MapSpec, MapSpecError
from flytekitplugins_actor.replica.command import ExecutionCommand
from plugin_backend.errors import SUPPORTED_TYPE_VERSION, InvalidTaskTemplate

__all__ = [
    "ACTOR_TASK_TYPE",
    "ACTOR_MAP_TASK_TYPE",
    "ACTOR_SYNC_TASK_TYPE",
    "DEFAULT_TTL_SECONDS",
    "SUPPORTED_TYPE_VERSION",
    "ActorTemplate",
    "MapSpec",
    "parse_template",
]


@dataclass(frozen=True)
class ActorTemplate:
    """The parts of a task template that route and run an actor execution."""

    task_type: str
    task_name: str
    env_name: str
    env_key: str
    image: str
    replica_count: int
    ttl_seconds: int
    args: List[str]
    command: ExecutionCommand
    container_env: Dict[str, str] = field(default_factory=dict)
    input_names: Tuple[str, ...] = ()
    output_names: Tuple[str, ...] = ()
    map: Optional[MapSpec] = None
    resources: Dict[str, Dict[str, str]] = field(default_factory=dict)
    """The primary container's Kubernetes resources: {"requests": {...}, "limits": {...}} (GPU as nvidia.com/gpu)."""
    pod_spec: Optional[Dict[str, Any]] = None
    """The task's k8s_pod.pod_spec (an environment with a pod_template), primary container args removed."""
    pod_labels: Dict[str, str] = field(default_factory=dict)
    pod_annotations: Dict[str, str] = field(default_factory=dict)
    primary_container_name: str = "primary"
    accelerator: Optional[str] = None  # extended_resources.gpu_accelerator.device, e.g. nvidia-tesla-t4
    interruptible: bool = False  # metadata.interruptible: pods may go to spot nodes (see pools.replica_pod_spec)

    @property
    def needs_render(self) -> bool:
        """True when the args still hold {{.placeholders}}: propeller renders a template's container args before
        CreateTask, never its k8s_pod's, so an environment with a pod_template arrives unrendered."""
        return any(_PLACEHOLDER.search(a) for a in self.args)

    def rendered(self, values: Dict[str, str]) -> "ActorTemplate":
        """This template with its args' placeholders replaced by `values` (keys as in {{.input}}: 'input', ...)."""

        def sub(m: "re.Match[str]") -> str:
            return values[m.group(1).lower()]

        args = [_PLACEHOLDER.sub(sub, a) for a in self.args]
        return replace(self, args=args, command=ExecutionCommand.parse(args))

    @property
    def code_version(self) -> str:
        """What the replica imports user code from: the fast-register distribution, else the image."""
        return self.command.distribution or self.image

    def to_record(self) -> Dict[str, Any]:
        """What a restarted connector needs to run it again (stored in request.json): plain JSON."""
        record = {f: getattr(self, f) for f in _RECORD_FIELDS}
        record["map"] = None if self.map is None else {f: getattr(self.map, f) for f in _MAP_FIELDS}
        return record

    @classmethod
    def from_record(cls, record: Dict[str, Any]) -> "ActorTemplate":
        m = record.get("map")
        map_spec = None if m is None else MapSpec(**{f: tuple(v) if isinstance(v, list) else v for f, v in m.items()})
        fields_ = {
            f: tuple(record[f]) if f in ("input_names", "output_names") else record[f]
            for f in _RECORD_FIELDS
            if f in record
        }  # records of older connectors lack the pod fields
        return cls(command=ExecutionCommand.parse(record["args"]), map=map_spec, **fields_)


_RECORD_FIELDS = (
    "task_type",
    "task_name",
    "env_name",
    "env_key",
    "image",
    "replica_count",
    "ttl_seconds",
    "args",
    "container_env",
    "input_names",
    "output_names",
    "resources",
    "pod_spec",
    "pod_labels",
    "pod_annotations",
    "primary_container_name",
    "accelerator",
    "interruptible",
)
_PLACEHOLDER = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")
RENDERABLE = ("input", "outputprefix", "rawoutputdataprefix", "checkpointoutputprefix", "prevcheckpointprefix")
"""The placeholders the connector renders itself in a pod template's args (see ActorTemplate.rendered)."""
GPU_RESOURCE = "nvidia.com/gpu"
_RESOURCE_NAMES = {
    "cpu": "cpu",
    "memory": "memory",
    "gpu": GPU_RESOURCE,
    "ephemeral_storage": "ephemeral-storage",
    "ephemeral-storage": "ephemeral-storage",
    "storage": "ephemeral-storage",
}
_MAP_FIELDS = ("mapped_inputs", "bound_inputs", "subtask", "concurrency", "min_success_ratio")


def _refuse(template: TaskTemplate, reason: str) -> InvalidTaskTemplate:
    name = template.id.name if template.id is not None else "?"
    return InvalidTaskTemplate(f"task {name!r} (type {template.type!r}): {reason}")


def _int(template: TaskTemplate, spec: dict, key: str, default: Optional[int], minimum: int) -> Optional[int]:
    """An integer field of custom.spec; missing or null means `default` (Union's SDK writes unset fields as null)."""
    value = spec.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():  # a protobuf Struct carries numbers as doubles
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(template, f"custom.spec.{key}={value!r} must be an integer >= {minimum}")
    return value


def parse_template(template: TaskTemplate, task_type: str) -> ActorTemplate:
    """Validates a template for `task_type` (actor, actor_sync or actor_map); raises InvalidTaskTemplate naming why."""
    if template.type != task_type:
        raise _refuse(template, f"this connector serves task type {task_type!r} here")
    if template.task_type_version != SUPPORTED_TYPE_VERSION:
        raise _refuse(
            template,
            f"task type version {template.task_type_version} is unknown; "
            f"this connector serves version {SUPPORTED_TYPE_VERSION}",
        )
    custom: Any = template.custom
    if not custom:
        raise _refuse(
            template, "custom is missing: an actor task carries its ExecutionEnv ({name, version, type, spec}) there"
        )
    if not isinstance(custom, dict):
        raise _refuse(template, f"custom must be an ExecutionEnv object, got {type(custom).__name__}")
    if custom.get("type") != "actor":
        raise _refuse(template, f"custom.type={custom.get('type')!r}; expected 'actor'")
    name, key, spec = custom.get("name"), custom.get("version"), custom.get("spec")
    if not isinstance(name, str) or not name:
        raise _refuse(template, "custom.name (the environment name) is missing")
    if not isinstance(key, str) or not key:
        raise _refuse(template, "custom.version (the environment key) is missing")
    if not isinstance(spec, dict):
        raise _refuse(template, "custom.spec is missing or not an object")
    replica_count = _int(template, spec, "replica_count", 1, 1)
    ttl_seconds = _int(template, spec, "ttl_seconds", DEFAULT_TTL_SECONDS, 0)
    _int(template, spec, "parallelism", 1, 1)  # validated; a replica runs one execution at a time
    _int(template, spec, "backlog_length", None, 0)  # validated; Union's SDK sends it (null when unset), unused here
    container = template.container
    pod = template.k8s_pod
    primary_name = (template.config or {}).get("primary_container_name") or "primary"
    pod_spec: Optional[Dict[str, Any]] = None
    if container is not None:
        where = "its container"
        args = [str(a) for a in container.args or []]
        container_image = container.image
        container_env = {str(k): str(v) for k, v in (container.env or {}).items()}
        resources = _container_resources(container.resources)
    elif pod is not None and isinstance(pod.pod_spec, dict):
        where = f"its pod template's primary container {primary_name!r}"
        pod_spec = copy.deepcopy(pod.pod_spec)
        primary = next(
            (c for c in pod_spec.get("containers") or [] if isinstance(c, dict) and c.get("name") == primary_name), None
        )
        if primary is None:
            raise _refuse(
                template, f"its k8s_pod has no primary container named {primary_name!r} (config.primary_container_name)"
            )
        args = [str(a) for a in [*(primary.pop("command", None) or []), *(primary.pop("args", None) or [])]]
        container_image = primary.get("image")
        container_env = {
            str(e["name"]): str(e["value"])
            for e in primary.get("env") or []
            if isinstance(e, dict) and e.get("name") and e.get("value") is not None
        }
        resources = _k8s_resources(primary.get("resources"))
    else:
        raise _refuse(
            template, "it has no container and no k8s_pod: an actor execution runs the task's pyflyte-execute command"
        )
    if not args:
        raise _refuse(template, f"{where} has no args")
    placeholders = {m.group(1).lower() for a in args for m in _PLACEHOLDER.finditer(a)}
    if placeholders and container is not None:
        raise _refuse(
            template, "its container args still hold {{.placeholders}}: propeller renders them before CreateTask"
        )
    if placeholders - set(RENDERABLE):
        raise _refuse(
            template,
            f"{where} args hold placeholders the connector cannot render: {sorted(placeholders - set(RENDERABLE))}",
        )
    try:  # placeholders are rendered once the output prefix is known; they stand in for paths here
        command = ExecutionCommand.parse([_PLACEHOLDER.sub("x", a) for a in args] if placeholders else args)
    except Exception as e:  # click usage errors, ValueError
        raise _refuse(template, f"{where} args are not a pyflyte-execute command: {e}") from None
    image = spec.get("container_image") or container_image
    if not isinstance(image, str) or not image:
        raise _refuse(template, "no container image in custom.spec.container_image or the container")
    pod_labels = {
        str(k): str(v) for k, v in ((pod.metadata.labels if pod is not None and pod.metadata else None) or {}).items()
    }
    pod_annotations = {
        str(k): str(v)
        for k, v in ((pod.metadata.annotations if pod is not None and pod.metadata else None) or {}).items()
    }
    secrets = template.security_context.secrets if template.security_context is not None else None
    if secrets:  # what propeller puts on a task's pod for flyte's secret-injecting pod webhook
        pod_labels[SECRETS_POD_LABEL] = "true"
        pod_annotations.update(secret_annotations(secrets))
    accelerator = None
    ext = template.extended_resources
    if ext is not None and ext.HasField("gpu_accelerator") and ext.gpu_accelerator.device:
        accelerator = ext.gpu_accelerator.device
    inputs = tuple(template.interface.inputs.keys()) if template.interface else ()
    outputs = tuple(template.interface.outputs.keys()) if template.interface else ()
    map_spec = _map_spec(template, spec, inputs) if task_type == ACTOR_MAP_TASK_TYPE else None
    return ActorTemplate(
        task_type=task_type,
        task_name=template.id.name if template.id is not None else "",
        env_name=name,
        env_key=key,
        image=image,
        replica_count=replica_count,
        ttl_seconds=ttl_seconds,
        args=args,
        command=command,
        container_env=container_env,
        input_names=inputs,
        output_names=outputs,
        map=map_spec,
        resources=resources,
        pod_spec=pod_spec,
        pod_labels=pod_labels,
        pod_annotations=pod_annotations,
        primary_container_name=primary_name,
        accelerator=accelerator,
        interruptible=bool(template.metadata is not None and template.metadata.interruptible),
    )


SECRETS_POD_LABEL = "inject-flyte-secrets"
_SECRETS_ANNOTATION_PREFIX = "flyte.secrets/s"
_B32_STD = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_FLYTE = "abcdefghijklmnopqrstuvwxyz123456"  # flyteplugins' encoding.Base32Encoder alphabet, no padding


def secret_annotations(secrets) -> Dict[str, str]:
    """The pod annotations propeller writes for a task's secret requests (flyteplugins secrets.
    MarshalSecretsToMapStrings): flyte.secrets/s<i> = the Secret's proto text, base32 in flyte's alphabet."""
    import base64

    from google.protobuf import text_format

    out = {}
    for i, secret in enumerate(secrets):
        text = text_format.MessageToString(secret.to_flyte_idl(), as_one_line=True)
        encoded = base64.b32encode(text.encode()).decode().rstrip("=").translate(str.maketrans(_B32_STD, _B32_FLYTE))
        out[f"{_SECRETS_ANNOTATION_PREFIX}{i}"] = encoded
    return out


def _normalize_resources(requests: Dict[str, str], limits: Dict[str, str]) -> Dict[str, Dict[str, str]]:
    """As propeller does for a task's pod: a resource with a request but no limit gets the request as its limit
    (a GPU must have one), and a GPU limit is also its request."""
    limits = {**requests, **limits}
    if GPU_RESOURCE in limits:
        requests = {**requests, GPU_RESOURCE: limits[GPU_RESOURCE]}
    out = {}
    if requests:
        out["requests"] = dict(sorted(requests.items()))
    if limits:
        out["limits"] = dict(sorted(limits.items()))
    return out


def _k8s_name(name: str) -> str:
    return _RESOURCE_NAMES.get(name.lower(), name)


def _container_resources(resources: Any) -> Dict[str, Dict[str, str]]:
    """flytekit's Container resources (lists of ResourceEntry) as Kubernetes requests/limits."""
    from flyteidl.core.tasks_pb2 import Resources as ResourcesPb

    def entries(items) -> Dict[str, str]:
        out = {}
        for r in items or []:
            name = ResourcesPb.ResourceName.Name(r.name)
            if name != "UNKNOWN" and r.value:
                out[_k8s_name(name)] = str(r.value)
        return out

    if resources is None:
        return {}
    return _normalize_resources(entries(resources.requests), entries(resources.limits))


def _k8s_resources(resources: Any) -> Dict[str, Dict[str, str]]:
    """A pod spec container's resources ({"requests": {"gpu": "1"}, ...}, flytekit's names) as Kubernetes ones."""
    if not isinstance(resources, dict):
        return {}
    requests = {_k8s_name(str(k)): str(v) for k, v in (resources.get("requests") or {}).items() if v is not None}
    limits = {_k8s_name(str(k)): str(v) for k, v in (resources.get("limits") or {}).items() if v is not None}
    return _normalize_resources(requests, limits)


def _map_spec(template: TaskTemplate, spec: dict, inputs: Tuple[str, ...]) -> MapSpec:
    m = spec.get("map")
    if not isinstance(m, dict):
        raise _refuse(template, "custom.spec.map is missing: an actor_map task says which inputs it maps there")
    mapped, bound = m.get("mapped_inputs"), m.get("bound_inputs") or []
    if not isinstance(mapped, list) or not mapped or not all(isinstance(x, str) for x in mapped):
        raise _refuse(template, "custom.spec.map.mapped_inputs must be a non-empty list of input names")
    if not isinstance(bound, list) or not all(isinstance(x, str) for x in bound):
        raise _refuse(template, "custom.spec.map.bound_inputs must be a list of input names")
    for n in [*mapped, *bound]:
        if n not in inputs:
            raise _refuse(template, f"custom.spec.map names input {n!r}, which the interface does not declare")
    for n in mapped:
        if template.interface.inputs[n].type.collection_type is None:
            raise _refuse(template, f"mapped input {n!r} is not a list in the interface")
    concurrency = m.get("concurrency")
    if isinstance(concurrency, float) and concurrency.is_integer():  # a protobuf Struct carries numbers as doubles
        concurrency = int(concurrency)
    try:  # the SDK's MapSpec holds the rules (concurrency None or >= 1, ratio in [0, 1]): one check, one message
        return MapSpec(
            tuple(mapped), tuple(bound), str(m.get("subtask") or ""), concurrency, m.get("min_success_ratio", 1.0)
        )
    except MapSpecError as e:
        raise _refuse(template, f"custom.spec.map: {e}") from None

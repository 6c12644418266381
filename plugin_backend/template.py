"""Reads an actor task template as sent by propeller, refusing what the connector cannot serve with a clear reason.

Accepts the `custom` shape both this SDK and Union's SDK emit: the JSON form of flyteidl's core.ExecutionEnv,
`{name, version: <environment key>, type: "actor", spec: {container_image, replica_count, ttl_seconds, ...}}`,
plus `spec.map` for the map task type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from flytekit.models.task import TaskTemplate

from flytekitplugins_actor.map_plan import required_successes
from flytekitplugins_actor.replica.execution import ParsedCommand, parse_command
from plugin_backend.errors import InvalidTaskTemplate

ACTOR_TASK_TYPE = "actor"
ACTOR_MAP_TASK_TYPE = "actor_map"
SUPPORTED_TYPE_VERSION = 0
DEFAULT_TTL_SECONDS = 300


@dataclass(frozen=True)
class MapSpec:
    """How an `actor_map` task fans out: which inputs are lists to split, which are bound as is."""

    mapped_inputs: Tuple[str, ...]
    bound_inputs: Tuple[str, ...]
    subtask: str
    concurrency: Optional[int] = None
    min_success_ratio: float = 1.0

    def min_successes(self, n: int) -> int:
        return min(n, required_successes(n, self.min_success_ratio))


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
    command: ParsedCommand
    container_env: Dict[str, str] = field(default_factory=dict)
    input_names: Tuple[str, ...] = ()
    output_names: Tuple[str, ...] = ()
    map: Optional[MapSpec] = None

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
        fields_ = {f: tuple(record[f]) if f in ("input_names", "output_names") else record[f] for f in _RECORD_FIELDS}
        return cls(command=parse_command(record["args"]), map=map_spec, **fields_)


_RECORD_FIELDS = ("task_type", "task_name", "env_name", "env_key", "image", "replica_count", "ttl_seconds", "args",
                  "container_env", "input_names", "output_names")
_MAP_FIELDS = ("mapped_inputs", "bound_inputs", "subtask", "concurrency", "min_success_ratio")


def _refuse(template: TaskTemplate, reason: str) -> InvalidTaskTemplate:
    name = template.id.name if template.id is not None else "?"
    return InvalidTaskTemplate(f"task {name!r} (type {template.type!r}): {reason}")


def _int(template: TaskTemplate, spec: dict, key: str, default: Optional[int], minimum: int) -> Optional[int]:
    value = spec.get(key, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # a protobuf Struct carries numbers as doubles
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(template, f"custom.spec.{key}={value!r} must be an integer >= {minimum}")
    return value


def parse_template(template: TaskTemplate, task_type: str) -> ActorTemplate:
    """Validates a template for `task_type` ("actor" or "actor_map"); raises InvalidTaskTemplate naming the problem."""
    if template.type != task_type:
        raise _refuse(template, f"this connector serves task type {task_type!r} here")
    if template.task_type_version != SUPPORTED_TYPE_VERSION:
        raise _refuse(template, f"task type version {template.task_type_version} is unknown; this connector serves version {SUPPORTED_TYPE_VERSION}")
    custom: Any = template.custom
    if not custom:
        raise _refuse(template, "custom is missing: an actor task carries its ExecutionEnv ({name, version, type, spec}) there")
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
    container = template.container
    if container is None:
        raise _refuse(template, "it has no container: an actor execution runs the task's pyflyte-execute command")
    args = [str(a) for a in container.args or []]
    if not args:
        raise _refuse(template, "its container has no args")
    if any("{{." in a for a in args):
        raise _refuse(template, "its container args still hold {{.placeholders}}: propeller renders them before CreateTask")
    try:
        command = parse_command(args)
    except Exception as e:  # click usage errors, ValueError
        raise _refuse(template, f"its container args are not a pyflyte-execute command: {e}") from None
    image = spec.get("container_image") or container.image
    if not isinstance(image, str) or not image:
        raise _refuse(template, "no container image in custom.spec.container_image or the container")
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
        container_env={str(k): str(v) for k, v in (container.env or {}).items()},
        input_names=inputs,
        output_names=outputs,
        map=map_spec,
    )


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
    if set(mapped) & set(bound):
        raise _refuse(template, f"inputs {sorted(set(mapped) & set(bound))} are both mapped and bound")
    for n in mapped:
        if template.interface.inputs[n].type.collection_type is None:
            raise _refuse(template, f"mapped input {n!r} is not a list in the interface")
    concurrency = _int(template, m, "concurrency", None, 0) or None  # 0 means unbounded, as in flytekit.map_task
    ratio = m.get("min_success_ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise _refuse(template, f"custom.spec.map.min_success_ratio={ratio!r} must be a number in [0, 1]")
    subtask = m.get("subtask") or ""
    return MapSpec(tuple(mapped), tuple(bound), str(subtask), concurrency, float(ratio))

"""`ActorEnvironment`: the shape of a warm replica pool, validated when it is defined."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import types
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from flytekit import PodTemplate, Resources, Secret
from flytekit.extras.accelerators import BaseAccelerator
from flytekit.image_spec.image_spec import ImageSpec

from flytekitplugins_actor.constants import DEFAULT_TTL_SECONDS

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # always fullmatch: `$` would allow a trailing "\n"
_ENV_VAR_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
"""A name both a process (no '=', no NUL) and Kubernetes (C identifier plus '-' and '.') accept."""

ENVIRONMENT_OWNED_TASK_ARGS = {
    "container_image": "container_image",
    "requests": "requests",
    "limits": "limits",
    "resources": "requests/limits",
    "environment": "environment",
    "secret_requests": "secret_requests",
    "pod_template": "pod_template",
    "pod_template_name": "pod_template",
    "accelerator": "accelerator",
    "shared_memory": "pod_template",
    "interruptible": "interruptible",
    "task_config": "the ActorEnvironment itself",
    "task_resolver": "(not configurable: actor tasks use flytekit's default resolver)",
}


def _fail(field: str, value: Any, rule: str, exc: type = ValueError) -> None:
    raise exc(f"ActorEnvironment.{field}={value!r} is invalid: {rule}")


def _check_type(field: str, value: Any, types_: Tuple[type, ...], rule: str) -> None:
    if value is not None and (not isinstance(value, types_) or isinstance(value, bool) and bool not in types_):
        _fail(field, value, rule, TypeError)


@dataclasses.dataclass(frozen=True, eq=False)
class ActorEnvironment:
    """A pool of warm replicas that actor tasks run on. Fields that shape a replica live here, not on the task.

    Use it as a decorator: ``@env.task`` or ``@env.task(cache=True, cache_version="1")``.
    """

    name: str
    container_image: Optional[Union[str, ImageSpec]] = None
    replica_count: int = 1
    ttl_seconds: Optional[int] = None
    environment: Optional[Mapping[str, str]] = None
    requests: Optional[Resources] = None
    limits: Optional[Resources] = None
    accelerator: Optional[BaseAccelerator] = None
    secret_requests: Optional[Tuple[Secret, ...]] = None
    pod_template: Optional[PodTemplate] = None
    interruptible: Optional[bool] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _DNS_LABEL.fullmatch(self.name):
            _fail(
                "name",
                self.name,
                "must be a DNS-1123 label: 1-63 lowercase alphanumerics or '-', starting and ending alphanumeric",
            )
        _check_type(
            "container_image", self.container_image, (str, ImageSpec), "must be an image name (str) or an ImageSpec"
        )
        if isinstance(self.container_image, str) and not self.container_image.strip():
            _fail("container_image", self.container_image, "must not be empty (leave it None for the default image)")
        if isinstance(self.replica_count, bool) or not isinstance(self.replica_count, int):
            _fail("replica_count", self.replica_count, "must be an int >= 1", TypeError)
        if self.replica_count < 1:
            _fail("replica_count", self.replica_count, "must be an int >= 1")
        if self.ttl_seconds is not None:
            if isinstance(self.ttl_seconds, bool) or not isinstance(self.ttl_seconds, int):
                _fail(
                    "ttl_seconds",
                    self.ttl_seconds,
                    f"must be None (default {DEFAULT_TTL_SECONDS}s) or an int >= 0",
                    TypeError,
                )
            if self.ttl_seconds < 0:
                _fail("ttl_seconds", self.ttl_seconds, f"must be None (default {DEFAULT_TTL_SECONDS}s) or an int >= 0")
        if self.environment is not None:
            if not isinstance(self.environment, Mapping):
                _fail("environment", self.environment, "must be a dict of str to str", TypeError)
            for k, v in self.environment.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    _fail("environment", self.environment, f"must map str to str; entry {k!r}: {v!r} is not", TypeError)
                if not _ENV_VAR_NAME.fullmatch(k):
                    _fail(
                        "environment",
                        self.environment,
                        f"variable name {k!r} is illegal: a name is ASCII letters, digits, '_', '-' or '.', "
                        "not starting with a digit (no '=', spaces or control characters)",
                    )
                if "\x00" in v:
                    _fail("environment", self.environment, f"value of {k!r} contains a NUL character")
            object.__setattr__(self, "environment", types.MappingProxyType(dict(self.environment)))
        _check_type("requests", self.requests, (Resources,), "must be a flytekit.Resources")
        _check_type("limits", self.limits, (Resources,), "must be a flytekit.Resources")
        _check_type(
            "accelerator",
            self.accelerator,
            (BaseAccelerator,),
            "must be a flytekit accelerator (flytekit.extras.accelerators)",
        )
        if self.secret_requests is not None:
            if isinstance(self.secret_requests, (str, Secret)) or not isinstance(self.secret_requests, (list, tuple)):
                _fail("secret_requests", self.secret_requests, "must be a list of flytekit.Secret", TypeError)
            for s in self.secret_requests:
                if not isinstance(s, Secret):
                    _fail(
                        "secret_requests",
                        self.secret_requests,
                        f"must be a list of flytekit.Secret; {s!r} is not",
                        TypeError,
                    )
            object.__setattr__(self, "secret_requests", tuple(self.secret_requests))
        _check_type("pod_template", self.pod_template, (PodTemplate,), "must be a flytekit.PodTemplate")
        _check_type("interruptible", self.interruptible, (bool,), "must be a bool")

    # ---- identity ----
    @property
    def resolved_ttl_seconds(self) -> int:
        return DEFAULT_TTL_SECONDS if self.ttl_seconds is None else self.ttl_seconds

    def resolved_image(self, image_config=None) -> str:
        """The image name replicas run, as flytekit would register it."""
        from flytekit.configuration import ImageConfig
        from flytekit.core.python_auto_container import get_registerable_container_image

        image = self.container_image
        if image is None:  # an image set only on the pod template's primary container is the one pods run
            primary = primary_container(self.pod_template)
            image = (primary or {}).get("image")
        return get_registerable_container_image(image, image_config or ImageConfig.auto_default_image())

    def key(self, image_config=None) -> str:
        """A stable hash over everything that shapes a replica: two tasks of one environment share it."""
        if image_config is None:
            cached = self.__dict__.get("_key")
            if cached is None:
                cached = self._compute_key(None)
                object.__setattr__(self, "_key", cached)
            return cached
        return self._compute_key(image_config)

    def _compute_key(self, image_config) -> str:
        shape = {
            "name": self.name,
            "image": self.resolved_image(image_config),
            "requests": _resources(self.requests),
            "limits": _resources(self.limits),
            "accelerator": _accelerator(self.accelerator),
            "environment": dict(sorted((self.environment or {}).items())),
            "secrets": [
                [s.group, s.key, s.group_version, int(s.mount_requirement.value), s.env_var]
                for s in self.secret_requests or ()
            ],
            "pod_template": pod_template_shape(self.pod_template),
            "interruptible": self.interruptible,
            "replica_count": self.replica_count,
            "ttl_seconds": self.resolved_ttl_seconds,
        }
        return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:15]

    def replica_env(self) -> Dict[str, str]:
        """Env vars every replica gets: the pod template's primary-container env, then `environment` on top."""
        env = {}
        container = primary_container(self.pod_template)
        for var in (container or {}).get("env") or []:
            if var.get("value") is not None:
                env[var["name"]] = var["value"]
        env.update(self.environment or {})
        return env

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorEnvironment) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    # ---- decorator ----
    def task(self, _task_function: Optional[Callable] = None, *, sync: bool = False, **kwargs: Any):
        """Declares an actor task in this environment; takes every per-task argument flytekit's @task takes.

        `sync=True` puts the task on propeller's synchronous connector path (task type "actor_sync", see
        ActorTask.on_sync_path): for short tasks on warm pools."""
        if not isinstance(sync, bool):
            raise TypeError(f"@{self.name}.task got sync={sync!r}: sync must be a bool")
        for arg in kwargs:
            if arg in ENVIRONMENT_OWNED_TASK_ARGS:
                raise TypeError(
                    f"@{self.name}.task got {arg}={kwargs[arg]!r}: {arg} shapes the replica, so it is set on the "
                    f"ActorEnvironment ({ENVIRONMENT_OWNED_TASK_ARGS[arg]}), not per actor task"
                )

        def wrapper(fn: Callable):
            if not callable(fn):
                raise TypeError(f"@{self.name}.task decorates a function, got {fn!r}")
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                raise TypeError(
                    f"actor task {fn.__qualname__!r} is an async def: "
                    "async actor tasks are not supported; use a plain def"
                )
            from flytekit import task

            actor_task = task(
                fn,
                task_config=self,
                container_image=self.container_image,
                requests=self.requests,
                limits=self.limits,
                environment=dict(self.environment) if self.environment else None,
                secret_requests=list(self.secret_requests) if self.secret_requests else None,
                pod_template=self.pod_template,
                accelerator=self.accelerator,
                interruptible=self.interruptible,
                **kwargs,
            )
            return actor_task.on_sync_path() if sync else actor_task

        return wrapper(_task_function) if _task_function is not None else wrapper


def _resources(r: Optional[Resources]) -> Optional[dict]:
    return None if r is None else {k: str(v) for k, v in dataclasses.asdict(r).items() if v is not None}


def _accelerator(a: Optional[BaseAccelerator]) -> Optional[str]:
    if a is None:
        return None
    from google.protobuf import json_format

    return json_format.MessageToJson(a.to_flyte_idl(), sort_keys=True)


def _sanitize(obj: Any) -> Any:
    """Kubernetes model objects to plain JSON (camelCase keys), with an ImageSpec as its image name."""
    if isinstance(obj, ImageSpec):
        return obj.image_name()
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if hasattr(obj, "openapi_types") and hasattr(obj, "attribute_map"):
        return {
            obj.attribute_map[a]: _sanitize(getattr(obj, a)) for a in obj.openapi_types if getattr(obj, a) is not None
        }
    return obj


def pod_template_shape(pt: Optional[PodTemplate]) -> Optional[dict]:
    """The pod template as plain JSON, container args removed (they differ per task, not per replica)."""
    if pt is None:
        return None
    spec = _sanitize(pt.pod_spec) or {}
    spec = json.loads(json.dumps(spec, default=str))
    for c in spec.get("containers") or []:
        c.pop("args", None)
        c.pop("command", None)
    return {
        "primary_container_name": pt.primary_container_name,
        "pod_spec": spec,
        "labels": pt.labels or {},
        "annotations": pt.annotations or {},
    }


def primary_container(pt: Optional[PodTemplate]) -> Optional[dict]:
    shape = pod_template_shape(pt)
    if shape is None:
        return None
    for c in shape["pod_spec"].get("containers") or []:
        if c.get("name") == shape["primary_container_name"]:
            return c
    return None

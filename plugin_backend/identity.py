"""An actor execution's identity: its id (one per task execution attempt) and the FLYTE_INTERNAL_* env a pod gets.

The connector is not given the env propeller would put on a pod, so it derives it from TaskExecutionMetadata.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from typing import Dict, Optional

from flytekit.models.task import TaskExecutionMetadata

from flytekitplugins_actor.replica.identity import identity_env as _env

LOCAL_NAMESPACE = "local"
NAMESPACE_ENV = "FLYTE_ACTOR_K8S_NAMESPACE"


def default_namespace() -> str:
    """The namespace of an execution that carries none: FLYTE_ACTOR_K8S_NAMESPACE when set, else 'local'."""
    return os.environ.get(NAMESPACE_ENV) or LOCAL_NAMESPACE


DEFAULT_SERVICE_ACCOUNT = "default"


@dataclass(frozen=True)
class ExecutionIdentity:
    execution_id: str
    namespace: str
    service_account: str
    env: Dict[str, str]


def _slug(s: str, n: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:n] or "x"


def identity_of(metadata: Optional[TaskExecutionMetadata], task_name: str) -> ExecutionIdentity:
    """Same task execution id and retry attempt -> same execution id, so a repeated CreateTask finds its execution."""
    tei = metadata.task_execution_id if metadata is not None else None
    if tei is None or tei.node_execution_id is None or not tei.node_execution_id.execution_id.name:
        # Local runs call create without metadata: every call is a new execution.
        local_id = uuid.uuid4().hex
        env = _env("local", "local", f"local-{local_id[:12]}", "local", "local", task_name, "local", 0)
        return ExecutionIdentity(f"local-{local_id}", default_namespace(), DEFAULT_SERVICE_ACCOUNT, env)
    wf, node, task = tei.node_execution_id.execution_id, tei.node_execution_id, tei.task_id
    retry = int(tei.retry_attempt or 0)
    full = ":".join(
        map(
            str,
            [wf.project, wf.domain, wf.name, node.node_id, task.project, task.domain, task.name, task.version, retry],
        )
    )
    digest = hashlib.sha256(full.encode()).hexdigest()[:16]
    execution_id = f"{_slug(wf.name, 24)}-{_slug(node.node_id, 24)}-a{retry}-{digest}"
    env = _env(wf.project, wf.domain, wf.name, task.project, task.domain, task.name, task.version, retry)
    env.update({str(k): str(v) for k, v in (metadata.environment_variables or {}).items()})
    return ExecutionIdentity(
        execution_id,
        metadata.namespace or default_namespace(),
        metadata.k8s_service_account or DEFAULT_SERVICE_ACCOUNT,
        env,
    )

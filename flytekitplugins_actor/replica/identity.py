"""The identity env propeller gives a task pod (FLYTE_INTERNAL_*): a replica sets it for each execution it runs."""

from __future__ import annotations

from typing import Dict


def identity_env(
    project: str,
    domain: str,
    name: str,
    task_project: str,
    task_domain: str,
    task_name: str,
    task_version: str,
    attempt: int = 0,
) -> Dict[str, str]:
    """The FLYTE_INTERNAL_* identity env of one execution, as propeller sets it on a task's pod."""
    return {
        "FLYTE_INTERNAL_EXECUTION_PROJECT": project,
        "FLYTE_INTERNAL_EXECUTION_DOMAIN": domain,
        "FLYTE_INTERNAL_EXECUTION_ID": name,
        "FLYTE_INTERNAL_EXECUTION_WORKFLOW": "",
        "FLYTE_INTERNAL_EXECUTION_LAUNCHPLAN": "",
        "FLYTE_INTERNAL_TASK_PROJECT": task_project,
        "FLYTE_INTERNAL_TASK_DOMAIN": task_domain,
        "FLYTE_INTERNAL_TASK_NAME": task_name,
        "FLYTE_INTERNAL_TASK_VERSION": task_version,
        "FLYTE_ATTEMPT_NUMBER": str(attempt),
    }

"""Named request errors of the actor connector, and how they reach propeller as gRPC status codes."""

from __future__ import annotations

from http import HTTPStatus

from flytekitplugins_actor.constants import ACTOR_MAP_TASK_TYPE, ACTOR_SYNC_TASK_TYPE, ACTOR_TASK_TYPE

ACTOR_TASK_TYPES = (ACTOR_TASK_TYPE, ACTOR_SYNC_TASK_TYPE, ACTOR_MAP_TASK_TYPE)
SUPPORTED_TYPE_VERSION = 0
"""The task type version of `actor`, `actor_sync` and `actor_map` this connector serves."""


class InvalidActorRequest(ValueError):
    """A request the connector cannot serve as sent; propeller gets INVALID_ARGUMENT with this message, no traceback."""


class InvalidTaskTemplate(InvalidActorRequest):
    """The task template is not an actor task this connector serves: missing or malformed custom, unknown type
    version, neither a container nor a k8s_pod, or args that are not a rendered pyflyte-execute command."""


class InvalidResourceMeta(InvalidActorRequest):
    """The resource meta propeller sent back is not one this connector wrote."""


def install_status_mapping() -> None:
    """Teaches flytekit's connector service to answer InvalidActorRequest with INVALID_ARGUMENT.

    flytekit 1.16 maps every connector exception but FlyteConnectorNotFound to INTERNAL with a traceback
    (`connector_service._handle_exception`); this wraps that function for our own exception type only.
    """
    try:
        import grpc
        from flytekit.extend.backend import connector_service
    except ImportError:  # the connector extra is not installed: nothing serves gRPC here
        return
    original = connector_service._handle_exception
    if getattr(original, "_actor_status_mapping", False):
        return

    from flytekit.exceptions.system import FlyteConnectorNotFound

    def _handle_exception(e, context, task_type, operation):
        if isinstance(e, FlyteConnectorNotFound) and task_type in (
            ACTOR_TASK_TYPE,
            ACTOR_SYNC_TASK_TYPE,
            ACTOR_MAP_TASK_TYPE,
        ):
            # The registry is keyed by (type, version): a template of another version never reaches our create.
            version = str(e).rsplit("_v", 1)[-1].rstrip(".") if "_v" in str(e) else "?"
            e = InvalidTaskTemplate(
                f"task type {task_type!r} version {version} is unknown; "
                f"this connector serves version {SUPPORTED_TYPE_VERSION}"
            )
        if isinstance(e, InvalidActorRequest):
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(f"cannot {operation} {task_type} task: {e}")
            connector_service.request_failure_count.labels(
                task_type=task_type, operation=operation, error_code=HTTPStatus.BAD_REQUEST
            ).inc()
            return
        original(e, context, task_type, operation)

    _handle_exception._actor_status_mapping = True  # type: ignore[attr-defined]
    connector_service._handle_exception = _handle_exception

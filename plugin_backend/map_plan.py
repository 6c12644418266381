"""The connector's side of an `actor_map`: the shared split/gather (flytekitplugins_actor.map_plan) and the
per-item container args. Item i's output prefix is `<outputPrefix>/items/<i>`.
"""

from __future__ import annotations

from typing import List, Sequence, Union

from flytekit.models.literals import LiteralMap

from flytekitplugins_actor import map_plan as _shared
from flytekitplugins_actor.map_plan import ProtoMap, none_literal  # noqa: F401  (re-exported)
from plugin_backend.errors import InvalidActorRequest
from plugin_backend.template import MapSpec


class MapPlan(_shared.MapPlan):
    """The SDK's MapPlan (one split/gather for local runs and the connector), refusing bad inputs as a request error."""

    def __init__(self, inputs: Union[LiteralMap, ProtoMap, None], spec: MapSpec):
        self.spec = spec
        try:
            super().__init__(inputs, spec.mapped_inputs, spec.bound_inputs)
        except _shared.MapInputError as e:
            raise InvalidActorRequest(str(e)) from None


def item_args(args: Sequence[str], inputs_path: str, output_prefix: str, index: int) -> List[str]:
    """The subtask's rendered container args with --inputs and --output-prefix (and checkpoints) made per item."""
    per_item = {
        "--inputs": lambda _: inputs_path,
        "--output-prefix": lambda _: output_prefix,
        "--checkpoint-path": lambda v: f"{v.rstrip('/')}/{index}" if v and v != '""' else v,
        "--prev-checkpoint": lambda v: f"{v.rstrip('/')}/{index}" if v and v != '""' else v,
    }
    out = list(args)
    i = 0
    while i < len(out):
        a = out[i]
        if a in per_item and i + 1 < len(out):
            out[i + 1] = per_item[a](out[i + 1])
            i += 2
            continue
        key, eq, value = a.partition("=")
        if eq and key in per_item:
            out[i] = f"{key}={per_item[key](value)}"
        i += 1
    return out

"""Splits an `actor_map` task's inputs into per-item inputs and gathers per-item outputs back into lists.

Item i gets the i-th element of every mapped input and every bound input as is; its output prefix is
`<outputPrefix>/items/<i>`. Gathered outputs hold one list per output name, in input order; a failed item
contributes a none literal when `min_success_ratio` still holds.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

from flyteidl.core import literals_pb2
from flytekit.models.literals import LiteralMap

from plugin_backend.errors import InvalidActorRequest
from plugin_backend.template import MapSpec

ProtoMap = literals_pb2.LiteralMap


def _proto(m: Union[LiteralMap, ProtoMap, None]) -> ProtoMap:
    if m is None:
        return ProtoMap()
    return m if isinstance(m, ProtoMap) else m.to_flyte_idl()


def none_literal() -> literals_pb2.Literal:
    return literals_pb2.Literal(scalar=literals_pb2.Scalar(none_type=literals_pb2.Void()))


class MapPlan:
    """The split of one map task's inputs. Works on flyteidl LiteralMaps (flytekit's models are accepted too)."""

    def __init__(self, inputs: Union[LiteralMap, ProtoMap, None], spec: MapSpec):
        self.spec = spec
        self._inputs = _proto(inputs)
        lengths: Dict[str, int] = {}
        self._lists: Dict[str, Sequence[literals_pb2.Literal]] = {}
        for name in spec.mapped_inputs:
            if name not in self._inputs.literals:
                raise InvalidActorRequest(f"mapped input {name!r} has no value")
            lit = self._inputs.literals[name]
            if not lit.HasField("collection"):
                raise InvalidActorRequest(f"mapped input {name!r} is not a list literal")
            self._lists[name] = lit.collection.literals
            lengths[name] = len(lit.collection.literals)
        if len(set(lengths.values())) > 1:
            raise InvalidActorRequest(f"mapped inputs have different lengths: {lengths}")
        self.size = next(iter(lengths.values()), 0)
        self._bound = {n: self._inputs.literals[n] for n in spec.bound_inputs if n in self._inputs.literals}

    def item_inputs(self, i: int) -> ProtoMap:
        out = ProtoMap()
        for name, items in self._lists.items():
            out.literals[name].CopyFrom(items[i])
        for name, lit in self._bound.items():
            out.literals[name].CopyFrom(lit)
        return out

    @staticmethod
    def gather(output_names: Sequence[str], results: List[Optional[ProtoMap]]) -> ProtoMap:
        """One list per output name; results[i] is item i's outputs, or None for a failed item."""
        out = ProtoMap()
        for name in output_names:
            coll = out.literals[name].collection
            coll.SetInParent()  # an empty list is still a collection literal
            for r in results:
                if r is None or name not in r.literals:
                    coll.literals.append(none_literal())
                else:
                    coll.literals.append(r.literals[name])
        return out


def item_args(args: Sequence[str], inputs_path: str, output_prefix: str, index: int) -> List[str]:
    """The subtask's rendered container args with --inputs and --output-prefix (and checkpoints) made per item."""
    per_item = {"--inputs": lambda _: inputs_path, "--output-prefix": lambda _: output_prefix,
                "--checkpoint-path": lambda v: f"{v.rstrip('/')}/{index}" if v and v != '""' else v,
                "--prev-checkpoint": lambda v: f"{v.rstrip('/')}/{index}" if v and v != '""' else v}
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

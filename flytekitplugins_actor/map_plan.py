"""Splits an actor map's inputs into per-item inputs and gathers per-item outputs back into lists.

One implementation for both places a map runs: the local driver and the connector (the rest of the map's model,
window, tally and decision, is in `map_model`). Item i gets the i-th
element of every mapped input and every bound input as is; gathered outputs hold one list per output name,
in input order, with a none literal for a failed item (allowed while `min_success_ratio` holds).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

from flyteidl.core import literals_pb2
from flytekit.models.literals import LiteralMap

from flytekitplugins_actor.map_model import MapSpec

ProtoMap = literals_pb2.LiteralMap


class MapInputError(ValueError):
    """The map's inputs cannot be split: a mapped input is missing or not a list, or the lists differ in length."""


def _proto(m: Union[LiteralMap, ProtoMap, None]) -> ProtoMap:
    if m is None:
        return ProtoMap()
    return m if isinstance(m, ProtoMap) else m.to_flyte_idl()


def none_literal() -> literals_pb2.Literal:
    """The value of a failed item in a gathered list."""
    return literals_pb2.Literal(scalar=literals_pb2.Scalar(none_type=literals_pb2.Void()))


class MapPlan:
    """The split of one map's inputs. Works on flyteidl LiteralMaps (flytekit's models are accepted too)."""

    def __init__(self, inputs: Union[LiteralMap, ProtoMap, None], spec: MapSpec):
        self.spec = spec
        self._inputs = _proto(inputs)
        lengths: Dict[str, int] = {}
        self._lists: Dict[str, Sequence[literals_pb2.Literal]] = {}
        for name in spec.mapped_inputs:
            if name not in self._inputs.literals:
                raise MapInputError(f"mapped input {name!r} has no value")
            lit = self._inputs.literals[name]
            if not lit.HasField("collection"):
                raise MapInputError(f"mapped input {name!r} is not a list literal")
            self._lists[name] = lit.collection.literals
            lengths[name] = len(lit.collection.literals)
        if len(set(lengths.values())) > 1:
            raise MapInputError(f"mapped inputs have different lengths: {lengths}")
        self.size = next(iter(lengths.values()), 0)
        self._bound = {n: self._inputs.literals[n] for n in spec.bound_inputs if n in self._inputs.literals}

    def item_inputs(self, i: int) -> ProtoMap:
        """Item i's inputs: the i-th element of every mapped list, every bound input as is."""
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

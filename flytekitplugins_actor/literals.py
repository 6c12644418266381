"""Literals a local driver only passes along: kept as their protobuf until something looks inside.

A local run's driver reads a task's outputs.pb and, in a workflow, usually hands the values straight to the next
task's inputs.pb. flytekit's models would turn a 1M-item list into 1M Python objects and back for that; a
`ProtoLiteral` keeps the parsed protobuf and becomes a full model only when one of its fields is read.
"""

from __future__ import annotations

from typing import Any

from flyteidl.core import literals_pb2
from flytekit.models.literals import Literal, LiteralMap

_FIELDS = ("_scalar", "_collection", "_map", "_hash", "_metadata", "_offloaded_metadata")


class ProtoLiteral(Literal):
    """A flytekit `Literal` backed by its protobuf; its fields are built on first access."""

    def __init__(self, pb: literals_pb2.Literal) -> None:  # not super().__init__: that would build the fields now
        object.__setattr__(self, "_pb", pb)

    def _materialize(self) -> None:
        pb = self.__dict__.pop("_pb", None)
        if pb is not None:
            self.__dict__.update(Literal.from_flyte_idl(pb).__dict__)

    def __getattr__(self, name: str) -> Any:  # only called for attributes not set yet: the lazy fields
        if name in _FIELDS and "_pb" in self.__dict__:
            self._materialize()
            return self.__dict__[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELDS:
            self._materialize()
        object.__setattr__(self, name, value)

    def to_flyte_idl(self) -> literals_pb2.Literal:
        pb = self.__dict__.get("_pb")
        return pb if pb is not None else super().to_flyte_idl()


def literal_map_from_pb(pb: literals_pb2.LiteralMap) -> LiteralMap:
    """A LiteralMap whose values stay protobuf until used (see ProtoLiteral)."""
    return LiteralMap(literals={name: ProtoLiteral(lit) for name, lit in pb.literals.items()})

"""ProtoLiteral: a driver's literal kept as protobuf until read, and then the same as flytekit's model."""

from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.models.literals import Literal, LiteralMap

from flytekitplugins_actor.literals import ProtoLiteral, literal_map_from_pb


def _literal(value, t):
    return TypeEngine.to_literal(FlyteContextManager.current_context(), value, t, TypeEngine.to_literal_type(t))


def test_passed_along_untouched_it_is_its_protobuf():
    pb = _literal([1.0, 2.5], list[float]).to_flyte_idl()
    lm = literal_map_from_pb(LiteralMap({"xs": Literal.from_flyte_idl(pb)}).to_flyte_idl())
    assert lm.literals["xs"].to_flyte_idl() == pb
    assert "_scalar" not in lm.literals["xs"].__dict__  # nothing built
    assert lm.to_flyte_idl().literals["xs"] == pb


def test_read_it_behaves_as_flytekits_literal():
    model = _literal({"a": [1, 2]}, dict[str, list[int]])
    lazy = ProtoLiteral(model.to_flyte_idl())
    assert lazy == model and lazy.map == model.map and lazy.scalar is None and lazy.value == model.value
    ctx = FlyteContextManager.current_context()
    assert TypeEngine.to_python_value(ctx, lazy, dict[str, list[int]]) == {"a": [1, 2]}


def test_fields_set_before_reading_are_kept():
    lazy = ProtoLiteral(_literal(3, int).to_flyte_idl())
    lazy.hash = "h1"
    lazy.set_metadata({"k": "v"})
    assert lazy.hash == "h1" and lazy.metadata == {"k": "v"} and lazy.scalar.primitive.integer == 3
    pb = lazy.to_flyte_idl()
    assert pb.hash == "h1" and dict(pb.metadata) == {"k": "v"} and pb.scalar.primitive.integer == 3


def test_frugal_serialization_builds_the_same_messages():
    import typing

    from flytekit.models.literals import LiteralCollection

    from flytekitplugins_actor.replica.sandbox import _collection_to_flyte_idl, _map_to_flyte_idl

    t = typing.Dict[str, typing.List[typing.Optional[float]]]
    model = _literal({"a": [1.0, None, 2.5], "b": [], "c": [3.0]}, t)
    assert _map_to_flyte_idl(model.map) == model.map.to_flyte_idl()
    for name, lit in model.map.literals.items():
        assert _collection_to_flyte_idl(lit.collection) == lit.collection.to_flyte_idl(), name
    assert _collection_to_flyte_idl(LiteralCollection([])) == LiteralCollection([]).to_flyte_idl()

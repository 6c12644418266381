"""The one `pyflyte-execute` command model and the one execution-error value: parse, build, re-path, round trips."""

import pytest

from flytekitplugins_actor.replica.command import ExecutionCommand
from flytekitplugins_actor.replica.error import (
    ErrorOrigin,
    ExecutionError,
    read_error_document,
    write_error_document,
)

FAST = ["pyflyte-fast-execute", "--additional-distribution", "s3://d.tgz", "--dest-dir", ".", "--"]
EXECUTE = [
    "pyflyte-execute",
    "--inputs",
    "s3://x/inputs.pb",
    "--output-prefix",
    "s3://x",
    "--raw-output-data-prefix",
    "s3://raw",
    "--checkpoint-path",
    "s3://ck",
    "--prev-checkpoint",
    '""',
    "--resolver",
    "r",
    "--",
    "task-module",
    "m",
    "task-name",
    "t",
]


@pytest.mark.parametrize("args", [EXECUTE, FAST + EXECUTE], ids=["plain", "fast"])
def test_flytekit_rendered_args_round_trip_exactly(args):
    command = ExecutionCommand.parse(args)
    assert command.to_args() == args
    assert ExecutionCommand.parse(command.to_args()) == command


def test_fast_execute_options_are_read_from_either_form():
    fast = ExecutionCommand.parse(FAST + EXECUTE)
    assert (fast.distribution, fast.dest_dir, fast.fast) == ("s3://d.tgz", ".", True)
    inner = EXECUTE[:11] + ["--dynamic-addl-distro", "s3://d.tgz", "--dynamic-dest-dir", "."] + EXECUTE[11:]
    dynamic = ExecutionCommand.parse(inner)
    assert (dynamic.distribution, dynamic.dest_dir, dynamic.fast) == ("s3://d.tgz", ".", False)
    assert dynamic.to_args() == inner


def test_with_paths_item_rewrites_inputs_outputs_and_set_checkpoints_only():
    command = ExecutionCommand.parse(FAST + EXECUTE)
    item = command.with_paths(inputs="s3://x/items/4/inputs.pb", output_prefix="s3://x/items/4", item=4)
    assert (item.inputs, item.output_prefix) == ("s3://x/items/4/inputs.pb", "s3://x/items/4")
    assert item.checkpoint_path == "s3://ck/4" and item.prev_checkpoint == '""'  # unset stays unset
    assert item.raw_output_data_prefix == "s3://raw" and item.resolver_args == command.resolver_args
    assert item.to_args()[:6] == FAST


def test_with_paths_never_touches_resolver_args_that_look_like_options():
    args = EXECUTE[:-4] + ["task-module", "m", "--inputs", "keep-me"]
    item = ExecutionCommand.parse(args).with_paths(inputs="new", output_prefix="out", item=1)
    assert item.resolver_args == ("task-module", "m", "--inputs", "keep-me")
    assert item.to_args()[item.to_args().index("--inputs") + 1] == "new"


def test_build_renders_what_parse_reads():
    command = ExecutionCommand.build(
        inputs="/i.pb", output_prefix="/o", resolver="r", resolver_args=["a", "b"], raw_output_data_prefix="/raw"
    )
    args = command.to_args()
    expected = ["pyflyte-execute", "--inputs", "/i.pb", "--output-prefix", "/o", "--raw-output-data-prefix", "/raw"]
    assert args == [*expected, "--resolver", "r", "--", "a", "b"]
    assert ExecutionCommand.parse(args) == command


@pytest.mark.parametrize(
    "args, message",
    [
        (["python", "x.py"], "must run 'pyflyte-execute'"),
        (["pyflyte-execute", "--inputs", "i", "--resolver", "r"], "no --output-prefix"),
        (["pyflyte-execute", "--inputs", "i", "--bogus", "y"], "unknown option '--bogus'"),
        (["pyflyte-execute", "--test", "--inputs", "i"], "--test"),
        (["pyflyte-execute", "--inputs"], "needs a value"),
    ],
)
def test_malformed_args_are_refused_naming_what_is_wrong(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ExecutionCommand.parse(args)


def test_with_paths_refuses_a_bad_item_index():
    with pytest.raises(ValueError, match="item must be"):
        ExecutionCommand.parse(EXECUTE).with_paths(item=-1)


def test_execution_error_wire_and_error_document_round_trip(tmp_path):
    error = ExecutionError("MyCode", "it broke", ErrorOrigin.USER, False)
    assert ExecutionError.from_wire(error.to_wire()) == error
    write_error_document(str(tmp_path), error)
    assert read_error_document(str(tmp_path)) == error
    system = ExecutionError.system("SYSTEM", "disk")
    write_error_document(str(tmp_path), system)
    assert read_error_document(str(tmp_path)) == system and system.recoverable
    assert read_error_document(str(tmp_path / "none")) is None


@pytest.mark.parametrize(
    "wire, field",
    [
        ({"code": "C", "message": "m", "origin": "NOBODY", "recoverable": False}, "origin"),
        ({"code": "C", "message": "m", "origin": "USER", "recoverable": "yes"}, "recoverable"),
        ({"message": "m", "origin": "USER", "recoverable": False}, "code"),
        ("boom", "object"),
    ],
)
def test_a_malformed_wire_error_is_refused_naming_the_field(wire, field):
    with pytest.raises(ValueError, match=field):
        ExecutionError.from_wire(wire)

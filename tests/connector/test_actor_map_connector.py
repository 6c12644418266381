"""End to end: `flytekitplugins_actor.map` tasks (task type actor_map) fanned out by the connector over the pool."""

import functools
import os
from typing import Optional

import actor_map_tasks as mt
import actor_tasks as t
import pytest
from flytekit.models.task import TaskTemplate
from harness import PHASE, Attempt, literal_map, output_value
from waiting import wait_until

from flytekitplugins_actor.actor_map import map as actor_map
from flytekitplugins_actor.replica.protocol import INLINE_LIMIT_BYTES
from plugin_backend.errors import InvalidTaskTemplate
from plugin_backend.template import parse_template

pytestmark = pytest.mark.timeout(120)


def _run(propeller, base, task, **inputs):
    a = Attempt(base, task, literal_map(task, **inputs))
    meta = propeller.create(a)
    return a, meta, propeller.wait(meta, task_type="actor_map")


def test_map_fans_out_over_two_replicas_in_order(propeller, base):
    gate, counter = os.path.join(base, "gate"), os.path.join(base, "count")
    blocking = actor_map(functools.partial(t.square, counter=counter, gate=gate))
    warm = Attempt(base, blocking, literal_map(blocking, x=[100, 101]))
    warm_meta = propeller.create(warm)
    wait_until(
        lambda: os.path.exists(counter) and len(open(counter).read().splitlines()) == 2,
        60,
        "both items running at once, one per replica",
    )
    open(gate, "w").close()
    assert propeller.wait(warm_meta, task_type="actor_map").phase == PHASE.SUCCEEDED
    m = actor_map(t.where)
    a, meta, r = _run(propeller, base, m, x=list(range(12)))
    assert r.phase == PHASE.SUCCEEDED, r.message
    values = output_value(a.outputs(), "o0", list[str])
    assert [int(v.split(":")[0]) for v in values] == list(range(12))
    assert len({v.split(":")[1] for v in values}) == 2, values
    assert not r.outputs.literals  # by reference: propeller reads outputs.pb (issue 8: an answer has a 4 MiB limit)
    assert all(os.path.exists(os.path.join(a.dir, "items", str(i), "outputs.pb")) for i in range(12))


def test_map_item_inputs_travel_with_the_request_or_through_storage_when_big(propeller, base):
    big = "b" * (INLINE_LIMIT_BYTES + 1)
    m = actor_map(t.echo)
    a, meta, r = _run(propeller, base, m, s=["small", big])
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", list[str]) == ["small", big]
    item_inputs = [os.path.join(a.dir, "items", str(i), "inputs.pb") for i in range(2)]
    assert [os.path.exists(p) for p in item_inputs] == [False, True]


def test_map_with_bound_inputs_and_concurrency(propeller, base):
    counter = os.path.join(base, "count")
    m = actor_map(functools.partial(t.square, counter=counter, gate=""), concurrency=1)
    a, meta, r = _run(propeller, base, m, x=[3, 1, 2])
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", list[int]) == [9, 1, 4]
    assert [line.split()[1] for line in open(counter).read().splitlines()] == ["3", "1", "2"]  # one at a time, in order


def test_min_success_ratio_fills_failed_items_with_none(propeller, base):
    m = actor_map(functools.partial(t.square, counter="", gate=""), min_success_ratio=0.5)
    a, meta, r = _run(propeller, base, m, x=[1, -2, 3, 4])
    assert r.phase == PHASE.SUCCEEDED, r.message
    lits = a.outputs().literals["o0"].collection.literals
    assert lits[1].scalar.HasField("none_type")
    assert [lit.scalar.primitive.integer for i, lit in enumerate(lits) if i != 1] == [1, 9, 16]


def test_map_fails_when_min_success_ratio_cannot_hold(propeller, base):
    m = actor_map(functools.partial(t.square, counter="", gate=""))
    a, meta, r = _run(propeller, base, m, x=[1, -5, 3])
    assert r.phase == PHASE.FAILED
    assert "Item 1" in r.message and "negative input -5" in r.message
    assert os.path.exists(os.path.join(a.dir, "error.pb"))


def test_empty_map_succeeds_with_empty_lists(propeller, base):
    m = actor_map(t.where)
    a, meta, r = _run(propeller, base, m, x=[])
    assert r.phase == PHASE.SUCCEEDED
    assert output_value(a.outputs(), "o0", list[str]) == []


def test_delete_aborts_a_running_map(propeller, base):
    gate, counter = os.path.join(base, "gate"), os.path.join(base, "count")
    m = actor_map(functools.partial(t.square, counter=counter, gate=gate), concurrency=2)
    a = Attempt(base, m, literal_map(m, x=[100, 101, 102, 103]))
    meta = propeller.create(a)
    wait_until(
        lambda: os.path.exists(counter) and len(open(counter).read().splitlines()) == 2,
        60,
        "two items running (concurrency=2)",
    )
    assert propeller.get(meta, task_type="actor_map").phase == PHASE.RUNNING
    propeller.delete(meta, task_type="actor_map")
    propeller.delete(meta, task_type="actor_map")
    assert propeller.get(meta, task_type="actor_map").phase == PHASE.ABORTED
    b, _, r = _run(propeller, base, actor_map(t.where), x=[1, 2])  # the pool serves the next map
    assert r.phase == PHASE.SUCCEEDED
    assert sorted(line.split()[1] for line in open(counter).read().splitlines()) == ["100", "101"]  # 102, 103 never ran


def test_an_item_raising_keyboard_interrupt_fails_once_and_is_never_sent_again(propeller, base):
    # before: the replica answered its stored "cancelled" and the connector re-sent the item for ever (RUNNING)
    counter = os.path.join(base, "count")
    m = actor_map(functools.partial(mt.interrupt_on, bad=1, counter=counter))
    a, meta, r = _run(propeller, base, m, x=[0, 1, 2])
    assert r.phase == PHASE.FAILED, r.message
    assert "Item 1 failed" in r.message and "KeyboardInterrupt" in r.message
    assert [line.split()[1] for line in open(counter).read().splitlines()].count("1") == 1  # ran once, not re-sent


def test_an_item_calling_sys_exit_is_one_failed_item(propeller, base):
    m = actor_map(functools.partial(mt.exit_on, bad=2), min_success_ratio=0.5)
    a, meta, r = _run(propeller, base, m, x=[1, 2, 3])
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", list[Optional[int]]) == [10, None, 30]


def test_concurrency_zero_is_refused_as_by_the_sdk(propeller, base):
    m = actor_map(t.where, concurrency=2)
    a = Attempt(base, m, literal_map(m, x=[1]))
    tt = TaskTemplate.from_flyte_idl(a.template)
    tt.custom["spec"]["map"]["concurrency"] = 0  # what the SDK refuses at definition
    with pytest.raises(InvalidTaskTemplate, match=r"concurrency=0 is invalid: must be None"):
        parse_template(tt, "actor_map")
    with pytest.raises(ValueError, match=r"concurrency=0 is invalid: must be None"):
        actor_map(t.where, concurrency=0)

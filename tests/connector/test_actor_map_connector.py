"""End to end: `flytekitplugins_actor.map` tasks (task type actor_map) fanned out by the connector over the pool."""

import functools
import os

import actor_tasks as t
import pytest
from harness import PHASE, Attempt, literal_map, output_value, wait_for

from flytekitplugins_actor.actor_map import map as actor_map

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
    wait_for(
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
    wait_for(
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

"""The contract details a real propeller 1.16.8 exposes, driven over gRPC against a real `pyflyte serve connector`:
templates in Union SDK's exact shape (unset fields as null), map outputs by reference, and request limits."""

import os

import actor_tasks as t
import pytest
from harness import PHASE, Attempt, literal_map, output_value, wait_for
from test_actor_connector import _alive

pytestmark = pytest.mark.timeout(120)


def _union_shaped(task, env_name: str, version: str, **spec):
    """The template of `task` with `custom` exactly as Union's SDK writes it: unset spec fields are null."""
    from harness import serialize

    tt = serialize(task)
    image = tt.container.image
    tt.ClearField("custom")
    tt.custom.update(
        {
            "name": env_name,
            "version": version,
            "type": "actor",
            "spec": {
                "container_image": image,
                "replica_count": 1,
                "ttl_seconds": None,
                "parallelism": 1,
                "backlog_length": None,
                **spec,
            },
        }
    )
    return tt


def test_union_shaped_template_with_nulls_runs_and_idle_pools_are_still_reaped(propeller, base):
    tt = _union_shaped(t.pid, "union-env", "0123456789abcde")
    assert tt.custom["spec"]["ttl_seconds"] is None and tt.custom["spec"]["backlog_length"] is None
    a = Attempt(base, t.pid, literal_map(t.pid), template=tt)
    r = propeller.wait(propeller.create(a))
    assert r.phase == PHASE.SUCCEEDED, r.message
    union_replica = output_value(a.outputs(), "o0", int)
    again = Attempt(base, t.pid, literal_map(t.pid), template=tt)  # null TTL means the default: the pool stays warm
    assert propeller.wait(propeller.create(again)).phase == PHASE.SUCCEEDED
    assert output_value(again.outputs(), "o0", int) == union_replica
    # the pool reaper still runs after serving the null-TTL environment: a short-TTL pool is torn down
    short = Attempt(base, t.pid_short_ttl, literal_map(t.pid_short_ttl))
    assert propeller.wait(propeller.create(short)).phase == PHASE.SUCCEEDED
    short_replica = output_value(short.outputs(), "o0", int)
    wait_for(lambda: not _alive(short_replica), 15, "the ttl_seconds=1 pool to be torn down by the reaper")
    assert _alive(union_replica)


def test_union_shaped_template_with_missing_spec_fields_runs(propeller, base):
    tt = _union_shaped(t.add, "union-env-min", "fedcba987654321")
    for k in ("replica_count", "ttl_seconds", "parallelism", "backlog_length"):
        del tt.custom["spec"][k]
    a = Attempt(base, t.add, literal_map(t.add, a=20, b=22), template=tt)
    r = propeller.wait(propeller.create(a))
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", int) == 42

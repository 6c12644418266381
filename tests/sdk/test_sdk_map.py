"""flytekitplugins_actor.map run locally: fanned out across the environment's replicas, results in input order."""

import contextlib
import functools
import os
import signal
import subprocess

import flytekit
import pytest
import sdk_map_tasks as m
from sdk_helpers import HERE, pid_alive, subprocess_env
from waiting import VENV_BIN, wait_until

from flytekitplugins_actor import MapFailed
from flytekitplugins_actor import map as actor_map

pytestmark = pytest.mark.timeout(120)


def test_map_is_actually_parallel_across_two_replicas(tmp_path):
    # each item waits at a file barrier for the other: both complete only if they run at the same time
    pids = actor_map(m.barrier_pid)(barrier=[str(tmp_path)] * 2, me=["a", "b"], other=["b", "a"])
    assert len(pids) == 2 and len(set(pids)) == 2, pids
    assert os.getpid() not in pids


def test_results_come_back_in_input_order(tmp_path):
    xs = [1, 2, 3, 4, 5, 6]
    delays = [0.4, 0.0, 0.3, 0.0, 0.2, 0.0]  # early items finish last
    assert actor_map(m.square_after)(x=xs, delay=delays) == [x * x for x in xs]


def test_concurrency_one_runs_items_one_at_a_time(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    seen = actor_map(m.overlap_probe, concurrency=1)(probe_dir=[str(probe)] * 2, me=["a", "b"], hold=[0.75, 0.75])
    assert seen == [False, False]
    # the same probe without the limit does see the overlap (the probe can tell)
    probe2 = tmp_path / "probe2"
    probe2.mkdir()
    seen = actor_map(m.overlap_probe)(probe_dir=[str(probe2)] * 2, me=["a", "b"], hold=[10.0, 10.0])
    assert seen == [True, True]


def test_min_success_ratio_tolerates_failures_with_none():
    out = actor_map(functools.partial(m.fail_on, bad=2), min_success_ratio=0.5)(x=[1, 2, 3, 4])
    assert out == [10, None, 30, 40]


def test_below_min_success_ratio_raises_map_failed():
    with pytest.raises(MapFailed) as info:
        actor_map(functools.partial(m.fail_on, bad=2), min_success_ratio=1.0)(x=[1, 2, 3])
    # the map model's one message, as the connector words it too
    assert str(info.value) == (
        "map(sdk_map_tasks.fail_on): 1 of 3 items failed; min_success_ratio=1.0 needs 3 successes. "
        "Item 1 failed: ValueError: item 2 is bad"
    )
    assert isinstance(info.value.__cause__, ValueError) and not info.value.recoverable


@pytest.mark.timeout(60)
def test_a_map_that_cannot_meet_its_ratio_fails_fast_and_cancels_its_items_in_flight(tmp_path):
    # before: the local driver ran every item before deciding, so items that never end hung it
    with pytest.raises(MapFailed, match=r"1 of 6 items failed; .* Item 0 failed: ValueError: item 0 fails first"):
        actor_map(functools.partial(m.fail_or_hold, marks=str(tmp_path)))(x=list(range(6)))
    running = {f.split("-")[1] for f in os.listdir(tmp_path) if f.startswith("running-")}
    cancelled = {f.split("-")[1] for f in os.listdir(tmp_path) if f.startswith("cancelled-")}
    assert running <= cancelled  # every item that started was cancelled before MapFailed was raised
    assert len(running) < 5  # and dispatching stopped: never more than the window was sent
    assert actor_map(m.add)(x=[1, 2], y=[1, 1]) == [2, 3]  # the pool serves the next map


def test_sys_exit_in_one_item_is_one_failed_item():
    # before: SystemExit escaped `except Exception` and ended the whole driver
    assert actor_map(functools.partial(m.exit_on, bad=2), min_success_ratio=0.5)(x=[1, 2, 3]) == [10, None, 30]
    with pytest.raises(MapFailed, match=r"Item 1 failed: SystemExit: 3") as info:
        actor_map(functools.partial(m.exit_on, bad=2))(x=[1, 2, 3])
    assert isinstance(info.value.__cause__, SystemExit)
    assert actor_map(functools.partial(m.interrupt_on, bad=2), min_success_ratio=0.5)(x=[1, 2, 3]) == [10, None, 30]


def test_in_process_mode_runs_map_items_in_the_driver(monkeypatch):
    # before: FLYTE_ACTOR_IN_PROCESS=1 was ignored by map and items still ran on replicas
    monkeypatch.setenv("FLYTE_ACTOR_IN_PROCESS", "1")
    assert actor_map(m.driver_pid)(x=[1, 2, 3]) == [os.getpid()] * 3
    assert actor_map(functools.partial(m.exit_on, bad=2), min_success_ratio=0.5)(x=[1, 2, 3]) == [10, None, 30]
    assert actor_map(functools.partial(m.interrupt_on, bad=2), min_success_ratio=0.5)(x=[1, 2, 3]) == [10, None, 30]
    # in-process, flytekit prefixes the task's exception as in any local run of a plain task
    with pytest.raises(MapFailed, match=r"(?s)1 of 3 items failed; .* Item 1 failed: ValueError: .*item 2 is bad"):
        actor_map(functools.partial(m.fail_on, bad=2))(x=[1, 2, 3])


def test_partially_bound_inputs_go_to_every_item():
    assert actor_map(functools.partial(m.add, y=100))(x=[1, 2, 3]) == [101, 102, 103]
    assert m.wf_map_add(xs=[5, 6], y=1) == [6, 7]


def test_multiple_outputs_come_back_as_lists():
    assert actor_map(m.quot_rem)(a=[7, 9, 10], b=[2, 4, 5]) == ([3, 2, 2], [1, 1, 0])


def test_empty_map():
    assert actor_map(m.add)(x=[], y=[]) == []


def test_mismatched_list_lengths_are_an_error():
    with pytest.raises(ValueError, match="different lengths"):
        actor_map(m.add)(x=[1, 2, 3], y=[1, 2])


def test_flytekit_map_task_over_an_actor_task_still_works_locally():
    assert flytekit.map_task(m.add)(x=[1, 2, 3], y=[10, 20, 30]) == [11, 22, 33]
    assert flytekit.map_task(functools.partial(m.add, y=5))(x=[1, 2]) == [6, 7]


def test_an_item_whose_replica_dies_fails_alone():
    from flytekitplugins_actor import ReplicaDied

    out = actor_map(functools.partial(m.die_on, bad=1), min_success_ratio=0.5)(x=[0, 1, 2, 3])
    assert out == [0, None, 20, 30]
    with pytest.raises(MapFailed) as info:
        actor_map(functools.partial(m.die_on, bad=2))(x=[1, 2, 3])
    assert isinstance(info.value.__cause__, ReplicaDied)
    assert "exited with code 9" in str(info.value)
    assert actor_map(m.add)(x=[1, 2], y=[1, 1]) == [2, 3]  # the pool recovered


@contextlib.contextmanager
def _pyflyte_run_map_until_items_run(tmp_path, *extra: str, **env: str):
    """`pyflyte run` of a map of six items that never end on two replicas; yields once two items run, and kills
    the driver at the end whatever happened."""
    marks = tmp_path / "marks"
    marks.mkdir()
    p = subprocess.Popen(
        [os.path.join(VENV_BIN, "pyflyte"), "run", os.path.join(HERE, "sdk_map_tasks.py"), "wf_hold"]
        + ["--xs", "[0, 1, 2, 3, 4, 5]", "--marks", str(marks), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(tmp_path),
        env=subprocess_env(**env),
    )
    try:
        running = wait_until(
            lambda: [f for f in os.listdir(marks) if f.startswith("running-")] if len(os.listdir(marks)) >= 2 else None,
            60,
            what="two items running on the two replicas",
        )
        yield p, marks, {int(f.split("-")[2]) for f in running}
    finally:
        p.kill()
        p.communicate()


def test_ctrl_c_cancels_the_items_in_flight_stops_dispatching_and_the_replicas(tmp_path):
    # before: SIGINT ended in flytekit's exit(1), and the driver then waited for ever on items that never end
    # a grace long enough that a loaded machine still delivers each cancel before its replica would be replaced
    with _pyflyte_run_map_until_items_run(tmp_path, FLYTE_ACTOR_MAP_INTERRUPT_GRACE_S="10") as (p, marks, replica_pids):
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    assert p.returncode != 0
    assert "map(sdk_map_tasks.hold): interrupted by Ctrl-C after 0 of 6 items; replicas stopped" in err, err
    names = os.listdir(marks)
    running = sorted(f.split("-")[1] for f in names if f.startswith("running-"))
    assert len(running) == 2  # nothing was dispatched after the Ctrl-C
    assert sorted(f.split("-")[1] for f in names if f.startswith("cancelled-")) == running  # each got its cancel
    wait_until(lambda: not any(pid_alive(pid) for pid in replica_pids), 10, what="the replicas stopped")


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    # items that ignore their cancel would hold the orderly stop for the whole (here 120 s) grace
    stubborn = _pyflyte_run_map_until_items_run(tmp_path, "--stubborn", FLYTE_ACTOR_MAP_INTERRUPT_GRACE_S="120")
    with stubborn as (p, marks, replica_pids):
        p.send_signal(signal.SIGINT)
        wait_until(lambda: any(f.startswith("cancelled-") for f in os.listdir(marks)), 30, what="the cancel arrived")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)  # far less than the 120 s the orderly stop would wait
    assert p.returncode == 130, err
    assert "Ctrl-C again to exit at once" in err and "second Ctrl-C, exiting at once" in err, err
    assert "replicas stopped" not in err  # it did not wait for the orderly stop
    wait_until(lambda: not any(pid_alive(pid) for pid in replica_pids), 10, what="the replicas exited with it")

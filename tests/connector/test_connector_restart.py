"""§5: SIGKILL the connector and start it again. Every execution answers GetTask with a valid phase, maps resume
from the items in storage, single executions in flight end RETRYABLE_FAILED, and nothing runs twice except map
items that were mid-flight at the kill (proved with side-effect counter files the tasks write)."""

import functools
import os

import actor_tasks as t
import pytest
from harness import PHASE, Attempt, ConnectorServer, Propeller, literal_map, output_value
from waiting import wait_until

from flytekitplugins_actor.actor_map import map as actor_map

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def restartable(tmp_path):
    s = ConnectorServer(str(tmp_path / "connector")).start()
    yield s
    s.stop()


def _lines(path):
    return open(path).read().splitlines() if os.path.exists(path) else []


def test_single_executions_survive_a_connector_sigkill(restartable, tmp_path):
    server, propeller, base = restartable, Propeller(restartable), str(tmp_path / "runs")
    gate, counter = str(tmp_path / "gate"), str(tmp_path / "count")
    done = Attempt(base, t.add, literal_map(t.add, a=4, b=5))
    failed = Attempt(base, t.fail, literal_map(t.fail, message="failed-before-kill"))
    running = Attempt(base, t.wait_for_file, literal_map(t.wait_for_file, path=gate, counter=counter, label="running"))
    queued = Attempt(base, t.wait_for_file, literal_map(t.wait_for_file, path=gate, counter=counter, label="queued"))
    deleted = Attempt(base, t.wait_for_file, literal_map(t.wait_for_file, path=gate, counter=counter, label="deleted"))
    m_done, m_failed = propeller.create(done), propeller.create(failed)
    assert propeller.wait(m_done).phase == PHASE.SUCCEEDED
    assert propeller.wait(m_failed).phase == PHASE.FAILED
    m_running = propeller.create(running)
    propeller.wait(m_running, phases={PHASE.RUNNING})
    wait_until(lambda: _lines(counter), 30, "the task to start on its replica")
    m_queued, m_deleted = propeller.create(queued), propeller.create(deleted)
    assert propeller.get(m_queued).phase == PHASE.QUEUED

    server.kill()
    server.start()
    propeller = Propeller(server)

    assert propeller.get(m_done).phase == PHASE.SUCCEEDED
    assert output_value(done.outputs(), "o0", int) == 9
    r = propeller.get(m_failed)
    assert r.phase == PHASE.FAILED and "failed-before-kill" in r.message
    r = propeller.get(m_running)
    assert r.phase == PHASE.RETRYABLE_FAILED and "not run twice" in r.message
    propeller.delete(m_deleted)  # deleted after the restart, before anyone asked for it: never runs
    assert propeller.create(queued) == m_queued  # propeller's at-least-once CreateTask after the restart
    open(gate, "w").close()
    assert propeller.wait(m_queued).phase == PHASE.SUCCEEDED  # never dispatched before the kill: queued again
    assert propeller.get(m_deleted).phase == PHASE.ABORTED
    assert sorted(line.split()[0] for line in _lines(counter)) == ["queued", "running"]
    assert propeller.get(m_running).phase == PHASE.RETRYABLE_FAILED  # and it stays so


def test_map_resumes_after_a_connector_sigkill_without_rerunning_finished_items(restartable, tmp_path):
    server, propeller, base = restartable, Propeller(restartable), str(tmp_path / "runs")
    gate, counter = str(tmp_path / "gate"), str(tmp_path / "count")
    m = actor_map(functools.partial(t.square, counter=counter, gate=gate))
    xs = [1, 2, 3, 4, 100, 101]
    a = Attempt(base, m, literal_map(m, x=xs))
    meta = propeller.create(a)
    items = os.path.join(a.dir, "items")
    wait_until(
        lambda: (
            all(os.path.exists(os.path.join(items, str(i), "outputs.pb")) for i in range(4))
            and {"100", "101"} <= {line.split()[1] for line in _lines(counter)}
        ),
        60,
        "items 0-3 finished and items 4-5 running",
    )

    server.kill()
    server.start()
    propeller = Propeller(server)

    open(gate, "w").close()
    r = propeller.wait(meta, task_type="actor_map", timeout=90)
    assert r.phase == PHASE.SUCCEEDED, r.message
    assert output_value(a.outputs(), "o0", list[int]) == [x * x for x in xs]
    runs = [line.split()[1] for line in _lines(counter)]
    assert sorted(runs[:6]) == sorted(map(str, xs))
    assert [runs.count(str(x)) for x in (1, 2, 3, 4)] == [1, 1, 1, 1]  # finished items never ran again
    assert runs.count("100") == 2 and runs.count("101") == 2  # mid-flight at the kill: run again
    assert r.custom_info["resumed"] == 4


def test_a_repeated_execute_task_sync_after_a_sigkill_is_answered_from_the_record(restartable, tmp_path):
    server, propeller, base = restartable, Propeller(restartable), str(tmp_path / "runs")
    counter = str(tmp_path / "count")
    a = Attempt(base, t.nap_sync, literal_map(t.nap_sync, seconds=0.0, counter=counter))
    first = propeller.execute_sync(a)
    assert first.phase == PHASE.SUCCEEDED, first.message
    server.kill()
    server.start()
    again = Propeller(server).execute_sync(a)  # propeller repeats the Create whose answer it lost
    assert again.phase == PHASE.SUCCEEDED, again.message
    assert output_value(again.outputs, "o0", int) == output_value(first.outputs, "o0", int)
    assert len(_lines(counter)) == 1  # answered from outputs.pb, not run again

"""actor_cache: per-replica memoization, thread-safe and single-flight, exceptions not cached, optionally LRU."""

import os
import sys
import threading

import pytest
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from waiting import wait_until

from flytekitplugins_actor import actor_cache
from flytekitplugins_actor.replica.execution import RUNTIME


def _in_cache_wrapper(thread: threading.Thread) -> bool:
    """True while `thread` is inside actor_cache's wrapper (waiting on, or computing, a cached call)."""
    import flytekitplugins_actor.cache as cache_module

    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if os.path.samefile(frame.f_code.co_filename, cache_module.__file__):
            return True
        frame = frame.f_back
    return False


def test_single_flight_concurrent_callers_compute_once():
    calls = []
    lock = threading.Lock()
    followers = []

    @actor_cache
    def load(key):
        with lock:
            calls.append(key)
            leader = len(calls) == 1
        if leader:  # hold the computation until every other caller is inside the cache, waiting for it
            wait_until(lambda: followers and all(_in_cache_wrapper(th) for th in followers), 10)
        return f"value-{key}"

    results = []

    def call():
        results.append(load("k"))

    leader = threading.Thread(target=call)
    leader.start()
    wait_until(lambda: calls, 10)
    followers.extend(threading.Thread(target=call) for _ in range(7))
    for th in followers:
        th.start()
    for th in [leader, *followers]:
        th.join(20)
        assert not th.is_alive()
    assert calls == ["k"]
    assert results == ["value-k"] * 8
    info = load.cache_info()
    assert info["misses"] == 1 and info["hits"] == 7


def test_concurrent_callers_of_different_keys_do_not_block_each_other():
    started = {"a": threading.Event(), "b": threading.Event()}

    @actor_cache
    def load(key):
        started[key].set()
        other = "b" if key == "a" else "a"
        assert started[other].wait(10), f"{key} computed alone: keys are serialized"
        return key

    out = {}
    ths = [threading.Thread(target=lambda k=k: out.__setitem__(k, load(k))) for k in "ab"]
    for th in ths:
        th.start()
    for th in ths:
        th.join(20)
    assert out == {"a": "a", "b": "b"}


def test_exceptions_are_not_cached():
    calls = []

    @actor_cache
    def flaky(x):
        calls.append(x)
        if len(calls) == 1:
            raise RuntimeError("first time fails")
        return x * 2

    with pytest.raises(RuntimeError, match="first time fails"):
        flaky(3)
    assert flaky(3) == 6
    assert flaky(3) == 6
    assert calls == [3, 3]


def test_waiters_see_the_leaders_exception_and_the_next_call_recomputes():
    calls = []
    followers = []

    @actor_cache
    def fails_once(x):
        calls.append(x)
        if len(calls) == 1:
            wait_until(lambda: followers and all(_in_cache_wrapper(th) for th in followers), 10)
            raise ValueError("leader failed")
        return "ok"

    errors = []

    def call():
        try:
            fails_once(1)
        except ValueError as e:
            errors.append(str(e))

    leader = threading.Thread(target=call)
    leader.start()
    wait_until(lambda: calls, 10)
    followers.extend(threading.Thread(target=call) for _ in range(3))
    for th in followers:
        th.start()
    for th in [leader, *followers]:
        th.join(20)
    assert errors == ["leader failed"] * 4
    assert fails_once(1) == "ok"
    assert calls == [1, 1]


def test_maxsize_evicts_the_least_recently_used():
    calls = []

    @actor_cache(maxsize=2)
    def f(x):
        calls.append(x)
        return x

    f("a"), f("b")
    f("a")  # a is now the most recently used
    f("c")  # evicts b
    assert calls == ["a", "b", "c"]
    f("a"), f("c")
    assert calls == ["a", "b", "c"]  # still cached
    f("b")
    assert calls == ["a", "b", "c", "b"]  # b was evicted and is recomputed
    assert f.cache_info()["size"] == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_maxsize_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="maxsize"):
        actor_cache(maxsize=bad)(lambda: None)


class Config:
    """Equal by `name` only; `noise` does not take part in __hash__/__eq__."""

    def __init__(self, name, noise):
        self.name, self.noise = name, noise

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        return isinstance(other, Config) and other.name == self.name


def test_custom_objects_are_keyed_by_hash_and_eq():
    calls = []

    @actor_cache
    def load(cfg):
        calls.append(cfg.noise)
        return cfg.name

    assert load(Config("m", noise=1)) == "m"
    assert load(Config("m", noise=2)) == "m"  # a different but equal object: a hit
    assert load(Config("other", noise=3)) == "other"
    assert calls == [1, 3]


def test_unhashable_argument_gets_a_clear_error():
    class Unhashable:
        __hash__ = None

    @actor_cache
    def load(x):
        return 1

    with pytest.raises(TypeError, match="__hash__ and __eq__"):
        load(Unhashable())


def test_containers_are_keyed_by_content():
    calls = []

    @actor_cache
    def load(cfg):
        calls.append(1)
        return len(cfg)

    assert load({"a": [1, 2], "b": {3}}) == 2
    assert load({"b": {3}, "a": [1, 2]}) == 2
    assert load({"a": [1, 3], "b": {3}}) == 2
    assert len(calls) == 2


def test_flyte_files_are_keyed_by_source_path(tmp_path):
    p1, p2 = tmp_path / "one.txt", tmp_path / "two.txt"
    p1.write_text("1")
    p2.write_text("2")
    calls = []

    @actor_cache
    def load(f):
        calls.append(str(f.path))
        return open(f.path).read()

    assert load(FlyteFile(str(p1))) == "1"
    assert load(FlyteFile(str(p1))) == "1"  # a new FlyteFile object of the same source: a hit
    assert load(FlyteFile(str(p2))) == "2"
    assert calls == [str(p1), str(p2)]
    d = tmp_path / "d"
    d.mkdir()

    @actor_cache
    def list_dir(fd):
        calls.append("dir")
        return sorted(os.listdir(fd.path))

    assert list_dir(FlyteDirectory(str(d))) == list_dir(FlyteDirectory(str(d))) == []
    assert calls.count("dir") == 1


def test_plain_memoization_outside_an_actor():
    calls = []

    @actor_cache
    def square(x, power=2):
        calls.append((x, power))
        return x**power

    assert square(3) == 9 and square(3) == 9
    assert square(3, power=3) == 27 and square(3, power=3) == 27
    assert calls == [(3, 2), (3, 3)]
    assert square.__name__ == "square"
    square.cache_clear()
    assert square(3) == 9 and len(calls) == 3


def test_entries_never_survive_into_another_code_version():
    calls = []

    @actor_cache
    def load():
        calls.append(RUNTIME.code_version)
        return len(calls)

    saved = RUNTIME.code_version
    try:
        assert load() == 1 and load() == 1
        RUNTIME.code_version = "s3://bucket/fast-abc.tar.gz"  # the replica activated another distribution
        assert load() == 2 and load() == 2
    finally:
        RUNTIME.code_version = saved
    assert calls == [saved, "s3://bucket/fast-abc.tar.gz"]


@pytest.mark.timeout(120)
def test_cache_survives_across_tasks_in_one_replica():
    import sdk_cache_tasks as c

    pid1, loads1, model1 = c.predict(x=1)
    pid2, loads2, model2 = c.predict(x=2)
    pid3, loads3, model3 = c.predict_other_task(x=3)  # another task of the environment, same replica
    assert pid1 == pid2 == pid3 != os.getpid()
    assert model1 == model2 == model3 == "model-m"
    assert loads1 == loads2 == loads3 == 1  # loaded once, by the first task; hits since
    assert c.LOADS == 0  # never loaded in the driver


def test_actor_cache_pickles_without_its_lock_and_arrives_as_the_live_cache():
    import cloudpickle

    @actor_cache(maxsize=4)
    def double(x):
        return 2 * x

    assert double(3) == 6
    again = cloudpickle.loads(cloudpickle.dumps(double))
    assert again is double  # in a process that has it (a replica, across executions): the same cache
    assert again(3) == 6 and double.cache_info()["hits"] == 1

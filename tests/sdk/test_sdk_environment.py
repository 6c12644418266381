"""ActorEnvironment: validation at definition time, immutability, and the @env.task decorator."""

import dataclasses
import datetime
import re

import pytest
from flytekit import Cache, Documentation, PodTemplate, Resources, Secret
from flytekit.extras.accelerators import T4
from kubernetes.client import V1Container, V1PodSpec

from flytekitplugins_actor import ActorEnvironment, ActorTask
from flytekitplugins_actor.environment import DEFAULT_TTL_SECONDS


def _raises(exc, field, value, rule_words, **kwargs):
    """Builds an environment with one bad field and checks the error names the field, the value and the rule."""
    kwargs.setdefault("name", "ok")
    with pytest.raises(exc) as info:
        ActorEnvironment(**kwargs)
    msg = str(info.value)
    assert field in msg, msg
    assert repr(value) in msg, msg
    for word in rule_words:
        assert word in msg, msg
    return msg


# ---- name ----
@pytest.mark.parametrize(
    "name",
    ["My-Actor", "my_actor", "a" * 64, "", "-actor", "actor-", "actor.x", "actor x", "abc\n", "abc\n\n", "\nabc"],
    ids=[
        "uppercase",
        "underscore",
        "64-chars",
        "empty",
        "leading-dash",
        "trailing-dash",
        "dot",
        "space",
        "trailing-newline",
        "two-trailing-newlines",
        "leading-newline",
    ],
)
def test_name_must_be_a_dns_label(name):
    _raises(ValueError, "name", name, ["DNS-1123", "63"], name=name)


@pytest.mark.parametrize("name", ["a", "my-actor", "a1-b2", "0abc", "a" * 63])
def test_valid_names_are_accepted(name):
    assert ActorEnvironment(name=name).name == name


def test_name_of_the_wrong_type_is_refused():
    with pytest.raises((TypeError, ValueError)) as info:
        ActorEnvironment(name=5)
    assert "name" in str(info.value) and "5" in str(info.value)


# ---- replica_count ----
@pytest.mark.parametrize(
    "value,exc",
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError), (None, TypeError)],
)
def test_replica_count_must_be_an_int_of_at_least_one(value, exc):
    _raises(exc, "replica_count", value, ["int", ">= 1"], replica_count=value)


@pytest.mark.parametrize("value", [1, 2, 25])
def test_valid_replica_counts(value):
    assert ActorEnvironment(name="ok", replica_count=value).replica_count == value


# ---- ttl_seconds ----
@pytest.mark.parametrize("value,exc", [(-1, ValueError), (1.5, TypeError), ("30", TypeError), (False, TypeError)])
def test_ttl_seconds_must_be_none_or_a_non_negative_int(value, exc):
    _raises(exc, "ttl_seconds", value, ["None", "int", ">= 0"], ttl_seconds=value)


def test_ttl_seconds_none_means_the_documented_default():
    env = ActorEnvironment(name="ok")
    assert env.ttl_seconds is None
    assert env.resolved_ttl_seconds == DEFAULT_TTL_SECONDS == 300
    assert ActorEnvironment(name="ok", ttl_seconds=0).resolved_ttl_seconds == 0
    assert ActorEnvironment(name="ok", ttl_seconds=30).resolved_ttl_seconds == 30
    # the default is documented where users read it
    assert str(DEFAULT_TTL_SECONDS) in _raises(TypeError, "ttl_seconds", "30", [], ttl_seconds="30")


# ---- environment ----
@pytest.mark.parametrize(
    "value", [{"A": 1}, {"A": None}, {1: "a"}, {"A": b"x"}], ids=["int-value", "none-value", "int-key", "bytes-value"]
)
def test_environment_must_map_str_to_str(value):
    with pytest.raises(TypeError) as info:
        ActorEnvironment(name="ok", environment=value)
    msg = str(info.value)
    assert "environment" in msg and "str" in msg
    key, val = next(iter(value.items()))
    assert repr(key) in msg and repr(val) in msg, msg


@pytest.mark.parametrize(
    "name",
    ["A=B", "", "1ABC", "A B", "A\x00B", "A\n", "PATH\u00e9", "=A"],
    ids=["equals", "empty", "leading-digit", "space", "nul", "newline", "non-ascii", "leading-equals"],
)
def test_environment_variable_names_must_be_legal(name):
    # refused at definition, not at run time after three failed replica starts
    _raises(ValueError, "environment", name, ["name", "letters, digits", "'_'"], environment={name: "1"})


@pytest.mark.parametrize("name", ["A", "_A", "a_b", "A1", "MY.VAR", "my-var"])
def test_legal_environment_variable_names_are_accepted(name):
    assert ActorEnvironment(name="ok", environment={name: "v"}).environment[name] == "v"


def test_environment_values_with_nul_are_refused():
    _raises(ValueError, "environment", "a\x00b", ["NUL"], environment={"A": "a\x00b"})


@pytest.mark.parametrize("value", [["A=1"], "A=1"])
def test_environment_must_be_a_mapping(value):
    _raises(TypeError, "environment", value, ["dict"], environment=value)


# ---- the other fields: their documented types ----
@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("requests", {"cpu": "1"}, "Resources"),
        ("requests", "1", "Resources"),
        ("limits", {"mem": "1Gi"}, "Resources"),
        ("accelerator", "nvidia-tesla-t4", "accelerator"),
        ("secret_requests", "my-secret", "Secret"),
        ("secret_requests", Secret(group="g", key="k"), "Secret"),
        ("secret_requests", ["my-secret"], "Secret"),
        ("pod_template", {"spec": {}}, "PodTemplate"),
        ("pod_template", V1PodSpec(containers=[]), "PodTemplate"),
        ("interruptible", "yes", "bool"),
        ("interruptible", 1, "bool"),
        ("container_image", 3, "ImageSpec"),
    ],
)
def test_other_fields_must_have_their_documented_type(field, value, expected):
    with pytest.raises(TypeError) as info:
        ActorEnvironment(name="ok", **{field: value})
    msg = str(info.value)
    assert field in msg and expected in msg, msg
    if field != "secret_requests" or not isinstance(value, list):
        assert repr(value) in msg, msg
    else:
        assert repr(value[0]) in msg, msg


def test_empty_container_image_is_refused():
    _raises(ValueError, "container_image", "  ", ["empty"], container_image="  ")


def test_a_fully_specified_environment_is_accepted():
    pt = PodTemplate(primary_container_name="primary", pod_spec=V1PodSpec(containers=[V1Container(name="primary")]))
    env = ActorEnvironment(
        name="full",
        container_image="ghcr.io/x/y:1",
        replica_count=3,
        ttl_seconds=60,
        environment={"A": "1"},
        requests=Resources(cpu="1", mem="1Gi"),
        limits=Resources(cpu="2"),
        accelerator=T4,
        secret_requests=[Secret(group="g", key="k")],
        pod_template=pt,
        interruptible=True,
    )
    assert env.replica_count == 3 and env.environment["A"] == "1"
    assert env.secret_requests == (Secret(group="g", key="k"),)


# ---- immutability ----
@pytest.mark.parametrize(
    "field,value", [("name", "other"), ("replica_count", 5), ("ttl_seconds", 1), ("environment", {})]
)
def test_fields_cannot_be_reassigned(field, value):
    env = ActorEnvironment(name="frozen", environment={"A": "1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(env, field, value)
    assert getattr(env, field) != value


def test_environment_mapping_is_not_mutable_and_is_a_copy():
    source = {"A": "1"}
    env = ActorEnvironment(name="frozen", environment=source)
    with pytest.raises(TypeError):
        env.environment["B"] = "2"
    with pytest.raises(TypeError):
        del env.environment["A"]
    source["A"] = "changed"  # mutating the caller's dict afterwards does not reach the environment
    assert dict(env.environment) == {"A": "1"}


def test_secret_requests_list_is_frozen_as_a_tuple():
    secrets = [Secret(group="g", key="k")]
    env = ActorEnvironment(name="frozen", secret_requests=secrets)
    secrets.append(Secret(group="g", key="other"))
    assert env.secret_requests == (Secret(group="g", key="k"),)


# ---- @env.task ----
ENV = ActorEnvironment(name="deco", ttl_seconds=30)


def test_bare_decorator_makes_an_actor_task():
    @ENV.task
    def f(x: int) -> int:
        return x

    assert isinstance(f, ActorTask)
    assert f.task_type == "actor"
    assert f.task_config is ENV
    assert list(f.python_interface.inputs) == ["x"]


def test_decorator_with_per_task_arguments():
    @ENV.task(
        cache=True,
        cache_version="7",
        retries=3,
        timeout=datetime.timedelta(minutes=5),
        docs=Documentation(short_description="Doubles."),
        cache_serialize=True,
    )
    def f(x: int) -> int:
        return 2 * x

    assert isinstance(f, ActorTask)
    md = f.metadata
    assert md.cache is True and md.cache_version == "7" and md.cache_serialize is True
    assert md.retries == 3
    assert md.timeout == datetime.timedelta(minutes=5)
    assert f.docs.short_description == "Doubles."


def test_decorator_with_a_cache_object():
    @ENV.task(cache=Cache(version="v9", serialize=True))
    def f(x: int) -> int:
        return x

    assert f.metadata.cache is True
    assert f.metadata.cache_version == "v9"
    assert f.metadata.cache_serialize is True


def test_decorator_passes_the_environment_shape_to_the_task():
    env = ActorEnvironment(
        name="shaped",
        container_image="ghcr.io/x/y:1",
        environment={"A": "1"},
        requests=Resources(cpu="1"),
        limits=Resources(cpu="2"),
        secret_requests=[Secret(group="g", key="k")],
        interruptible=True,
    )

    @env.task
    def f() -> None:
        pass

    assert f.container_image == "ghcr.io/x/y:1"
    assert f.environment == {"A": "1"}
    assert f.resources.requests == Resources(cpu="1") and f.resources.limits == Resources(cpu="2")
    assert f.security_context.secrets == [Secret(group="g", key="k")]
    assert f.metadata.interruptible is True


@pytest.mark.parametrize(
    "arg,value",
    [
        ("container_image", "ghcr.io/x/y:2"),
        ("requests", Resources(cpu="1")),
        ("limits", Resources(mem="1Gi")),
        ("environment", {"A": "1"}),
        ("secret_requests", [Secret(group="g", key="k")]),
        ("pod_template", PodTemplate(pod_spec=V1PodSpec(containers=[]))),
        ("accelerator", T4),
        ("interruptible", True),
    ],
)
def test_environment_owned_arguments_are_refused_per_task(arg, value):
    with pytest.raises(TypeError) as info:

        @ENV.task(**{arg: value})
        def f() -> None:
            pass

    msg = str(info.value)
    assert arg in msg and "ActorEnvironment" in msg, msg
    assert re.search(r"set on the\s+ActorEnvironment", msg), msg


def test_environment_owned_argument_refused_even_with_allowed_ones():
    with pytest.raises(TypeError, match="container_image"):
        ENV.task(retries=2, container_image="x")


def test_async_def_is_not_supported():
    with pytest.raises(TypeError) as info:

        @ENV.task
        async def f() -> int:
            return 1

    msg = str(info.value)
    assert "async" in msg and "not supported" in msg and "'test_async_def_is_not_supported.<locals>.f'" in msg


def test_async_def_is_not_supported_with_arguments():
    with pytest.raises(TypeError, match="not supported"):

        @ENV.task(retries=1)
        async def f() -> int:
            return 1


def test_decorating_a_non_callable_is_refused():
    with pytest.raises(TypeError, match="decorates a function"):
        ENV.task(retries=1)(42)

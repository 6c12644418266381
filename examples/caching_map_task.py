"""`@actor_cache` with `map`: load a model once per replica, then run 20 inferences over 2 replicas.

Port of "Example: @actor_cache with map" in the Union actor examples. `load_model` takes 10 s (a large
download, or moving a model onto a GPU); `actor_cache` keeps its result in each replica, so the 20
inferences cost two model loads (one per replica, in parallel), not twenty.

    pyflyte run examples/caching_map_task.py run_inference    # -> [0, 4, 8, ..., 76]

Each real load prints a `load_model: loading` line to the replica's log
(/tmp/flyte-actor-logs/<driver pid>/<replica>.log); tests count them. Local runs never build the ImageSpec.
"""

import os
from functools import partial
from pathlib import Path
from time import sleep

from flytekit import FlyteFile, ImageSpec, current_context, task, workflow

import flytekitplugins_actor as fa
from flytekitplugins_actor import ActorEnvironment, actor_cache

image = ImageSpec(
    registry=os.environ.get("DOCKER_REGISTRY", None),
    packages=["flytekitplugins-actor"],
)

actor = ActorEnvironment(
    name="my-actor",
    container_image=image,
    replica_count=2,
)


class MyModel:
    """Simple model that multiples value with model_state."""

    def __init__(self, model_state: int):
        self.model_state = model_state

    def __call__(self, value: int):
        return self.model_state * value


@task(container_image=image, cache=True, cache_version="v1")
def create_model_state() -> FlyteFile:
    working_dir = Path(current_context().working_directory)
    model_state_path = working_dir / "model_state.txt"
    model_state_path.write_text("4")
    return model_state_path


@actor_cache
def load_model(model_state_path: FlyteFile) -> MyModel:
    print(f"load_model: loading in pid {os.getpid()}", flush=True)
    # Simulate model loading time. This can take a long time
    # because the FlyteFile download is large, or when the
    # model is loaded onto the GPU.
    sleep(10)
    with model_state_path.open("r") as f:
        model_state = int(f.read())

    return MyModel(model_state=model_state)


@actor.task
def inference(value: int, model_state_path: FlyteFile) -> int:
    model = load_model(model_state_path)
    return model(value)


@workflow
def run_inference(values: list[int] = list(range(20))) -> list[int]:
    model_state = create_model_state()
    inference_ = partial(inference, model_state_path=model_state)
    return fa.map(inference_)(value=values)

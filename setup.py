from setuptools import find_packages, setup

setup(
    name="flytekitplugins-actor",
    version="0.1.0",
    description="Open-source actors for Flyte: warm replica pools that run task executions without a pod start.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(
        include=["flytekitplugins_actor", "flytekitplugins_actor.*", "plugin_backend", "plugin_backend.*"]
    ),
    install_requires=[
        "flytekit>=1.16,<1.17",
        "flyteidl>=1.16,<1.17",
        # kubernetes 37 made its models pydantic and rejects an ImageSpec in V1Container.image.
        "kubernetes>=29,<37",
        "cloudpickle>=2",
    ],
    extras_require={
        "connector": ["flytekit[connector]>=1.16,<1.17", "prometheus-client", "grpcio", "grpcio-health-checking"],
        "test": ["pytest", "pytest-mock", "pytest-timeout", "scipy", "kubernetes-validate", "ruff"],
    },
    entry_points={
        "flytekit.plugins": [
            "actor=flytekitplugins_actor",
            "actor_connector=plugin_backend",
        ],
        "console_scripts": ["actor-replica=flytekitplugins_actor.replica.worker:main"],
    },
)

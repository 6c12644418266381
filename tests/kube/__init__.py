"""A loopback Kubernetes API stand-in: a real HTTP API server for pods and secrets with strict 1.30 validation,
the RBAC of deploy/, watches, garbage collection and a kubelet that runs pods as local processes."""

import os
import secrets
import sys

from .server import Cluster
from .store import ApiError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY_DIR = os.path.join(ROOT, "deploy")
CONNECTOR_SA = ("flyte", "flyte-actor-connector")
NAMESPACE = "flytesnacks-development"
"""The namespace the connector tests' executions run in (the harness's default)."""

__all__ = ["ApiError", "Cluster", "CONNECTOR_SA", "DEPLOY_DIR", "NAMESPACE", "ROOT", "standin"]


def standin(workdir: str, image_paths=()) -> Cluster:
    """A started stand-in cluster with the `flytesnacks-development` namespace, the RBAC of deploy/ for the
    connector's service account, and a kubeconfig at `<workdir>/kubeconfig` carrying that account's token.
    `image_paths` are what the replica image has on its PYTHONPATH (besides this package, installed)."""
    token = secrets.token_hex(16)
    env = {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"]),
        "HOME": workdir,
        "PYTHONPATH": os.pathsep.join(image_paths),
        "LANG": "C.UTF-8",
    }
    cluster = Cluster(os.path.join(workdir, "node"), DEPLOY_DIR, CONNECTOR_SA, token, base_env=env)
    cluster.store.add_namespace(NAMESPACE, service_accounts=("default", "team-sa"))
    cluster.kubeconfig = cluster.write_kubeconfig(os.path.join(workdir, "kubeconfig"), token)
    return cluster.start()

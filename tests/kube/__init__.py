"""A loopback Kubernetes API stand-in: a real HTTP API server for pods and secrets with strict 1.30 validation,
the RBAC of deploy/, watches, garbage collection and a kubelet that runs pods as local processes."""

import os

from .server import Cluster
from .store import ApiError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY_DIR = os.path.join(ROOT, "deploy")
CONNECTOR_SA = ("flyte", "flyte-actor-connector")

__all__ = ["ApiError", "Cluster", "CONNECTOR_SA", "DEPLOY_DIR", "ROOT"]

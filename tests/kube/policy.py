"""What the stand-in API server refuses: objects that are not valid Kubernetes 1.30 objects (422) and requests
the shipped RBAC rules do not allow (403)."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import kubernetes_validate
import yaml

from .store import ApiError

KUBERNETES_VERSION = "1.30.0"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def validate(obj: dict) -> None:
    """Strict schema validation (unknown or misspelt fields refused) plus the name and label rules the schema lacks."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        raise ApiError(422, "Invalid", f"{obj.get('kind')} is invalid: {where}: {e.message}")
    meta = obj.get("metadata", {})
    name = meta.get("name", "")
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise ApiError(
            422, "Invalid", f"metadata.name: Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain"
        )
    if obj.get("kind") == "Pod" and len(name) > 63:
        raise ApiError(422, "Invalid", f"metadata.name: Invalid value: {name!r}: must be no more than 63 characters")
    for k, v in (meta.get("labels") or {}).items():
        prefix, _, short = k.rpartition("/")
        if len(short) > 63 or not _LABEL_NAME.match(short) or (prefix and not _DNS_SUBDOMAIN.match(prefix)):
            raise ApiError(422, "Invalid", f"metadata.labels: Invalid value: {k!r}: not a qualified name")
        if len(v) > 63 or not _LABEL_VALUE.match(v):
            raise ApiError(422, "Invalid", f"metadata.labels: Invalid value: {v!r}: not a valid label value")


@dataclass(frozen=True)
class Rule:
    resources: Tuple[str, ...]
    verbs: Tuple[str, ...]
    namespace: Optional[str]  # None: cluster-wide (a ClusterRoleBinding)

    def allows(self, verb: str, resource: str, namespace: Optional[str]) -> bool:
        if self.namespace is not None and namespace != self.namespace:
            return False
        return (resource in self.resources or "*" in self.resources) and (verb in self.verbs or "*" in self.verbs)


class Rbac:
    """The rules bound to one service account by the Roles/ClusterRoles and bindings in a directory of manifests."""

    def __init__(self, manifest_dir: str, service_account: Tuple[str, str]):
        docs: List[dict] = []
        for path in sorted(glob.glob(os.path.join(manifest_dir, "*.yaml"))):
            with open(path) as f:
                docs += [d for d in yaml.safe_load_all(f) if d]
        roles: Dict[Tuple[str, Optional[str], str], List[dict]] = {}
        for d in docs:
            if d["kind"] in ("Role", "ClusterRole"):
                ns = d["metadata"].get("namespace") if d["kind"] == "Role" else None
                roles[(d["kind"], ns, d["metadata"]["name"])] = d.get("rules") or []
        self.rules: List[Rule] = []
        sa_ns, sa_name = service_account
        for d in docs:
            if d["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            if not any(
                s.get("kind") == "ServiceAccount" and s.get("name") == sa_name and s.get("namespace") == sa_ns
                for s in d.get("subjects") or []
            ):
                continue
            ref = d["roleRef"]
            binding_ns = d["metadata"].get("namespace") if d["kind"] == "RoleBinding" else None
            role_ns = binding_ns if ref["kind"] == "Role" else None
            for r in roles.get((ref["kind"], role_ns, ref["name"]), []):
                if "" not in (r.get("apiGroups") or []):
                    continue
                self.rules.append(Rule(tuple(r.get("resources", ())), tuple(r.get("verbs", ())), binding_ns))

    def check(self, verb: str, resource: str, namespace: Optional[str], user: str) -> None:
        if not any(r.allows(verb, resource, namespace) for r in self.rules):
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            raise ApiError(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "{user}" cannot {verb} resource "{resource}" in API group "" {scope}',
            )

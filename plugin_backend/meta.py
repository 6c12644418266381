"""The resource meta propeller stores per actor execution: small (< 1 KB) and self-describing.

It names the execution, its output prefix (where the durable request record and results live) and the pool key
parts, so a connector that did not create the execution (a restart, another replica of the connector) can answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from flytekit.extend.backend.base_connector import ResourceMeta

from plugin_backend.errors import InvalidResourceMeta

META_VERSION = 1
MAX_META_BYTES = 1024


@dataclass
class ActorResourceMeta(ResourceMeta):
    execution_id: str
    output_prefix: str
    kind: str  # "actor" | "actor_map"
    env: str  # environment name
    env_key: str
    namespace: str
    service_account: str
    code: str  # short hash of the code version (distribution or image)
    v: int = META_VERSION

    def encode(self) -> bytes:
        return json.dumps(dict(self.__dict__), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "ActorResourceMeta":
        """The meta propeller sent back; InvalidResourceMeta (INVALID_ARGUMENT) naming the field when it is not one
        this connector wrote: not JSON, a field missing or of the wrong type, an empty id or output prefix."""
        try:
            raw = json.loads(data.decode())
            if not isinstance(raw, dict):
                raise ValueError(f"a JSON {type(raw).__name__}, not an object")
            names = {f.name for f in fields(cls)}
            meta = cls(**{k: v for k, v in raw.items() if k in names})
        except Exception as e:
            raise InvalidResourceMeta(f"resource meta is not an actor execution's ({e})") from None
        for f in fields(cls):
            value = getattr(meta, f.name)
            expected = int if f.name == "v" else str
            if isinstance(value, bool) or not isinstance(value, expected):
                raise InvalidResourceMeta(
                    f"resource meta field {f.name}={value!r} is invalid: must be a {expected.__name__}"
                )
        for name in ("execution_id", "output_prefix"):
            if not getattr(meta, name).strip():
                raise InvalidResourceMeta(f"resource meta field {name} is empty")
        if meta.v != META_VERSION:
            raise InvalidResourceMeta(
                f"resource meta version {meta.v} is unknown; this connector reads version {META_VERSION}"
            )
        return meta

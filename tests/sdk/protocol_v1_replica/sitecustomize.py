"""Makes the replica started with this dir on PYTHONPATH behave as a protocol-1 replica (an image with an older
version of this package): it reports protocol 1 and ignores the fields version 2 added (`inputs_pb`,
`return_outputs`), reading the inputs file its command names as a version-1 worker does."""

import os

if os.environ.get("FLYTE_ACTOR_TEST_PROTOCOL_V1") == "1":
    from flytekitplugins_actor.replica import execution, protocol

    protocol.PROTOCOL_VERSION = 1
    _from_wire = execution.ExecutionSpec.from_wire.__func__

    def _v1_from_wire(cls, msg):
        msg = {k: v for k, v in msg.items() if k not in ("inputs_pb", "return_outputs")}
        return _from_wire(cls, msg)

    execution.ExecutionSpec.from_wire = classmethod(_v1_from_wire)

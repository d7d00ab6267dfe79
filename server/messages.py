"""The wire between the API frontend and the engine-core process: ZeroMQ frames of msgpack.

Frontend -> core (PUSH -> PULL): [type byte, msgpack payload]; ADD carries an EngineCoreRequest,
ABORT an AbortRequests, UTILITY a UtilityCall. Core -> frontend (PUSH -> PULL): [type byte,
msgpack payload]; OUTPUTS carries EngineCoreOutputs, UTILITY a UtilityResult, READY a CoreReady,
FAILED a CoreFailed. msgspec only: nothing is pickled.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from compiled_llm.engine.messages import EngineCoreOutputs, EngineCoreRequest


class RequestType(bytes, enum.Enum):
    ADD = b"\x00"
    ABORT = b"\x01"
    UTILITY = b"\x02"


class OutputType(bytes, enum.Enum):
    OUTPUTS = b"\x00"
    UTILITY = b"\x01"
    READY = b"\x02"
    FAILED = b"\x03"


class AbortRequests(msgspec.Struct, array_like=True, gc=False):
    request_ids: list[str]
    reason: str = "abort"  # "abort" (client gone) or "stop" (stop string seen by the frontend)


class UtilityCall(msgspec.Struct, array_like=True, gc=False):
    call_id: int
    method: str  # one of core_process.UTILITY_METHODS
    args: list[Any] = []


class UtilityResult(msgspec.Struct, array_like=True, gc=False):
    call_id: int
    result: Any = None
    error: str | None = None
    refused: bool = False  # the error is the caller's: not possible in the core's state


class CoreReady(msgspec.Struct, array_like=True, gc=False):
    """Sent once the engine is built (weights loaded, KV cache allocated, model compiled)."""

    pid: int
    num_blocks: int
    block_size: int
    max_model_len: int
    startup_seconds: float


class CoreFailed(msgspec.Struct, array_like=True, gc=False):
    """The core could not start or hit an error in its loop; it exits right after."""

    message: str


ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[bytes, msgspec.msgpack.Decoder[Any]] = {
    RequestType.ADD.value: msgspec.msgpack.Decoder(EngineCoreRequest),
    RequestType.ABORT.value: msgspec.msgpack.Decoder(AbortRequests),
    RequestType.UTILITY.value: msgspec.msgpack.Decoder(UtilityCall),
}
_OUTPUT_DECODERS: dict[bytes, msgspec.msgpack.Decoder[Any]] = {
    OutputType.OUTPUTS.value: msgspec.msgpack.Decoder(EngineCoreOutputs),
    OutputType.UTILITY.value: msgspec.msgpack.Decoder(UtilityResult),
    OutputType.READY.value: msgspec.msgpack.Decoder(CoreReady),
    OutputType.FAILED.value: msgspec.msgpack.Decoder(CoreFailed),
}


def decode_request(kind: bytes, payload: bytes | memoryview) -> Any:
    return _DECODERS[kind].decode(payload)


def decode_output(kind: bytes, payload: bytes | memoryview) -> Any:
    return _OUTPUT_DECODERS[kind].decode(payload)

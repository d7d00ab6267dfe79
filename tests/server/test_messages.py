"""The frontend <-> engine-core wire: msgpack frames of msgspec structs, no pickle."""

from __future__ import annotations

import msgspec
import pytest

from compiled_llm.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStatsMsg,
)
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.server.messages import (
    AbortRequests,
    CoreReady,
    OutputType,
    RequestType,
    UtilityCall,
    UtilityResult,
    decode_output,
    decode_request,
)
from compiled_llm.server.protocol import CompletionRequest, RequestError, param_of

ENCODE = msgspec.msgpack.Encoder().encode


def test_requests_round_trip() -> None:
    params = SamplingParams(
        temperature=0.7,
        stop=["\n"],
        logprobs=2,
        seed=3,
        all_stop_token_ids={2, 7},
        logit_bias={5: -1.5},
        allowed_token_ids=[5, 9],
    )
    add = EngineCoreRequest("r-0", [1, 2, 3], params, 16, 99, 12.5, priority=1)
    got = decode_request(RequestType.ADD.value, ENCODE(add))
    assert got == add and got.sampling_params.all_stop_token_ids == {2, 7}
    abort = AbortRequests(["a", "b"], "stop")
    assert decode_request(RequestType.ABORT.value, ENCODE(abort)) == abort
    call = UtilityCall(4, "reset_prefix_cache")
    assert decode_request(RequestType.UTILITY.value, ENCODE(call)) == call


def test_outputs_round_trip() -> None:
    stats = SchedulerStatsMsg(1, 2, 0.5, 10, 20, 0.25, 0, 7, 1)
    out = EngineCoreOutput("r-0", [5], [([5, 6], [-0.1, -2.0], -0.1, 1)], "length")
    outputs = EngineCoreOutputs([out], stats, 3.0)
    got = decode_output(OutputType.OUTPUTS.value, ENCODE(outputs))
    assert got.stats == stats and got.outputs[0].new_token_ids == [5]
    assert got.outputs[0].new_logprobs == [([5, 6], [-0.1, -2.0], -0.1, 1)]
    first = EngineCoreOutput("r-1", [7], prompt_logprobs=[None, ([3], [-0.5], -1.5, 4)])
    got = decode_output(OutputType.OUTPUTS.value, ENCODE(EngineCoreOutputs([first])))
    assert got.outputs[0].prompt_logprobs == [None, ([3], [-0.5], -1.5, 4)]
    ready = CoreReady(pid=1, num_blocks=8, block_size=16, max_model_len=512, startup_seconds=1.0)
    assert decode_output(OutputType.READY.value, ENCODE(ready)) == ready
    result = UtilityResult(4, error="no hook")
    assert decode_output(OutputType.UTILITY.value, ENCODE(result)) == result


def test_malformed_frames_are_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_request(RequestType.ADD.value, ENCODE(AbortRequests(["a"])))
    with pytest.raises(KeyError):
        decode_request(b"\x09", ENCODE(AbortRequests(["a"])))


def test_prompt_forms_and_param_names() -> None:
    assert CompletionRequest(prompt="hi").prompts() == ["hi"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [{"prompt_token_ids": [1, 2]}]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[[1], [2]]).prompts() == [
        {"prompt_token_ids": [1]},
        {"prompt_token_ids": [2]},
    ]
    with pytest.raises(RequestError):
        CompletionRequest(prompt=[]).prompts()
    assert param_of(ValueError("max_tokens=600 plus the prompt's 3 tokens ...")) == "max_tokens"
    assert param_of(ValueError("prompt_token_ids contains ids outside ...")) == "prompt"
    assert param_of(ValueError("something else")) is None

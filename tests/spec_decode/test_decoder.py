"""What the engine core asks of speculative decoding: which requests get proposals, and when the
step in flight must be read first (async scheduling)."""

from __future__ import annotations

from compiled_llm.config import speculative_config_from
from compiled_llm.request import Request, RequestStatus
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.spec_decode.decoder import SpeculativeDecoder
from compiled_llm.spec_decode.state import BACKOFF_START


def decoder(limit: int | None = 2) -> SpeculativeDecoder:
    config = speculative_config_from(
        {
            "method": "ngram",
            "num_speculative_tokens": 3,
            "prompt_lookup_min": 1,
            "disable_by_batch_size": limit,
        }
    )
    assert config is not None
    return SpeculativeDecoder(config)


def request(d: SpeculativeDecoder, output: list[int], max_tokens: int = 20) -> Request:
    r = Request("r", [1, 2, 3, 1, 2, 3, 1], SamplingParams(max_tokens=max_tokens), max_tokens, 0)
    r.output_token_ids = list(output)
    r.status = RequestStatus.RUNNING
    r.spec = d.new_state()
    return r


def test_proposals_go_to_running_requests_with_their_newest_token_and_room() -> None:
    d = decoder()
    r = request(d, [2])
    d.propose([r], num_running=1)
    assert r.spec is not None and r.spec.take_drafts(r.num_tokens) == [3, 1, 2]
    # room: max_tokens 4 with 2 out leaves 1 draft (the step emits drafts + 1)
    r = request(d, [2, 3], max_tokens=4)
    d.propose([r], num_running=1)
    assert r.spec is not None and r.spec.take_drafts(r.num_tokens) == [1]
    # none for a token in flight, a finished request, a batch over the limit, a paused gate
    for change in ("pending", "finished", "batch", "paused"):
        d = decoder()
        r = request(d, [2])
        assert r.spec is not None
        r.num_pending_output_tokens = int(change == "pending")
        if change == "finished":
            r.status = RequestStatus.FINISHED_STOPPED
        if change == "paused":
            d.gate.pause = 2
            r.spec.drafts_for = 0  # proposed for before: not a new request
        d.propose([r], num_running=3 if change == "batch" else 1)
        assert r.spec.take_drafts(r.num_tokens) == [], change
    # a new request (nothing proposed for it yet) ends a pause
    d = decoder()
    d.gate.pause = 5
    r = request(d, [2])
    d.propose([r], num_running=1)
    assert d.gate.open and r.spec is not None and r.spec.take_drafts(r.num_tokens) == [3, 1, 2]


def test_a_request_that_finds_nothing_closes_the_gate_until_a_probe() -> None:
    d = decoder()
    r = request(d, [9])  # 9 never occurred before
    assert r.spec is not None
    calls = 0
    while d.gate.open:  # finding nothing counts as a rejected first draft in the estimates
        d.propose([r], num_running=1)
        calls += 1
        assert calls < 10
    assert d.gate.pause == BACKOFF_START
    for _ in range(BACKOFF_START - 1):
        d.propose([r], num_running=1)
        assert not d.gate.open
    d.propose([r], num_running=1)  # the pause is over: this step is a probe (finds nothing)
    d.propose([r], num_running=1)  # still not worth it: a pause twice as long
    assert d.gate.pause == 2 * BACKOFF_START


def test_the_step_in_flight_is_read_first_only_while_someone_speculates() -> None:
    d = decoder(limit=2)
    a, b = request(d, [2]), request(d, [2])
    a.num_pending_output_tokens = b.num_pending_output_tokens = 1  # async: a token in flight
    assert d.wants_host_tokens([a, b])
    assert not d.wants_host_tokens([a, b, request(d, [2])])  # over disable_by_batch_size
    assert a.spec is not None and b.spec is not None
    d.gate.pause = 5  # speculation does not pay: the engine stays asynchronous
    assert not d.wants_host_tokens([a, b])
    b.spec.in_flight = [4]  # drafts being verified are read before b is scheduled again
    assert d.wants_host_tokens([a, b])
    a.num_pending_output_tokens = b.num_pending_output_tokens = 0
    assert not d.wants_host_tokens([a, b])  # nothing in flight: nothing to wait for

"""The scheduler under speculative decoding, alone (drafts set by hand, tokens returned by hand):
1 + k query tokens per drafting request within the budget, max_tokens and KV blocks; accepted
tokens appended one by one with stops applied in order; rejected drafts' slots rolled back; a
request whose drafts are being verified is not scheduled again; and with the real KV manager,
no block leaks and prefix-cache hashes cover verified tokens only."""

from __future__ import annotations

from compiled_llm.config import SchedulerConfig, speculative_config_from
from compiled_llm.engine.scheduler import Scheduler
from compiled_llm.kv_cache.kv_cache_manager import KVCacheManager, block_hash
from compiled_llm.request import Request, RequestStatus
from compiled_llm.spec_decode.state import SpecDecodeState
from tests.engine.test_scheduler import BLOCK, FakeKV, plan, request

K = 3


def spec_scheduler(
    kv: object | None = None, disable_by_batch_size: int | None = None, **config: object
) -> tuple[Scheduler, FakeKV]:
    kv = kv or FakeKV(100)
    defaults = dict(
        max_num_batched_tokens=32,
        max_num_seqs=4,
        max_model_len=256,
        enable_chunked_prefill=True,
        async_scheduling=False,
    )
    spec = speculative_config_from(
        {
            "method": "ngram",
            "num_speculative_tokens": K,
            "disable_by_batch_size": disable_by_batch_size,
        }
    )
    cfg = SchedulerConfig(**{**defaults, **config})  # type: ignore[arg-type]
    return Scheduler(cfg, kv, spec), kv  # type: ignore[arg-type]


def spec_request(rid: str, prompt_len: int, max_tokens: int = 20, **params: object) -> Request:
    r = request(rid, prompt_len, max_tokens=max_tokens, **params)
    r.spec = SpecDecodeState(K)
    return r


def prefill(s: Scheduler, first: int = 100) -> None:
    """Admit and prefill everything; each request samples `first`."""
    out = s.schedule()
    s.update_from_output({x.request.request_id: [first] for x in out.scheduled if x.samples})


def propose(r: Request, drafts: list[int]) -> None:
    assert r.spec is not None
    r.spec.set_drafts(drafts, r.num_tokens)


def test_drafts_are_verified_and_rejected_slots_rolled_back() -> None:
    s, kv = spec_scheduler()
    r = spec_request("r", 6)
    s.add_request(r)
    prefill(s)
    assert (r.num_tokens, r.num_computed_tokens) == (7, 6)
    propose(r, [11, 12, 13])
    out = s.schedule()
    assert plan(out) == [("r", 6, 4, True)] and out.scheduled[0].draft_token_ids == [11, 12, 13]
    assert kv.held["r"] == 3  # slots for positions 6..9
    assert r.num_computed_tokens == 7  # drafts are not counted before they are verified
    # the target agrees with the first draft only: 11 kept, 42 sampled in place of 12
    (update,) = s.update_from_output({"r": [11, 42, 13, 14]})
    assert (update.num_new_tokens, update.num_draft_tokens, update.num_accepted_tokens) == (2, 3, 1)
    assert r.output_token_ids == [100, 11, 42]
    assert r.num_computed_tokens == 8  # 100 and 11 have their KV; 42 is fed next
    assert kv.held["r"] == 2  # the block holding only rejected slots is given back
    assert r.spec is not None and r.spec.in_flight == [] and r.spec.num_accepted_tokens == 1
    # all accepted: k + 1 tokens in one step
    propose(r, [1, 2, 3])
    assert plan(s.schedule()) == [("r", 8, 4, True)]
    s.update_from_output({"r": [1, 2, 3, 4]})
    assert r.output_token_ids[-4:] == [1, 2, 3, 4] and r.num_computed_tokens == 12
    # no drafts: an ordinary decode
    assert plan(s.schedule()) == [("r", 12, 1, True)]


def test_stop_inside_the_accepted_tokens_truncates_the_rest() -> None:
    s, kv = spec_scheduler()
    r = spec_request("r", 4, stop_token_ids=[7])
    s.add_request(r)
    prefill(s)
    propose(r, [5, 7, 6])
    s.schedule()
    (update,) = s.update_from_output({"r": [5, 7, 6, 9]})  # all accepted, but 7 stops
    assert r.output_token_ids == [100, 5, 7] and update.num_new_tokens == 2
    assert r.finish_reason == "stop" and r.stop_reason == 7
    assert "r" not in kv.held and "r" not in s.requests


def test_drafts_fit_the_budget_max_tokens_and_blocks() -> None:
    # max_tokens: the step may emit drafts + 1 tokens, so 3 of 5 left allow 2 drafts
    s, _ = spec_scheduler()
    r = spec_request("r", 4, max_tokens=4)
    s.add_request(r)
    prefill(s)
    propose(r, [1, 2, 3])
    assert plan(s.schedule()) == [("r", 4, 3, True)]
    s.update_from_output({"r": [1, 2, 3]})
    assert r.finish_reason == "length" and r.output_token_ids == [100, 1, 2, 3]
    # the token budget: 2 tokens leave room for 1 draft, 1 token for none
    for budget, expected in [(2, 2), (1, 1)]:
        s, _ = spec_scheduler(max_num_batched_tokens=budget, max_model_len=budget)
        r = spec_request("r", 1)
        s.add_request(r)
        prefill(s)
        propose(r, [1, 2, 3])
        assert plan(s.schedule()) == [("r", 1, expected, True)]
    # blocks: drafts that do not fit are dropped, nobody is preempted for them
    kv = FakeKV(4)
    s, _ = spec_scheduler(kv)
    a, b = spec_request("a", 7), spec_request("b", 7)
    s.add_request(a)
    s.add_request(b)
    prefill(s)  # 2 blocks each, all 4 used; position 7 still fits in each second block
    propose(a, [1, 2, 3])
    out = s.schedule()
    assert plan(out) == [("a", 7, 1, True), ("b", 7, 1, True)] and out.num_preempted == 0


def test_a_request_being_verified_waits_for_its_results() -> None:
    """Async scheduling schedules before the previous step's tokens are read: a request whose
    drafts are in flight has an unknown next position, so it sits that step out."""
    s, _ = spec_scheduler()
    r, other = spec_request("r", 4), spec_request("other", 4)
    s.add_request(r)
    s.add_request(other)
    prefill(s)
    propose(r, [1, 2])
    assert plan(s.schedule()) == [("r", 4, 3, True), ("other", 4, 1, True)]
    assert plan(s.schedule()) == [("other", 5, 1, True)]  # r waits; other decodes a placeholder
    s.update_from_output({"r": [1, 9, 9], "other": [5]})
    # r decodes its newest token; other a placeholder for the token of the step still in flight
    assert plan(s.schedule()) == [("r", 6, 1, True), ("other", 6, 1, True)]


def test_no_drafts_above_disable_by_batch_size_or_while_prefilling() -> None:
    s, _ = spec_scheduler(disable_by_batch_size=1)
    a, b = spec_request("a", 4), spec_request("b", 4)
    s.add_request(a)
    s.add_request(b)
    prefill(s)
    propose(a, [1, 2])
    assert plan(s.schedule()) == [("a", 4, 1, True), ("b", 4, 1, True)]
    # a chunked prefill: drafts proposed for a request with tokens left to compute are not used
    s, _ = spec_scheduler(max_num_batched_tokens=4, max_model_len=64)
    r = spec_request("r", 10)
    s.add_request(r)
    propose(r, [1, 2])
    assert plan(s.schedule()) == [("r", 0, 4, False)]


def test_preempted_while_verifying_recomputes_with_the_accepted_tokens() -> None:
    kv = FakeKV(5)
    s, _ = spec_scheduler(kv)
    old, new = spec_request("old", 7, priority=0), spec_request("new", 7, priority=1)
    s.add_request(old)
    s.add_request(new)
    prefill(s)  # 2 blocks each
    propose(new, [1, 2])
    assert plan(s.schedule()) == [("old", 7, 1, True), ("new", 7, 3, True)]  # new takes a 3rd
    # old needs a 3rd block for position 8; only "new" (verifying) can give way
    s.update_from_output({"old": [5]})
    out = s.schedule()
    assert out.num_preempted == 1 and new.status is RequestStatus.PREEMPTED
    assert plan(s.schedule()) == [("old", 9, 1, True)]  # not re-admitted while verifying
    s.update_from_output({"new": [1, 2, 3]})
    assert new.output_token_ids == [100, 1, 2, 3] and new.num_computed_tokens == 0
    s.finish("old", RequestStatus.FINISHED_ABORTED)
    assert plan(s.schedule()) == [("new", 0, 11, True)]  # prompt and the 4 known outputs


def test_real_kv_cache_no_leak_and_hashes_over_verified_tokens() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK, enable_prefix_caching=True)
    s, _ = spec_scheduler(kv)
    r = spec_request("r", 5, max_tokens=30)
    s.add_request(r)
    prefill(s, first=50)
    sampled_rounds = [([60, 61, 62], [60, 99, 98, 97]), ([1, 2, 3], [1, 2, 3, 4]), ([7], [8, 9])]
    for drafts, sampled in sampled_rounds:
        propose(r, drafts)
        s.schedule()
        s.update_from_output({"r": sampled})
        blocks = kv._blocks["r"]
        assert len(blocks) == -(-r.num_computed_tokens // BLOCK)  # nothing past the need
        # every cached block's hash is the chain over the verified tokens
        parent = b"compiled-llm-prefix-root"
        tokens = r.all_token_ids
        for i, block in enumerate(blocks):
            if block.block_hash is None:
                break
            parent = block_hash(parent, tokens[i * BLOCK : (i + 1) * BLOCK])
            assert block.block_hash == parent
    assert r.output_token_ids == [50, 60, 99, 1, 2, 3, 4, 8]
    # a second request with the same verified prefix hits the cache
    twin = spec_request("twin", 5)
    twin.prompt_token_ids = r.all_token_ids[:12] + [3]
    _, hit = kv.get_computed_blocks(twin)
    assert hit == 12
    s.finish("r", RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 64

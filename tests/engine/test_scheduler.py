"""The scheduler alone, on a fake KV manager that only counts blocks: token budget, chunked
prefill, sequence slots, priorities, prefix hits, preemption, stop conditions and aborts."""

from __future__ import annotations

import itertools

import pytest

from compiled_llm.config import SchedulerConfig
from compiled_llm.engine.scheduler import Scheduler, SchedulerOutput
from compiled_llm.request import Request, RequestStatus
from compiled_llm.sampling_params import SamplingParams

BLOCK = 4


class FakeKV:
    """What the scheduler asks of a KV manager, with blocks counted instead of stored and a
    fixed cached prefix per request id."""

    def __init__(self, num_blocks: int, cached: dict[str, int] | None = None) -> None:
        self.num_blocks = num_blocks
        self.num_free_blocks = num_blocks
        self.held: dict[str, int] = {}
        self.cached = cached or {}

    def get_computed_blocks(self, request: Request) -> tuple[list[object], int]:
        n = self.cached.get(request.request_id, 0) // BLOCK
        return [object()] * n, n * BLOCK

    def allocate_slots(
        self, request: Request, num_new: int, computed: list[object] | None = None
    ) -> bool:
        total = request.num_computed_tokens + len(computed or []) * BLOCK + num_new
        need = -(-total // BLOCK) - self.held.get(request.request_id, 0)
        if need > self.num_free_blocks:
            return False
        self.num_free_blocks -= max(need, 0)
        self.held[request.request_id] = self.held.get(request.request_id, 0) + max(need, 0)
        return True

    def free(self, request: Request) -> None:
        self.num_free_blocks += self.held.pop(request.request_id, 0)

    forget = free

    def trim(self, request: Request) -> None:
        keep = -(-request.num_computed_tokens // BLOCK)
        self.num_free_blocks += self.held.get(request.request_id, 0) - keep
        self.held[request.request_id] = keep

    def usage(self) -> float:
        return 1 - self.num_free_blocks / self.num_blocks

    def prefix_cache_hit_rate(self) -> float:
        return 0.0


_arrival = itertools.count()


def request(
    rid: str, prompt_len: int, max_tokens: int = 8, priority: int = 0, **params: object
) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(10, 10 + prompt_len)),
        sampling_params=SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        max_tokens=max_tokens,
        sampling_seed=0,
        priority=priority,
        arrival_time=float(next(_arrival)),
    )


def scheduler(
    num_blocks: int = 100, cached: dict[str, int] | None = None, **config: object
) -> tuple[Scheduler, FakeKV]:
    kv = FakeKV(num_blocks, cached)
    defaults = dict(
        max_num_batched_tokens=16,
        max_num_seqs=4,
        max_model_len=256,
        enable_chunked_prefill=True,
        async_scheduling=False,
    )
    cfg = SchedulerConfig(**{**defaults, **config})  # type: ignore[arg-type]
    return Scheduler(cfg, kv), kv  # type: ignore[arg-type]


def plan(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(s.request.request_id, s.start, s.num_tokens, s.samples) for s in out.scheduled]


def run_step(s: Scheduler, token: int = 1) -> SchedulerOutput:
    """Schedule, then return a token for every request that samples (a synchronous step)."""
    out = s.schedule()
    s.update_from_output({x.request.request_id: [token] for x in out.scheduled if x.samples})
    return out


def test_chunked_prefill_under_the_token_budget() -> None:
    s, _ = scheduler()
    s.add_request(request("long", 40))
    s.add_request(request("short", 3))
    assert plan(run_step(s)) == [("long", 0, 16, False)]  # the budget, no sample yet
    assert plan(run_step(s)) == [("long", 16, 16, False)]
    # the last 8 prompt tokens sample; the rest of the budget admits "short"
    assert plan(run_step(s)) == [("long", 32, 8, True), ("short", 0, 3, True)]
    assert plan(run_step(s)) == [("long", 40, 1, True), ("short", 3, 1, True)]  # decode


def test_without_chunked_prefill_a_long_prompt_waits_its_turn() -> None:
    s, _ = scheduler(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=64)
    s.add_request(request("a", 40))
    s.add_request(request("b", 30))
    assert plan(s.schedule()) == [("a", 0, 40, True)]  # b does not fit the remaining 24


def test_max_num_seqs_and_priorities() -> None:
    s, _ = scheduler(max_num_seqs=2)
    for rid, prio in [("low", 5), ("mid", 1), ("high", -3)]:
        s.add_request(request(rid, 2, priority=prio))
    assert [x[0] for x in plan(s.schedule())] == ["high", "mid"]
    assert s.stats().num_waiting == 1 and s.stats().num_running == 2


def test_prefix_hit_starts_after_the_cached_blocks() -> None:
    s, _ = scheduler(cached={"hit": 9})  # 2 full blocks of 4 are cached
    s.add_request(request("hit", 10))
    out = s.schedule()
    assert plan(out) == [("hit", 8, 2, True)]
    assert out.scheduled[0].request.num_cached_tokens == 8


def test_preemption_frees_the_newest_and_it_recomputes() -> None:
    s, kv = scheduler(num_blocks=6, max_num_batched_tokens=32)
    s.add_request(request("old", 12, max_tokens=20))
    s.add_request(request("new", 12, max_tokens=20))
    run_step(s)  # 3 + 3 blocks: the pool is full
    assert kv.num_free_blocks == 0
    out = run_step(s)  # both need a 4th block for position 12: the newest is preempted
    assert out.num_preempted == 1 and plan(out) == [("old", 12, 1, True)]
    new = s.requests["new"]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert "new" not in kv.held and s.num_preemptions == 1
    s.finish("old", RequestStatus.FINISHED_ABORTED)
    # re-admitted: its prompt and the token it had sampled are computed again
    assert plan(s.schedule()) == [("new", 0, 13, True)]


def test_stop_conditions() -> None:
    s, _ = scheduler()
    reqs = [
        request("stop-id", 2, stop_token_ids=[7]),
        request("eos", 2),
        request("eos-ignored", 2, ignore_eos=True),
        request("min", 2, stop_token_ids=[7], min_tokens=2),
    ]
    for r in reqs:
        r.sampling_params.all_stop_token_ids = {7}
        s.add_request(r)
    run_step(s, token=7)
    assert reqs[0].finish_reason == "stop" and reqs[0].stop_reason == 7
    assert reqs[1].finish_reason == "stop" and reqs[1].stop_reason is None
    assert not reqs[2].is_finished and not reqs[3].is_finished  # ignore_eos; min_tokens=2
    run_step(s, token=7)
    assert reqs[3].finish_reason == "stop"
    assert set(s.requests) == {"eos-ignored"}


def test_length_limit_and_abort_free_blocks() -> None:
    s, kv = scheduler()
    s.add_request(request("short", 2, max_tokens=2))
    s.add_request(request("aborted", 2))
    run_step(s)
    run_step(s)
    assert s.requests.keys() == {"aborted"}
    assert kv.held.keys() == {"aborted"}
    s.finish("aborted", RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished() and kv.num_free_blocks == kv.num_blocks


def test_aborted_waiting_request_is_skipped() -> None:
    s, _ = scheduler(max_num_seqs=1)
    s.add_request(request("first", 2))
    s.add_request(request("gone", 2))
    s.add_request(request("third", 2))
    s.schedule()
    s.finish("gone", RequestStatus.FINISHED_ABORTED)
    s.finish("first", RequestStatus.FINISHED_ABORTED)
    assert [x[0] for x in plan(s.schedule())] == ["third"]


@pytest.mark.parametrize("max_tokens", [1, 3])
def test_async_steps_schedule_placeholders_up_to_max_tokens(max_tokens: int) -> None:
    """Scheduled again before a step's token is known (async scheduling), a request decodes
    placeholders for the tokens in flight, one per step, and never past max_tokens."""
    s, _ = scheduler()
    s.add_request(request("r", 3, max_tokens=max_tokens))
    steps = [plan(s.schedule()) for _ in range(max_tokens + 1)]
    assert steps[0] == [("r", 0, 3, True)]
    assert steps[1:max_tokens] == [[("r", 3 + i, 1, True)] for i in range(max_tokens - 1)]
    assert steps[max_tokens] == []  # every token it may produce is in flight
    s.update_from_output({"r": [5]})
    if max_tokens == 1:
        assert s.requests.get("r") is None  # finished by length
    else:
        assert s.requests["r"].output_token_ids == [5]


def test_a_compiling_grammar_waits_in_place_and_a_failed_one_finishes() -> None:
    """A request whose grammar still compiles keeps its place while later ones run; once
    compiled it is admitted; one whose grammar failed ends with "error" and is reported once,
    and its matcher is released."""
    from compiled_llm.structured_output.manager import RequestGrammar

    class Manager:  # compile results arrive by setting the handles' fields below
        def __init__(self) -> None:
            self.released: list[int] = []

        def poll(self) -> None:
            pass

        def release(self, grammar: RequestGrammar) -> None:
            self.released.append(grammar.key)

    s, kv = scheduler(max_num_batched_tokens=64)
    manager = Manager()
    slow, other, broken = request("slow", 4), request("other", 4), request("broken", 4)
    slow.grammar = RequestGrammar(manager, 1)  # type: ignore[arg-type]
    broken.grammar = RequestGrammar(manager, 2)  # type: ignore[arg-type]
    broken.grammar.error = "structured_outputs: the grammar failed to compile: bad grammar"
    for r in (slow, other, broken):
        s.add_request(r)
    out = s.schedule()
    assert plan(out) == [("other", 0, 4, True)]
    assert s.compiling == [slow.grammar]
    assert s.finished_unscheduled == [broken] and broken.status is RequestStatus.FINISHED_ERROR
    assert "compile" in str(broken.stop_reason) and "broken" not in kv.held
    assert manager.released == [2]
    slow.grammar.compiled = True
    out = s.schedule()
    assert ("slow", 0, 4, True) in plan(out) and s.compiling == []

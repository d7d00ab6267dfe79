"""Prometheus metrics for /metrics: request outcomes, token counts, latency histograms (frontend
clock), the scheduler's gauges (from each step's SchedulerStatsMsg), and speculative decoding's
counters (vLLM's spec_decode names, under our prefix).

Each server has its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from compiled_llm.engine.messages import SchedulerStatsMsg

PREFIX = "compiled_llm:"
_TTFT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
_E2E_BUCKETS: tuple[float, ...] = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)
OUTCOMES = ("stop", "length", "abort", "error", "rejected")


class ServerMetrics:
    """Implements async_llm.EngineMetrics; `render()` is the /metrics body."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, list(labels), registry=self.registry).labels(
                **labels
            )

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, list(labels), registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            family = Histogram(
                PREFIX + name, doc, list(labels), buckets=buckets, registry=self.registry
            )
            return family.labels(**labels)

        requests = Counter(
            PREFIX + "requests",
            "Finished requests by outcome.",
            [*labels, "outcome"],
            registry=self.registry,
        )
        self.requests = {o: requests.labels(**labels, outcome=o) for o in OUTCOMES}
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between token arrivals.", _ITL_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _E2E_BUCKETS)
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests queued in the core.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.free_blocks = gauge("kv_cache_free_blocks", "Free KV-cache blocks.")
        self.total_blocks = gauge("kv_cache_total_blocks", "KV-cache blocks in all.")
        self.hit_rate = gauge("prefix_cache_hit_rate", "Prefix-cache hit rate (0-1).")
        self.preemptions = gauge("num_preemptions", "Preemptions since start.")
        self.spec_drafts = counter(
            "spec_decode_num_drafts", "Verification steps of a request that carried drafts."
        )
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted."
        )
        self._spec_per_pos = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by their position in the step's drafts (0: first).",
            [*labels, "position"],
            registry=self.registry,
        )
        self._labels = labels
        self._gauges = [
            self.running,
            self.waiting,
            self.kv_usage,
            self.free_blocks,
            self.total_blocks,
            self.hit_rate,
            self.preemptions,
        ]

    # --- EngineMetrics --------------------------------------------------------------------------
    def on_step(self, stats: SchedulerStatsMsg) -> None:
        values = (
            stats.num_running,
            stats.num_waiting,
            stats.kv_cache_usage,
            stats.num_free_blocks,
            stats.num_total_blocks,
            stats.prefix_cache_hit_rate,
            stats.num_preemptions,
        )
        for gauge, value in zip(self._gauges, values):
            gauge.set(value)
        spec = stats.spec_decode
        if spec is not None:
            self.spec_drafts.inc(spec.num_drafts)
            self.spec_draft_tokens.inc(spec.num_draft_tokens)
            self.spec_accepted_tokens.inc(spec.num_accepted_tokens)
            for position, n in enumerate(spec.num_accepted_tokens_per_pos):
                self._spec_per_pos.labels(**self._labels, position=str(position)).inc(n)

    def on_request_added(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, num_new: int, ttft: float | None, itl: float | None) -> None:
        self.generation_tokens.inc(num_new)
        if ttft is not None:
            self.ttft.observe(ttft)
        if itl is not None:
            self.itl.observe(itl)

    def on_request_done(self, outcome: str, e2e: float) -> None:
        self.requests.get(outcome, self.requests["error"]).inc()
        if outcome in ("stop", "length"):
            self.e2e.observe(e2e)

    # --- server-side outcomes -------------------------------------------------------------------
    def on_rejected(self) -> None:
        self.requests["rejected"].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

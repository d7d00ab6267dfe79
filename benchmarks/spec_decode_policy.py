"""Speculative decoding's adaptivity, simulated: the engine's own decisions
(compiled_llm/spec_decode: SpeculativeDecoder.propose with its step gate, each request's
acceptance estimates and adaptive k) on requests whose drafts are accepted with a set per-token
probability, under a step-cost model fitted to the H200, instead of a model. What it answers in
a second on any machine: how the rules turn a per-token acceptance into a speedup, at each batch
size, before a GPU run confirms it.

Cost model, in decode steps without drafts (the H200 runs of 2026-12-03/04, Llama-3.1-8B shape,
batch 1 and 8: benchmarks/results/h200/spec_decode-*-20261203-2354*.json, -20261204-00*.json):
a step in which any request verifies drafts costs 1 + --step-overhead (the synchronous step and
the acceptance: ~0.22 on Triton, ~0.35 on FlashInfer), plus --draft-cost per draft. n-gram and
the oracle verify drafts in the target's forward (~0.01 per draft per request at batch <= 8:
--draft-cost-per token, the mean over the batch); a draft model runs as many of its own steps as
the most drafts any request asked for (~0.45 each for a 1B draft: --draft-cost-per step, the
batch's maximum). Every request generates --tokens tokens; the batch runs until the last one
ends, as in benchmarks/spec_decode.py's oracle workload, whose speedups it reproduces.

  python benchmarks/spec_decode_policy.py
  python benchmarks/spec_decode_policy.py --method draft_model --draft-cost 0.45 \\
      --draft-cost-per step --accept-probs 0,0.5,0.8,1
"""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

from compiled_llm.config import DEFAULT_DRAFT_TOKEN_COSTS, speculative_config_from
from compiled_llm.request import Request, RequestStatus
from compiled_llm.sampling_params import SamplingParams
from compiled_llm.spec_decode.decoder import SpeculativeDecoder


class _Drafts:
    """A proposer whose drafts are placeholders: whether each is accepted is drawn later."""

    def propose(self, requests: list[Any], max_drafts: list[int]) -> list[list[int]]:
        return [[0] * k for k in max_drafts]


def simulate(
    accept: float,
    batch: int,
    k: int,
    token_cost: float,
    overhead: float,
    draft_cost: float,
    per_step: bool,
    tokens: int,
    seed: int,
) -> float:
    """Speedup of one batch over plain decoding (which takes `tokens` steps of cost 1)."""
    rng = random.Random(seed)
    config = speculative_config_from(
        {
            "method": "ngram",
            "num_speculative_tokens": k,
            "draft_token_cost": token_cost,
            "disable_by_batch_size": None,
        }
    )
    assert config is not None
    decoder = SpeculativeDecoder(config, proposer=_Drafts())
    requests = []
    for i in range(batch):
        r = Request(str(i), [1], SamplingParams(max_tokens=tokens), tokens, 0)
        r.status, r.spec, r.output_token_ids = RequestStatus.RUNNING, decoder.new_state(), [0]
        requests.append(r)
    decoder.propose(requests, num_running=batch)  # after the prefill's first token
    cost = 0.0
    while requests:
        drafts = []
        for r in requests:
            assert r.spec is not None
            drafts.append(len(r.spec.take_drafts(r.num_tokens)))
        if any(drafts):
            extra = max(drafts) if per_step else sum(drafts) / len(requests)
            cost += 1 + overhead + draft_cost * extra
        else:
            cost += 1
        for r, n in zip(requests, drafts):
            accepted = 0
            while accepted < n and rng.random() < accept:
                accepted += 1
            assert r.spec is not None
            r.spec.on_verified(n, accepted)
            r.output_token_ids += [0] * (1 + accepted)
        requests = [r for r in requests if len(r.output_token_ids) < tokens]
        decoder.propose(requests, num_running=len(requests))
    return (tokens - 1) / cost


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--method",
        default="ngram",
        choices=sorted(DEFAULT_DRAFT_TOKEN_COSTS),
        help="whose default draft_token_cost the engine's rules use (they are the same otherwise)",
    )
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--accept-probs", default="0,0.1,0.3,0.5,0.8,1")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument(
        "--draft-token-cost",
        type=float,
        default=None,
        help="speculative_config's price of a draft (default: the method's engine default)",
    )
    p.add_argument(
        "--step-overhead",
        type=float,
        default=0.22,
        help="true extra cost of a verifying step, in decode steps (FlashInfer: ~0.35)",
    )
    p.add_argument("--draft-cost", type=float, default=0.01, help="true cost of a draft")
    p.add_argument(
        "--draft-cost-per",
        choices=("token", "step"),
        default="token",
        help="token: drafts cost their mean per request (n-gram); step: the batch's longest "
        "proposal (a draft model)",
    )
    p.add_argument("--tokens", type=int, default=256, help="generated per request")
    p.add_argument("--seeds", type=int, default=5, help="runs per point (mean)")
    args = p.parse_args(argv)
    token_cost = args.draft_token_cost
    if token_cost is None:
        token_cost = DEFAULT_DRAFT_TOKEN_COSTS[args.method]
    probs = [float(x) for x in args.accept_probs.split(",")]
    print(
        f"draft_token_cost {token_cost}, k {args.k}; cost model: a verifying step "
        f"1 + {args.step_overhead} + {args.draft_cost} per draft ({args.draft_cost_per})"
    )
    print("batch | " + " | ".join(f"p={a:g}" for a in probs))
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        row = []
        for a in probs:
            runs = [
                simulate(
                    a,
                    b,
                    args.k,
                    token_cost,
                    args.step_overhead,
                    args.draft_cost,
                    args.draft_cost_per == "step",
                    args.tokens,
                    seed,
                )
                for seed in range(args.seeds)
            ]
            row.append(f"{statistics.mean(runs):.2f}x")
        print(f"{b:5d} | " + " | ".join(row))


if __name__ == "__main__":
    main()

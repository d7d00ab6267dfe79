"""Speculative decoding's adaptivity, simulated: the engine's own per-request state machine
(compiled_llm/spec_decode/state.py: back-off, acceptance estimate, adaptive k) driven by drafts
accepted with a set per-token probability, and a step-cost model fitted to the H200, instead of
a model. What it answers in a second on any machine: how the back-off and k rules turn a
per-token acceptance into a speedup, at each batch size, before a GPU run confirms it.

Cost model, in decode steps without drafts (the H200 runs of 2026-12-03, Llama-3.1-8B shape,
batch 1 and 8: benchmarks/results/h200/spec_decode-*-20261203-2354*.json, -20261204-0011*.json):
a step in which any request verifies drafts costs 1 + --step-overhead (the synchronous step and
the acceptance: ~0.22), plus --draft-cost per draft. n-gram and the oracle verify drafts in the
target's forward (~0.01 per draft per request at batch <= 8: --draft-cost-per token, the mean
over the batch); a draft model runs as many of its own steps as the most drafts any request
asked for (~0.45 each for a 1B draft: --draft-cost-per step, the batch's maximum). Every request
generates --tokens tokens; the batch runs until the last one ends, as in
benchmarks/spec_decode.py's oracle workload, whose measured speedups it should reproduce.

  python benchmarks/spec_decode_policy.py
  python benchmarks/spec_decode_policy.py --method draft_model --draft-cost 0.45 \\
      --draft-cost-per step --accept-probs 0,0.5,0.8,1
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compiled_llm.config import DEFAULT_DRAFT_TOKEN_COSTS  # noqa: E402
from compiled_llm.spec_decode.state import SpecDecodeState  # noqa: E402


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
    states = [SpecDecodeState(k, draft_token_cost=token_cost) for _ in range(batch)]
    left = [tokens] * batch
    cost = 0.0
    while any(n > 0 for n in left):
        live = [i for i in range(batch) if left[i] > 0]
        # as SpeculativeDecoder.propose: active requests ask for their k, capped by their room
        wanted = {
            i: min(states[i].num_drafts_wanted(), left[i] - 1) if states[i].active else 0
            for i in live
        }
        drafts = [n for n in wanted.values() if n > 0]
        if drafts:
            extra = max(drafts) if per_step else sum(drafts) / len(live)
            cost += 1 + overhead + draft_cost * extra
        else:
            cost += 1
        for i in live:
            n = wanted[i]
            accepted = 0
            while accepted < n and rng.random() < accept:
                accepted += 1
            states[i].on_verified(n, accepted)
            left[i] -= 1 + accepted
    return tokens / cost


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--method", default="ngram", choices=sorted(DEFAULT_DRAFT_TOKEN_COSTS))
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--accept-probs", default="0,0.1,0.3,0.5,0.8,1")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument(
        "--draft-token-cost",
        type=float,
        default=None,
        help="speculative_config's price of a draft (default: the method's engine default)",
    )
    p.add_argument("--step-overhead", type=float, default=0.22)
    p.add_argument("--draft-cost", type=float, default=0.01, help="true cost of a draft")
    p.add_argument("--draft-cost-per", choices=("token", "step"), default="token")
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

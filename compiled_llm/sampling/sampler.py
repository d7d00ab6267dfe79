"""Batched sampling on the device, without host syncs.

Everything per request (temperature, top-k/p, min-p, penalties, seeds) arrives as tensors built
once per step on the host (`SamplingBatch`); the sampler is a fixed sequence of tensor ops.

Random choice uses the exponential race: argmax(p / E) with E ~ Exp(1) draws from p. For a
seeded request E comes from a counter-based hash of (seed, output index, token id), so its samples
do not depend on batch composition, preemption or device — a seeded run repeats exactly.

Speculative decoding's textbook acceptance (`rejection_sampling`) needs draws independent of the
target's own: the draft samples from stream DRAFT_STREAM and the acceptance test draws from
ACCEPT_STREAM, each a separate function of (seed, output index); the target's draws (the bonus
token, a rejected draft's replacement) stay on stream 0, the noise of a step without drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


# Noise streams (seeded_uniform's `stream`): 0 is the sampler's own.
DRAFT_STREAM = 1  # a draft model's drafts under rejection_sampling
ACCEPT_STREAM = 2  # the acceptance test of rejection_sampling


def seeded_uniform(
    seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int, stream: int = 0
) -> torch.Tensor:
    """[B, V] uniforms in (0, 1), a pure function of (seed, step, token id); another `stream`
    gives another function (as if from another seed; stream 0 is the original)."""
    seed = _fmix32(seeds & _MASK32)
    if stream:
        seed = _fmix32(seed ^ ((stream * 0x5BD1E995) & _MASK32))
    row = _fmix32((seed + steps * 0x9E3779B1) & _MASK32)
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) * 0x7FEB352D
    x = _fmix32((row[:, None] + cols[None, :]) & _MASK32)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for one step, as device tensors (rows = sampled requests)."""

    temperature: torch.Tensor  # [B] float32; rows with 0 are greedy
    top_k: torch.Tensor  # [B] int64; vocab_size where off
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: index of the token being sampled in the request's output
    seeded_rows: torch.Tensor | None  # [S] int64: rows that draw noise from `seeds`
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    # Penalties (None when no row uses any)
    presence_penalty: torch.Tensor | None = None  # [B]
    frequency_penalty: torch.Tensor | None = None  # [B]
    repetition_penalty: torch.Tensor | None = None  # [B]
    output_token_ids: torch.Tensor | None = None  # [B, L] int64, padded with vocab_size
    prompt_token_ids: torch.Tensor | None = None  # [B, P] int64, padded with vocab_size
    # (row, token, ban) triples: the token is banned where `ban` is true (stop tokens before
    # min_tokens always; bad_words decided on the device, as they may depend on the token the
    # previous step is still sampling)
    banned: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # logit_bias: (row, token, bias) triples; allowed_token_ids: (row, token) pairs, and every
    # other token of those rows is masked (None when no row has any)
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None
    max_num_logprobs: int = -1  # -1: no row asked for logprobs
    # Structured outputs: allowed next tokens of the rows that have a grammar, filled on the host
    # after the forward was launched (EngineCore.step)
    # [B, ceil(V / 32)] int32, bit t of row i allows token t; all ones in rows without a grammar
    token_bitmask: torch.Tensor | None = None
    # The seeded noise's stream (DRAFT_STREAM: a draft model sampling under rejection_sampling)
    noise_stream: int = 0
    # Speculative decoding with rejection_sampling: the rows that verify a draft sampled from a
    # distribution q, the draft at each and q's row (the draft sampler's normalized probs).
    # Rows without (ngram, coupled, bonus rows) keep the ordinary draw.
    draft_rows: torch.Tensor | None = None  # [D] int64
    draft_token_ids: torch.Tensor | None = None  # [D] int64
    draft_probs: torch.Tensor | None = None  # [D, V] float32


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    # With logprobs: top-k ids/logprobs [B, K], and the sampled token's logprob and rank [B].
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    sampled_logprobs: torch.Tensor | None = None
    sampled_ranks: torch.Tensor | None = None


def _token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(ids.shape[0], vocab_size + 1, device=ids.device, dtype=torch.float32)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.output_token_ids is None:
        return logits
    assert b.presence_penalty is not None and b.frequency_penalty is not None
    assert b.repetition_penalty is not None and b.prompt_token_ids is not None
    vocab = logits.shape[1]
    out_counts = _token_counts(b.output_token_ids, vocab)
    seen = (out_counts + _token_counts(b.prompt_token_ids, vocab)) > 0
    rep = b.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - b.frequency_penalty[:, None] * out_counts
    return logits - b.presence_penalty[:, None] * (out_counts > 0).float()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` with every token the bitmask disallows set to -inf, in place (rows without a
    grammar come as all ones). Plain tensor ops, the same on CPU and CUDA, with no host sync and
    no kernel to build at the first structured request; in place over every row, no gather and
    index_put of the grammar rows. Against xgrammar's own kernel and that former form:
    `benchmarks/structured_output.py --host-only` (docs/structured_output.md)."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[1]]
    return logits.masked_fill_(~allowed, float("-inf"))


def apply_allowed_and_bias(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """allowed_token_ids (the rows that list some keep only those) and logit_bias (added)."""
    if b.allowed is not None:
        rows, ids = b.allowed
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[rows, ids] = True
        limited = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        limited[rows] = True
        logits = logits.masked_fill(limited[:, None] & ~keep, float("-inf"))
    if b.logit_bias is not None:
        rows, ids, bias = b.logit_bias
        logits = logits.index_put((rows, ids), bias.to(logits.dtype), accumulate=True)
    return logits


def _apply_top_k_top_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[1]
    if b.any_top_k:
        # keep the k largest: positions >= vocab - k in ascending order
        kth = sorted_logits.gather(1, (vocab - b.top_k).clamp(0, vocab - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if b.any_top_p:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = cum <= (1.0 - b.top_p[:, None])
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def token_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `logprobs` [N, vocab]: the ids and logprobs of its k most likely tokens, and
    the logprob and rank (1: the most likely) of `token_ids` [N]."""
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    return top_ids, top_logprobs, chosen[:, 0], ranks


class Sampler:
    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        return self._sample(logits, b)[0]

    def sample_with_probs(
        self, logits: torch.Tensor, b: SamplingBatch
    ) -> tuple[SamplerOutput, torch.Tensor]:
        """The draw and, per row, the normalized distribution it was drawn from (after
        penalties, temperature, top-k/p and min-p; meaningless for greedy rows): a draft model's
        q under rejection_sampling. Assumes a batch that is not all greedy."""
        out, probs = self._sample(logits, b, want_probs=True)
        assert probs is not None
        return out, probs / probs.sum(dim=-1, keepdim=True)

    def _sample(
        self, logits: torch.Tensor, b: SamplingBatch, want_probs: bool = False
    ) -> tuple[SamplerOutput, torch.Tensor | None]:
        # The grammar mask comes first, as in vLLM: logprobs, penalties, temperature and
        # top-k/p all see the constrained distribution.
        if b.token_bitmask is not None:
            logits = apply_token_bitmask(logits, b.token_bitmask)
        raw_logprobs = logits.log_softmax(dim=-1) if b.max_num_logprobs >= 0 else None
        logits = apply_allowed_and_bias(logits, b)
        logits = apply_penalties(logits, b)
        if b.banned is not None:
            rows, ids, ban = b.banned
            # accumulate: a (row, token) pair listed twice (two words ending alike, or a stop
            # token that is also a bad word) is banned if either ban holds
            penalty = torch.zeros(ban.shape, dtype=logits.dtype, device=logits.device)
            penalty = penalty.masked_fill(ban, float("-inf"))
            logits = logits.index_put((rows, ids), penalty, accumulate=True)
        greedy = logits.argmax(dim=-1)
        probs = None
        if b.all_greedy and not want_probs:
            token_ids = greedy
        else:
            probs = self._probs(logits, b)
            noise = self._noise(probs, b)
            token_ids = torch.where(b.temperature == 0, greedy, (probs / noise).argmax(dim=-1))
            if b.draft_rows is not None:
                token_ids = self._verify_drafts(token_ids, probs, noise, b)
        return self._with_logprobs(token_ids, raw_logprobs, b), probs

    @staticmethod
    def _probs(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """What a random row draws from: proportional to its distribution after temperature,
        top-k/p and min-p (min-p's rows not renormalized)."""
        temperature = torch.where(b.temperature == 0, torch.ones_like(b.temperature), b.temperature)
        logits = logits / temperature[:, None]
        if b.any_top_k or b.any_top_p:
            logits = _apply_top_k_top_p(logits, b)
        probs = logits.softmax(dim=-1)
        if b.any_min_p:
            keep = probs >= b.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs * keep
        return probs

    @staticmethod
    def _noise(probs: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """E ~ Exp(1) per row and token: counter-based for seeded rows, torch's otherwise."""
        noise = torch.empty_like(probs).exponential_()
        if b.seeded_rows is not None:
            seeds, steps = b.seeds[b.seeded_rows], b.steps[b.seeded_rows]
            u = seeded_uniform(seeds, steps, probs.shape[1], b.noise_stream)
            noise[b.seeded_rows] = -torch.log(u)
        # A draw of exactly 0 (u rounding to 1 in float32: about 2**-24 per token) made
        # 0 / 0 = NaN for a token of probability 0, which argmax then picked: a token that
        # top-k/p, min-p or a grammar had ruled out.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)

    @staticmethod
    def _verify_drafts(
        token_ids: torch.Tensor, probs: torch.Tensor, noise: torch.Tensor, b: SamplingBatch
    ) -> torch.Tensor:
        """Rejection sampling of the drafts in `b.draft_rows` (random rows only; greedy rows
        keep the argmax, whose match is greedy acceptance): the row's token becomes the draft x
        with probability min(1, p(x) / q(x)) (a uniform of ACCEPT_STREAM), else a draw from the
        normalized residual max(0, p - q) with the row's own noise (stream 0). The host keeps
        drafts while the row tokens equal them (spec_decode.state.num_accepted), so the first
        rejection ends the step with its resampled token, which is never the draft (the residual
        is 0 there when p(x) < q(x)), and a step whose drafts are all accepted ends with the
        bonus row's ordinary draw from p. Rows of a request after its first rejection are
        computed and ignored. All vectorized, no host sync."""
        assert b.draft_token_ids is not None and b.draft_probs is not None
        rows, drafts, q = b.draft_rows, b.draft_token_ids, b.draft_probs
        assert rows is not None
        p = probs[rows]
        p = p / p.sum(dim=-1, keepdim=True)
        p_x = p.gather(1, drafts[:, None])[:, 0]
        q_x = q.gather(1, drafts[:, None])[:, 0]
        u = seeded_uniform(b.seeds[rows], b.steps[rows], 1, ACCEPT_STREAM)[:, 0]
        # u < p(x) / q(x) without dividing by q(x); a token p rules out is never kept
        accept = (u * q_x <= p_x) & (p_x > 0)
        residual = (p - q).clamp_(min=0)
        # p and q equal up to rounding leave no residual: draw from p (never reached in exact
        # arithmetic, where p(x) >= q(x) for every x then and the draft is accepted)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
        resampled = (residual / noise[rows]).argmax(dim=-1)
        chosen = torch.where(accept, drafts, resampled)
        chosen = torch.where(b.temperature[rows] == 0, token_ids[rows], chosen)
        return token_ids.index_put((rows,), chosen)

    @staticmethod
    def _with_logprobs(
        token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, b: SamplingBatch
    ) -> SamplerOutput:
        if raw_logprobs is None:
            return SamplerOutput(token_ids=token_ids)
        topk_ids, topk_logprobs, sampled, ranks = token_logprobs(
            raw_logprobs, token_ids, max(b.max_num_logprobs, 0)
        )
        return SamplerOutput(
            token_ids=token_ids,
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
            sampled_logprobs=sampled,
            sampled_ranks=ranks,
        )

"""`eagle3` speculative decoding on tiny CPU models: a head in the published checkpoint layout
written here (eagle3_head.py) loads; its drafts are, at every proposal, those of a float64
reference that feeds it the target's hidden states from transformers (through chunked prefill,
preemption and prefix hits: a stale or misplaced hidden state or KV entry changes them); greedy
and seeded outputs are those of the same engine without speculation, with drafts accepted and
rejected, in mixed batches with stop strings; -O1 equals eager; bad configurations are refused
naming the field. The sampled distribution is tested at sampler level with a draft vocabulary
smaller than the target's (test_draft_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiled_llm import LLM, SamplingParams
from compiled_llm.config import EngineArgs
from compiled_llm.engine.eagle_proposer import Eagle3Proposer
from tests.spec_decode.conftest import permutation
from tests.spec_decode.eagle3_head import LAYER_IDS, reference_drafts, write_head
from tests.spec_decode.test_draft_model import PROMPTS
from tests.spec_decode.test_spec_engine import acceptance, same_outputs

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory, cycle_model: Path) -> dict[str, Path]:
    """A random head, and one that follows the cycle model (its first draft mostly right)."""
    root = tmp_path_factory.mktemp("eagle3")
    return {
        "random": write_head(root / "random", cycle_model),
        "follow": write_head(root / "follow", cycle_model, follow=permutation()),
    }


def spec(head: Path, k: int = 3, **extra: object) -> dict:
    return {"method": "eagle3", "model": str(head), "num_speculative_tokens": k, **extra}


def engine(
    path: Path, head: Path | None = None, acceptance: str | None = None, **kwargs: object
) -> LLM:
    """`acceptance`: speculative_config.acceptance_method (None: the default)."""
    args: dict = dict(max_model_len=256, enforce_eager=True, skip_tokenizer_init=True)
    args.update(kwargs)
    extra = {"acceptance_method": acceptance} if acceptance else {}
    return LLM(str(path), speculative_config=spec(head, **extra) if head else None, **args)


def run(llm: LLM, params, prompts=PROMPTS):  # noqa: ANN001
    free = llm.engine.num_free_blocks
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.num_free_blocks == free  # no KV block leaks
    return outs


# --- configuration and loading -------------------------------------------------------------------
def test_config_and_loading(cycle_model, heads, tmp_path, embedded_tokenizer_dir) -> None:
    config = EngineArgs(model=str(cycle_model), speculative_config=spec(heads["random"], 4))
    s = config.create_config().speculative_config
    assert s is not None and s.method == "eagle3" and s.num_speculative_tokens == 4
    assert s.eagle_aux_hidden_state_layer_ids == tuple(LAYER_IDS)
    assert s.draft_model_config is not None and s.draft_model_config.num_layers == 1

    llm = engine(cycle_model, heads["random"])
    runner = llm.engine.core.runner
    head = runner.draft.model
    from safetensors.torch import load_file

    saved = load_file(heads["random"] / "model.safetensors")
    assert head.fc.weight.equal(saved["fc.weight"])
    assert head.midlayer.self_attn.q_proj.weight.equal(saved["midlayer.self_attn.q_proj.weight"])
    assert head.midlayer.hidden_norm.weight.equal(saved["midlayer.hidden_norm.weight"])
    assert head.lm_head.weight.shape == (48, 64)
    kept = saved["t2d"].nonzero().flatten()
    assert head.draft_to_target.tolist() == kept.tolist()  # i + d2t[i]
    assert head.embed_tokens is runner.model.model.embed_tokens  # shared: the head has none
    assert isinstance(llm.engine.core.spec.proposer, Eagle3Proposer)


def test_default_layer_ids_and_bad_configs(cycle_model, heads, tmp_path) -> None:
    # EAGLE-3's default (2, L // 2, L - 3), for a 6-layer target (config only: dummy weights)
    deep = json.loads((cycle_model / "config.json").read_text())
    deep["num_hidden_layers"] = 6
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "config.json").write_text(json.dumps(deep))
    plain = write_head(tmp_path / "plain", cycle_model, layer_ids=None)
    config = EngineArgs(
        model=str(tmp_path / "deep"), load_format="dummy", speculative_config=spec(plain)
    ).create_config()
    assert config.speculative_config.eagle_aux_hidden_state_layer_ids == (2, 3, 3)

    def refused(match: str, model: Path = cycle_model, **kwargs: object) -> None:
        with pytest.raises(ValueError, match=match):
            EngineArgs(model=str(model), **kwargs).create_config()

    refused("eagle_aux_hidden_state_layer_ids=\\[2, 1, -1\\]", speculative_config=spec(plain))
    refused("speculative_config.model is required", speculative_config=spec(plain, model=None))
    refused("speculative_config.model: ", speculative_config=spec(tmp_path / "missing"))
    wide = write_head(tmp_path / "wide", cycle_model, target_hidden_size=32)
    refused(
        "hidden size 32 .its target_hidden_size.*the target has 64", speculative_config=spec(wide)
    )
    refused("not an EAGLE-3 head", speculative_config=spec(cycle_model))
    odd = write_head(tmp_path / "odd", cycle_model, norm_before_residual=True)
    refused("norm_before_residual=true", speculative_config=spec(odd))
    refused("is an EAGLE-3 draft head", model=heads["random"])
    refused(
        "speculative_config.method='eagle3' with tensor_parallel_size > 1",
        speculative_config=spec(heads["random"]),
        tensor_parallel_size=2,
    )


# --- the drafts are the head's, fed the target's states ------------------------------------------
@pytest.mark.parametrize("head", ["random", "follow"])
def test_drafts_match_reference(cycle_model, heads, head, monkeypatch) -> None:
    """Every proposal, for greedy requests, equals the float64 reference's drafts for the
    request's tokens at that moment, through chunked catch-up (max_num_batched_tokens 16),
    preemption (a small KV cache), a prefix hit, and drafts accepted (the following head) and
    rejected."""
    proposals: list[tuple[list[int], list[int]]] = []
    original = Eagle3Proposer.propose

    def recording(self, requests, max_drafts):  # noqa: ANN001, ANN202
        out = original(self, requests, max_drafts)
        for r, drafts in zip(requests, out):
            if drafts:
                proposals.append((list(r.all_token_ids), drafts))
        return out

    monkeypatch.setattr(Eagle3Proposer, "propose", recording)
    kwargs = dict(
        num_gpu_blocks_override=24, block_size=4, max_num_batched_tokens=16, max_model_len=96
    )
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = run(engine(cycle_model, **kwargs), params)
    llm = engine(cycle_model, heads[head], **kwargs)
    outs = run(llm, params)
    same_outputs(expected, outs)
    assert llm.engine.core.scheduler.num_preemptions > 0
    again = run(llm, params, PROMPTS[2:3])[0]  # a prefix hit
    assert again.num_cached_tokens > 0
    drafted, accepted = acceptance(outs)
    if head == "follow":
        assert 0.2 * drafted < accepted < drafted
    assert len(proposals) > 10
    for tokens, drafts in proposals:
        assert drafts == reference_drafts(heads[head], cycle_model, tokens, len(drafts))


# --- exactness end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(cycle_model):  # noqa: ANN001
    return run(engine(cycle_model, skip_tokenizer_init=False), MIXED)


MIXED = [
    GREEDY,
    SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),  # never speculates
    SamplingParams(temperature=1.0, top_k=8, seed=3, max_tokens=24, min_tokens=8),
]


@pytest.mark.parametrize("head", ["random", "follow"])
def test_mixed_batch_identical(cycle_model, heads, baseline, head) -> None:
    """Greedy and seeded requests beside one that never speculates, chunked prefill: the same
    tokens and logprobs as without speculation (acceptance_method coupled)."""
    llm = engine(
        cycle_model,
        heads[head],
        "coupled",
        skip_tokenizer_init=False,
        max_num_batched_tokens=24,
    )
    outs = run(llm, MIXED)
    same_outputs(baseline, outs)
    drafted, accepted = acceptance(outs)
    assert drafted > 0 and (accepted > 0 if head == "follow" else True)


def test_rejection_sampling_keeps_greedy_and_repeats_seeded(cycle_model, heads, baseline) -> None:
    """The default rule (rejection_sampling): greedy requests emit what they emit without
    speculation, seeded ones the same tokens on every run (here a second run of the same
    engine, with prefix hits), and drafts are accepted."""
    llm = engine(cycle_model, heads["follow"], skip_tokenizer_init=False)
    outs = run(llm, MIXED)
    same_outputs([baseline[0], baseline[2]], [outs[0], outs[2]])
    same_outputs(outs, run(llm, MIXED))
    assert acceptance(outs)[1] > 0


def test_stop_string(cycle_model, heads, baseline) -> None:
    text = baseline[0].outputs[0].text
    assert len(text) > 12
    stopped = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[text[8:11]])
    expected = run(engine(cycle_model, skip_tokenizer_init=False), stopped, PROMPTS[:1])
    assert expected[0].outputs[0].finish_reason == "stop"
    llm = engine(cycle_model, heads["follow"], skip_tokenizer_init=False)
    outs = run(llm, stopped, PROMPTS[:1])
    same_outputs(expected, outs)
    assert outs[0].outputs[0].text == expected[0].outputs[0].text


@pytest.mark.slow
def test_compiled_equals_eager(cycle_model, heads) -> None:
    """-O1: the target's forward with its layer taps and the head are compiled; the outputs and
    the number of accepted drafts are the eager engine's."""
    eager = run(engine(cycle_model, heads["follow"]), GREEDY)
    llm = engine(cycle_model, heads["follow"], enforce_eager=False, compilation_level=1)
    runner = llm.engine.core.runner
    assert runner.compiled is not None and runner.draft.compiled is not None
    outs = run(llm, GREEDY)
    same_outputs(eager, outs)
    assert acceptance(outs) == acceptance(eager) and acceptance(outs)[1] > 0


def test_a_tiny_target_without_speculation_is_untouched(cycle_model) -> None:
    """No head: the runner compiles and runs the model's own forward."""
    runner = engine(cycle_model).engine.core.runner
    assert runner.aux_hidden is None and runner.forward_module is runner.model

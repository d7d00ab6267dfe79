"""speculative_config: vLLM's keys in, a typed frozen SpeculativeConfig out, bad values refused
with a ValueError naming the key, and the CLI's --speculative-config JSON."""

from __future__ import annotations

import pytest

from compiled_llm.cli import build_parser
from compiled_llm.cli.args import engine_kwargs
from compiled_llm.config import (
    DEFAULT_DRAFT_TOKEN_COSTS,
    EngineArgs,
    SpeculativeConfig,
    speculative_config_from,
)


def test_ngram_with_defaults() -> None:
    config = speculative_config_from({"method": "ngram", "num_speculative_tokens": 4})
    assert config == SpeculativeConfig(
        method="ngram",
        num_speculative_tokens=4,
        model=None,
        draft_model_config=None,
        prompt_lookup_min=2,
        prompt_lookup_max=5,
        disable_by_batch_size=32,
        eagle_aux_hidden_state_layer_ids=(),
        draft_token_cost=0.02,  # ngram's default price of a draft
        acceptance_method="coupled",  # ngram's drafts have no q: the coupled check
    )
    with pytest.raises(AttributeError):
        config.num_speculative_tokens = 2  # type: ignore[misc]


def test_given_values_and_vllm_older_spelling() -> None:
    config = speculative_config_from(
        {
            "model": "ngram",
            "num_speculative_tokens": 2,
            "prompt_lookup_max": 3,
            "prompt_lookup_min": 1,
            "disable_by_batch_size": None,
        }
    )
    assert config is not None
    assert (config.method, config.prompt_lookup_min, config.prompt_lookup_max) == ("ngram", 1, 3)
    assert config.disable_by_batch_size is None
    # a maximum below the default minimum lowers the minimum with it
    low = speculative_config_from(
        {"method": "ngram", "num_speculative_tokens": 1, "prompt_lookup_max": 1}
    )
    assert low is not None and low.prompt_lookup_min == 1
    assert speculative_config_from(None) is None
    # adaptive k: on by default (the method's price of a draft), 0 turns it off
    assert config.draft_token_cost == DEFAULT_DRAFT_TOKEN_COSTS["ngram"]
    for method in ("draft_model", "eagle3"):
        given = speculative_config_from(
            {"method": method, "model": "/m", "num_speculative_tokens": 2}
        )
        assert given is not None
        assert given.draft_token_cost == DEFAULT_DRAFT_TOKEN_COSTS[method]
    off = speculative_config_from(
        {"method": "ngram", "num_speculative_tokens": 2, "draft_token_cost": 0}
    )
    assert off is not None and off.draft_token_cost == 0.0


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2.0}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 2}, "method is required"),
        ({"method": "magic", "num_speculative_tokens": 2}, "method must be one of ngram"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "'eagle' is not supported yet"),
        ({"method": "eagle3", "num_speculative_tokens": 2}, "speculative_config.model is requi"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model is"),
        ({"method": "draft_model", "model": 3, "num_speculative_tokens": 2}, "config.model is"),
        (
            {"model": "m", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
            "draft_tensor_parallel_size must be 1",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
            "draft_tensor_parallel_size is for draft models",
        ),
        (
            {"method": "ngram", "model": "m", "num_speculative_tokens": 2},
            "speculative_config.model",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 6},
            "prompt_lookup_min=6 must be <= prompt_lookup_max=5",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0},
            "prompt_lookup_max",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
            "prompt_lookup_min",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
            "disable_by_batch_size",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unknown key.*'typo'"),
        (
            {"model": "m", "num_speculative_tokens": 2, "acceptance_method": "exact"},
            "speculative_config.acceptance_method must be one of rejection_sampling, coupled",
        ),
        (
            {"model": "m", "num_speculative_tokens": 2, "acceptance_method": ["coupled"]},
            "speculative_config.acceptance_method must be one of",
        ),
        (
            {
                "model": "m",
                "num_speculative_tokens": 2,
                "acceptance_method": "typical_acceptance_sampler",
            },
            "acceptance_method='typical_acceptance_sampler' is not supported yet",
        ),
        *(
            (
                {"method": "ngram", "num_speculative_tokens": 2, "draft_token_cost": bad},
                "speculative_config.draft_token_cost must be a finite number >= 0",
            )
            for bad in (-0.1, "0.1", True, float("nan"), float("inf"))
        ),
        ("ngram", "speculative_config must be a dict"),
    ],
)
def test_bad_values_name_the_key(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        speculative_config_from(value)
    # EngineArgs validates at construction, before any model is loaded
    with pytest.raises(ValueError, match=match):
        EngineArgs(speculative_config=value)  # type: ignore[arg-type]


def test_cli_flag_takes_json() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "generate",
            "hi",
            "--speculative-config",
            '{"method": "ngram", "num_speculative_tokens": 3}',
        ]
    )
    assert engine_kwargs(args)["speculative_config"] == {
        "method": "ngram",
        "num_speculative_tokens": 3,
    }
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(SystemExit):
            parser.parse_args(["generate", "hi", "--speculative-config", bad])


def test_draft_model_keys() -> None:
    """vLLM infers draft_model from a model that is not "ngram"; the draft is resolved (and its
    vocabulary checked) by create_config, tested in test_draft_model.py."""
    config = speculative_config_from(
        {"model": "some/draft", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}
    )
    assert config is not None
    assert (config.method, config.model, config.draft_model_config) == (
        "draft_model",
        "some/draft",
        None,
    )
    # the textbook acceptance rule by default for a model's drafts; vLLM V0's name of it
    assert config.acceptance_method == "rejection_sampling"
    for given, resolved in [
        ("coupled", "coupled"),
        ("rejection_sampling", "rejection_sampling"),
        ("rejection_sampler", "rejection_sampling"),
    ]:
        value = {"method": "eagle3", "model": "h", "num_speculative_tokens": 2}
        config = speculative_config_from({**value, "acceptance_method": given})
        assert config is not None and config.acceptance_method == resolved


def test_cli_flag_carries_acceptance_method() -> None:
    spec = '{"model": "d", "num_speculative_tokens": 3, "acceptance_method": "coupled"}'
    args = build_parser().parse_args(["generate", "hi", "--speculative-config", spec])
    config = EngineArgs(**engine_kwargs(args)).speculative_config
    assert speculative_config_from(config).acceptance_method == "coupled"  # type: ignore[union-attr]

"""compiled-llm: an LLM inference and serving engine whose speed comes from the compiler."""

from compiled_llm.llm import LLM
from compiled_llm.outputs import BeamSearchOutput, CompletionOutput, Logprob, RequestOutput
from compiled_llm.sampling_params import BeamSearchParams, SamplingParams

__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "CompletionOutput",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"

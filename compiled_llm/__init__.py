"""compiled-llm: an LLM inference and serving engine whose speed comes from the compiler."""

from compiled_llm.llm import LLM
from compiled_llm.outputs import CompletionOutput, Logprob, RequestOutput
from compiled_llm.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

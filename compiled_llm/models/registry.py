"""HF `architectures` names -> our model classes, imported lazily, and the choice between a
native class and the transformers fallback (model_impl)."""

from __future__ import annotations

import importlib
from typing import Any

from compiled_llm.models.interface import CausalLM

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("compiled_llm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("compiled_llm.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("compiled_llm.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("compiled_llm.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("compiled_llm.models.gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("compiled_llm.models.gemma3", "Gemma3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("compiled_llm.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "MixtralForCausalLM": ("compiled_llm.models.mixtral", "MixtralForCausalLM"),
    # EAGLE-3 draft heads (speculative_config method "eagle3" only; EngineArgs refuses them as
    # the model): SpecForge / EAGLE's name, and vLLM's.
    "LlamaForCausalLMEagle3": ("compiled_llm.models.llama_eagle3", "Eagle3LlamaForCausalLM"),
    "Eagle3LlamaForCausalLM": ("compiled_llm.models.llama_eagle3", "Eagle3LlamaForCausalLM"),
}
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


# transformers' causal-LM class of each model_type we run (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES'
# entries, tested equal), read without importing transformers.
_CAUSAL_LM_OF_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def supported_architectures() -> list[str]:
    """Architectures that run as the model (EAGLE-3 heads only draft)."""
    return sorted(a for a in _MODELS if a not in EAGLE3_ARCHITECTURES)


def architecture_of(hf_config: Any) -> str:
    """The config's declared architecture, or the causal-LM class transformers maps its
    model_type to (GGUF-derived configs carry only model_type)."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return str(archs[0])
    model_type = getattr(hf_config, "model_type", "")
    if model_type in _CAUSAL_LM_OF_TYPE:
        return _CAUSAL_LM_OF_TYPE[model_type]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""))


def resolve_model_impl(hf_config: Any, model_impl: str) -> str:
    """ "native" or "transformers" for EngineArgs.model_impl: auto is native where we have the
    architecture, else the transformers fallback; native for one we lack is an error."""
    arch = architecture_of(hf_config)
    if model_impl == "auto":
        return "native" if arch in _MODELS else "transformers"
    if model_impl == "native" and arch not in _MODELS:
        raise ValueError(
            f"model_impl='native' (--model-impl native): no native class for architecture "
            f"{arch or '(none declared)'!r}; native ones: {', '.join(supported_architectures())} "
            "(model_impl auto or transformers runs others through the transformers fallback)"
        )
    if model_impl not in ("native", "transformers"):
        raise ValueError(f"model_impl must be auto, native or transformers, got {model_impl!r}")
    return model_impl


def get_model_class(hf_config: Any, model_impl: str = "auto") -> type[CausalLM]:
    """The class that runs `hf_config`'s architecture under `model_impl`."""
    if resolve_model_impl(hf_config, model_impl) == "transformers":
        from compiled_llm.models.transformers_fallback import TransformersForCausalLM

        return TransformersForCausalLM
    arch = architecture_of(hf_config)
    module_name, class_name = _MODELS[arch]
    cls = getattr(importlib.import_module(module_name), class_name)
    if not issubclass(cls, CausalLM):
        raise TypeError(f"{module_name}.{class_name} does not implement CausalLM")
    return cls

"""The transformers fallback: any decoder-only causal LM transformers ships (or a local folder's
own code, with trust_remote_code) runs as a CausalLM when we have no native class for it.

transformers builds its own model (on the meta device, like ours; weights come from our loader),
and its attention goes through our one generic op: we register an attention function with
transformers' `AttentionInterface` (its supported hook) and select it by name. The model sees the
flat packed batch as one sequence of batch size 1 with our positions as `position_ids`; the op
keeps the sequences apart with the step's paged metadata, so no attention mask is made. The
forward is plain PyTorch, captured and split at attention by our compiler like a native model's.

What cannot honour that contract is refused at construction with a ValueError naming the
architecture and the reason (see `_refusal`, docs/models.md).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from compiled_llm.models.attention import Attention
from compiled_llm.models.derived import transformers_config_of
from compiled_llm.models.interface import CausalLM, attention_scale, head_dim, load_parameters

ATTENTION = "compiled_llm"  # the name our attention function is registered under
PROBE = "compiled_llm_probe"  # records each call on the meta-device probe forward
_PROBED = "_compiled_llm_probe"  # the attribute the probe leaves on each attention module

# Keyword arguments transformers' attention modules pass that we can take as they come when
# None or as listed: anything else changes attention in a way our op does not do.
_HARMLESS = {"position_ids", "cache_position", "use_cache", "output_attentions"}

# Config fields that make attention something our op does not compute (None/False: absent).
_REFUSED_FIELDS = ("alibi",)
# What a layer's attention call may pass that our op does too (the layer's `LayerAttention`).
_LAYER_ATTRS = {"sliding_window", "softcap"}
# The attribute each HF attention module gets: our `Attention` module with that layer's window
# and soft-cap, found by `layer_attention` as a native model's are and called by `_attention`.
_OURS = "compiled_llm_attention"


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    module.__dict__[_PROBED] = {
        "query": tuple(query.shape),
        "key": tuple(key.shape),
        "value": tuple(value.shape),
        "mask": attention_mask is not None,
        "scaling": scaling,
        "kwargs": {k: v for k, v in kwargs.items() if v is not None and k not in _HARMLESS},
    }
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
    return out, None


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' q/k/v [1, heads, T, D] -> our op's [T, heads, D] -> [1, T, heads, D]. The
    layer's `scaling` was turned into its `FallbackAttention.q_factor` by the probe."""
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    ours: FallbackAttention = getattr(module, _OURS)
    return ours(q, k, v).unsqueeze(0), None


class FallbackAttention(Attention):
    """Our attention for one transformers layer: its window and soft-cap, and the factor on q
    that turns the softmax scale transformers passes into the one the backend applies (one per
    model, `interface.attention_scale`)."""

    def __init__(
        self,
        layer_idx: int,
        sliding_window: int | None,
        logits_soft_cap: float | None,
        q_factor: float,
    ) -> None:
        super().__init__(layer_idx, sliding_window, logits_soft_cap)
        self.q_factor = q_factor

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.q_factor != 1.0:
            q = q * self.q_factor
        return super().forward(q, k, v)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)
    AttentionInterface.register(PROBE, _probe_attention)


class TransformersForCausalLM(CausalLM):
    """transformers' causal LM for `cfg`, its modules registered as ours under their HF names
    (so checkpoint names, GGUF mapping and passes see what they see for a native model)."""

    def __init__(
        self, cfg: Any, max_positions: int, device: Any = None, trust_remote_code: bool = False
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        _register()
        self.config = cfg
        config = copy.deepcopy(transformers_config_of(cfg))
        arch = _architecture(config)
        reason = _config_refusal(config, max_positions)
        if reason:
            raise ValueError(
                f"architecture {arch} cannot run in the transformers fallback: {reason}"
            )
        try:
            hf = AutoModelForCausalLM.from_config(
                config,
                attn_implementation=PROBE,
                dtype=torch.get_default_dtype(),
                trust_remote_code=trust_remote_code,
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(
                f"architecture {arch} cannot run in the transformers fallback: transformers "
                f"cannot build it as a causal LM with a custom attention function ({e})"
            ) from e
        reason = _probe_model(hf, arch, config, max_positions)
        if reason:
            raise ValueError(
                f"architecture {arch} cannot run in the transformers fallback: {reason}"
            )
        hf.set_attn_implementation(ATTENTION)  # the probe left each layer its `_OURS` module
        object.__setattr__(self, "_hf", hf)  # not a submodule: its children are ours below
        for name, child in hf.named_children():
            self.add_module(name, child)
        self.base_name = str(hf.base_model_prefix)
        embeddings = hf.get_output_embeddings()
        self.head_name = next(n for n, m in hf.named_modules() if m is embeddings)

        # What transformers' causal-LM forward does to logits after the head, by config field
        # (a field its forward does not read, it ignores, and so do we).
        def field(name: str, default: float) -> float:
            value = getattr(config, name, None)
            return float(value) if value and _forward_reads(hf, name) else default

        self.logit_divisor = field("logits_scaling", 1.0)
        self.logit_multiplier = field("logit_scale", 1.0)
        self.logit_soft_cap = field("final_logit_softcapping", 0.0)

    def to_empty(self, *, device: Any, recurse: bool = True) -> TransformersForCausalLM:
        """Parameters become uninitialized memory on `device` (weights are loaded next); buffers
        that transformers computes (RoPE frequencies) are computed again there, by transformers'
        own initialization, which skips parameters flagged initialized, as from_pretrained does."""
        super().to_empty(device=device, recurse=recurse)
        hf = self.__dict__["_hf"]
        hf.tie_weights()
        for module in hf.modules():
            module.__dict__.pop("_is_hf_initialized", None)
        for param in hf.parameters():
            param._is_hf_initialized = True
        hf.initialize_weights()
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        base = getattr(self, self.base_name)
        out = base(
            input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False
        )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.get_submodule(self.head_name)(hidden)
        if self.logit_divisor != 1.0:
            logits = logits / self.logit_divisor
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if self.logit_soft_cap:
            logits = torch.tanh(logits / self.logit_soft_cap) * self.logit_soft_cap
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        aliases = {n for n, _ in self.named_parameters(remove_duplicate=False)} - set(params)
        buffers = {n for n, _ in self.named_buffers()}
        rename = self._checkpoint_names(params)
        # a tied weight's second name, a computed buffer an old checkpoint kept: skipped
        kept = (
            (name, tensor)
            for name, tensor in ((rename(n), t) for n, t in weights)
            if name not in aliases and name not in buffers
        )
        load_parameters(params, kept, f"transformers' {type(self.__dict__['_hf']).__name__}")

    def _checkpoint_names(self, params: dict[str, Any]) -> Callable[[str], str]:
        """transformers' renaming of checkpoint keys for this model (legacy names, e.g.
        GPT-NeoX's embed_out -> lm_head), as from_pretrained applies it. Conversions that
        reshape tensors (e.g. experts merged into one) are refused by name."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        hf = self.__dict__["_hf"]
        transforms = get_model_conversion_mapping(hf)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        present = dict.fromkeys(params, True)

        def rename(name: str) -> str:
            new, converted = rename_source_key(
                name, renamings, converters, hf.base_model_prefix, present
            )
            if converted is not None:
                raise ValueError(
                    f"checkpoint tensor {name!r} needs transformers' weight conversion "
                    f"{converted!r}, which the transformers fallback does not run"
                )
            return str(new)

        return rename


def _forward_reads(hf: Any, name: str) -> bool:
    """Whether the source of `hf`'s causal-LM forward names `name` (e.g. Gemma 2's reads
    final_logit_softcapping; OLMo 2's does not, whatever its config holds)."""
    try:
        return name in inspect.getsource(type(hf).forward)
    except (OSError, TypeError):  # no source to read: assume it applies what its config sets
        return True


def _architecture(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    return str(archs[0]) if archs else f"(model_type {getattr(config, 'model_type', None)!r})"


def _config_refusal(config: Any, max_positions: int) -> str | None:
    """Why `config` cannot run on a packed batch through our causal paged attention, or None."""
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model (is_encoder_decoder); only decoder-only models run"
    if getattr(config, "is_causal", True) is False:
        return "its attention is bidirectional (is_causal=False); our attention is causal"
    for name in _REFUSED_FIELDS:
        if getattr(config, name, None):
            return f"{name}={getattr(config, name)!r} is not supported by our attention op yet"
    if getattr(config, "position_embedding_type", None) == "alibi":
        return "ALiBi position biases (position_embedding_type='alibi') are not supported yet"
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention", "sliding_attention"}:
        return f"layer_types {sorted(layer_types)} are not all full or sliding-window attention"
    return None


def _probe_model(hf: Any, arch: str, config: Any, max_positions: int) -> str | None:
    """Run `hf`'s base model once on the meta device with the probe attention function: every
    layer must call it, with the shapes our KV cache holds and nothing our op cannot honour.
    Returns why not, or None after giving each layer's attention module our `Attention` with
    the sliding window and logit soft-cap the layer passed."""
    declared = getattr(config, "architectures", None) or []
    if declared and type(hf).__name__ != declared[0]:
        return f"transformers' causal LM for its config is {type(hf).__name__}, not {arch}"
    if list(hf.parameters(recurse=False)) or list(hf.buffers(recurse=False)):
        return "its causal-LM class holds tensors outside its submodules"
    if hf.get_output_embeddings() is None:
        return "it has no output embeddings (lm_head)"
    base = hf.base_model
    if base is hf:
        return f"its causal-LM class has no base model ({hf.base_model_prefix!r}) to run apart"
    tokens = 3
    try:
        with torch.device("meta"), torch.no_grad():
            base(
                input_ids=torch.zeros(1, tokens, dtype=torch.long),
                position_ids=torch.arange(tokens).unsqueeze(0),
                use_cache=False,
            )
    except Exception as e:  # noqa: BLE001 - any failure means this model cannot run here
        return f"its forward does not run on a packed batch of token ids and positions ({e})"
    probed = [(m, m.__dict__.pop(_PROBED)) for m in hf.modules() if _PROBED in m.__dict__]
    num_layers = int(config.num_hidden_layers)
    layers = sorted(getattr(m, "layer_idx", -1) for m, _ in probed)
    if layers != list(range(num_layers)):
        return (
            f"its attention does not go through transformers' attention interface in every "
            f"layer with a layer_idx (layers seen: {layers}, expected 0..{num_layers - 1})"
        )
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    dim = head_dim(config)
    for module, seen in probed:
        expected = {"query": (1, heads, tokens, dim), "key": (1, kv_heads, tokens, dim)}
        expected["value"] = expected["key"]
        for what, shape in expected.items():
            if seen[what] != shape:
                return (
                    f"layer {module.layer_idx}'s attention {what} has shape {seen[what]}, not "
                    f"{shape} (heads {heads}, KV heads {kv_heads}, head_dim {dim} from the config)"
                )
        if seen["mask"]:
            return f"layer {module.layer_idx} needs an attention mask, which we cannot give"
        if getattr(module, "is_causal", True) is False:
            return f"layer {module.layer_idx}'s attention is not causal"
        kwargs = dict(seen["kwargs"])
        if kwargs.get("is_causal") is True:
            del kwargs["is_causal"]
        unknown = sorted(set(kwargs) - _LAYER_ATTRS)  # e.g. s_aux (attention sinks)
        if unknown:
            name = unknown[0]
            return (
                f"layer {module.layer_idx}'s attention takes {name}={kwargs[name]!r}, which "
                "our op lacks"
            )
        window = kwargs.get("sliding_window")
        if window is not None and int(window) >= max_positions:
            window = None  # a window no sequence reaches
        softcap = kwargs.get("softcap")
        scaling = dim**-0.5 if seen["scaling"] is None else float(seen["scaling"])
        ours = FallbackAttention(
            int(module.layer_idx),
            None if window is None else int(window),
            None if not softcap else float(softcap),
            q_factor=scaling / attention_scale(config),
        )
        module.add_module(_OURS, ours)
    return None

"""Rotary position embedding (NeoX half-split layout, as in HF Llama/Qwen).

The cos/sin table is built once from the HF config (scaling variants such as `llama3` come from
transformers' own ROPE_INIT_FUNCTIONS) and looked up by position once per forward; every layer
then applies `apply_rotary` with the same cos/sin.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The config's RoPE parameters; those of `layer_type` where they are kept per layer type
    (Gemma 3: "sliding_attention" and "full_attention")."""
    params = getattr(hf_config, "rope_parameters", None)
    if params and layer_type is not None:
        return dict(params[layer_type])
    if params:
        return dict(params)
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return scaling


def inverse_frequencies(
    hf_config: Any, head_dim: int, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = float(params["rope_theta"])
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {rope_type!r}")
    with torch.device("cpu"):  # models are built under a meta-device context
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table; `forward(positions)` returns (cos, sin), each [T, head_dim/2]."""

    def __init__(
        self,
        hf_config: Any,
        head_dim: int,
        max_positions: int,
        device: torch.device | None,
        layer_type: str | None = None,
    ) -> None:
        super().__init__()
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim, layer_type)
        # Built on the host explicitly: models are constructed under a meta-device context.
        t = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()
        freqs = torch.outer(t, inv_freq)
        # A plain attribute, not a buffer: it is derived, never loaded, and survives to_empty().
        self.cos_sin_cache = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1).to(
            device
        )

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin.chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x ([T, heads, head_dim]) by per-token cos/sin ([T, head_dim/2])."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

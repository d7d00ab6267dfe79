"""`compiled_llm::onednn_linear(x, weight, bias=None) = x @ weight.T (+ bias)` by oneDNN.

On CPU, `aten.mm`/`addmm` in float32 go to the BLAS torch is built with (MKL); oneDNN, which
ships inside torch, has its own JIT-generated GEMM. Inductor lowers oneDNN linears itself only
for frozen (constant) weights, and ours are graph inputs, so the `onednn_linear` pass
(passes/onednn_linear.py) puts this op in their place. The weight is the layer's own
[out, in] tensor: oneDNN reorders it per call (prepacking would need constant weights).
"""

from __future__ import annotations

import torch

_LIB = torch.library.Library("compiled_llm", "FRAGMENT")
_LIB.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")


def available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


@torch.library.register_fake("compiled_llm::onednn_linear", lib=_LIB)
def _onednn_linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _onednn_linear_cpu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


_LIB.impl("onednn_linear", _onednn_linear_cpu, "CPU")

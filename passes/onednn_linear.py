"""CPU float32 GEMMs of linear layers (`mm`/`addmm` of an input and a transposed contiguous
[out, in] matrix) become `compiled_llm::onednn_linear` (kernels/cpu_linear.py): oneDNN's GEMM
instead of the BLAS.

Why: on the 2-core AMD EPYC (Zen 5) CPU we measure on, oneDNN's float32 GEMM is 2-2.5x faster
than `aten.mm` (MKL) at the embedded model's shapes for 1 to 1,000 rows, the same rounding
class (float32 accumulation in another order). `addmm(c, x, w.T)` keeps its addend: a 1-D bias
goes into the op, a 2-D addend (a residual Inductor folded into the GEMM) is added after it.
Sites whose weight is not a contiguous 2-D tensor, or whose addmm scales (alpha, beta) are not
1, are left alone. On by default for float32 on CPU where torch has oneDNN; elsewhere a no-op.

The output head runs eagerly, outside the compiled graph (on the rows that sample); its
`F.linear` gets the same op through the pass's eager mode (`OneDNNLinearMode`), which the model
runner enters around `compute_logits`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import fx
from torch.overrides import TorchFunctionMode

from compiled_llm.kernels import cpu_linear
from compiled_llm.passes.base import CompilerPass, PassContext

aten = torch.ops.aten
_OP = torch.ops.compiled_llm.onednn_linear.default
_TRANSPOSES = (aten.permute.default, aten.t.default, aten.transpose.int)


def _val(arg: Any) -> torch.Tensor | None:
    v = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _weight(node: Any) -> fx.Node | None:
    """w where `node` is w transposed, w a contiguous float32 [out, in] CPU tensor."""
    if not isinstance(node, fx.Node) or node.target not in _TRANSPOSES:
        return None
    if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:  # type: ignore[arg-type]
        return None
    w = node.args[0]
    wv = _val(w)
    ok = wv is not None and wv.dim() == 2 and wv.dtype == torch.float32
    if not ok or wv.device.type != "cpu" or not wv.is_contiguous():  # type: ignore[union-attr]
        return None
    return w  # type: ignore[return-value]


def _fits(x: Any, w: Any, b: Any) -> bool:
    """F.linear arguments the op takes: float32 CPU input and contiguous [out, in] weight (and
    a float32 1-D bias, or none)."""
    tensors = isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)
    if not tensors or x.device.type != "cpu" or x.dim() < 1:
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32 or w.dim() != 2:
        return False
    if not w.is_contiguous() or w.device.type != "cpu":
        return False
    return b is None or (isinstance(b, torch.Tensor) and b.dim() == 1 and b.dtype == x.dtype)


class OneDNNLinearMode(TorchFunctionMode):
    """`F.linear` (nn.Linear's too) of a float32 CPU input and a contiguous [out, in] weight
    becomes `compiled_llm::onednn_linear`: the pass's rewrite, for eager code."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if _fits(x, w, b):
                out = _OP(x.reshape(-1, x.shape[-1]), w, b)
                return out.view(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)


class OneDNNLinearPass(CompilerPass):
    name = "onednn_linear"
    description = "CPU fp32 mm/addmm of a weight -> oneDNN GEMM (compiled_llm::onednn_linear)"
    default_for_device_dtypes: ClassVar[tuple[tuple[str, torch.dtype], ...]] = (
        ("cpu", torch.float32),
    )

    @classmethod
    def on_by_default(cls, ctx: PassContext | None) -> bool:
        return super().on_by_default(ctx) and cpu_linear.available()

    def eager_mode(self) -> OneDNNLinearMode | None:
        if self.ctx.device_type != "cpu" or not cpu_linear.available():
            return None
        return OneDNNLinearMode()

    def apply(self, graph: fx.Graph) -> int:
        if self.ctx.device_type != "cpu" or not cpu_linear.available():
            return 0
        count = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.kwargs.get("alpha", 1) != 1:
                continue
            if node.target is aten.mm.default:
                x, wt = node.args
                addend = None
            elif node.target is aten.addmm.default and node.kwargs.get("beta", 1) == 1:
                addend, x, wt = node.args[:3]
                if len(node.args) > 3:
                    continue
            else:
                continue
            w, xv, av = _weight(wt), _val(x), _val(addend)
            if w is None or xv is None or xv.dim() != 2 or xv.dtype != torch.float32:
                continue
            if addend is not None and (av is None or av.dtype != torch.float32 or av.dim() > 2):
                continue
            bias = addend if av is not None and av.dim() == 1 else None
            with graph.inserting_before(node):
                out = graph.call_function(_OP, (x, w, bias))
                out.meta["val"] = node.meta.get("val")
                if addend is not None and bias is None:
                    out = graph.call_function(aten.add.Tensor, (out, addend))
                    out.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            count += 1
        return count

"""Custom ops: fused ops that compiler passes put into the graph, the FP8 ops of quantized
linear layers (fp8.py), and `moe.fused_experts`, which MoE models call themselves (their routed
experts have no plain-PyTorch form a graph can hold).

Each op is a `torch.library` op (namespace `compiled_llm`) with three implementations: a fake one
(shapes only, for tracing), a CPU one in plain PyTorch that reuses the model's own layer code (so
its numerics equal eager), and a CUDA one in Triton. Importing this package registers them all;
the Triton modules are imported only when a CUDA op first runs. `cpu_linear.onednn_linear` is
CPU-only (what the `onednn_linear` pass uses instead of `aten.mm` there).
"""

from compiled_llm.kernels import activation, cpu_linear, fp8, fp8_fused, moe, norm, rotary

__all__ = ["activation", "cpu_linear", "fp8", "fp8_fused", "moe", "norm", "rotary"]

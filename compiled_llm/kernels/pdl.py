"""Programmatic Dependent Launch (PDL, Hopper and later) for our Triton kernels.

Inside a CUDA graph, a kernel normally starts only after the one before it on the stream has
finished and its writes are flushed: between the two the GPU idles for the launch latency and
the new kernel's first memory reads. A kernel launched with PDL may start as soon as every
program of the previous kernel has let it (`gdc_launch_dependents`) or exited; it must then wait
(`gdc_wait`, which returns once the previous kernel has completed and its writes are visible)
before it reads anything an earlier kernel wrote, and before it writes anything an earlier kernel
may still read.

So a kernel that takes part reads before `wait_for_previous` only what no kernel of the step
writes (weights, scales, biases) and writes nothing before it; right after it, it lets the next
kernel launch. `gdc_wait` waits for the previous kernel's *completion*, which a kernel that takes
part reaches only after its own wait: the chain stays ordered however far back a write was.
Kernels launched without PDL (cuBLAS, FlashInfer, Inductor's) start as before.

On by default where the GPU has it; `COMPILED_LLM_PDL=0` turns it off (read once per process).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from compiled_llm.envs import Envs


@functools.cache
def _enabled(device_index: int) -> bool:
    return Envs.read().pdl and torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_options(device: torch.device) -> dict[str, Any]:
    """Keyword arguments of a launch: the `USE_PDL` constexpr of a kernel that calls
    `wait_for_previous`, and Triton's `launch_pdl` where PDL is on."""
    if device.type != "cuda":  # the interpreter's CPU tensors
        return {"USE_PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"USE_PDL": True, "launch_pdl": True} if _enabled(index) else {"USE_PDL": False}


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Block until the previous kernel on the stream has completed, then let the next launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

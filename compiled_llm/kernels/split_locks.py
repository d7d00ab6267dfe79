"""Finishing a split reduction inside the kernel that splits it: the last program to arrive.

A kernel that splits one output over several programs (the FP8 split-K GEMM and GEMV, split-KV
decode attention) has each program store its partial result, then count itself on the output's
lock: an int32 in global memory, zero between launches. The program that counts last
(`last_to_arrive`) reads every partial in split order, so the result does not depend on which
program finished first, writes the output and sets the lock back to zero (`release`) for the
next launch. No second kernel merges the partials, and nothing zeroes a buffer before the launch.

The lock array outlives the launches (CUDA graphs hold its address) and must not be shared by
launches that can run at the same time; every forward runs on one stream.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def last_to_arrive(lock_ptr, count):
    """Count this program on the lock; True in the program that is the `count`-th to arrive.
    Call it after storing the partial, and in that program read the partials only after it."""
    tl.debug_barrier()  # every thread's stores precede the count
    # acq_rel: this program's partial is visible to the one counting last; theirs to it if it is
    arrived = tl.atomic_add(lock_ptr, 1, sem="acq_rel")
    return arrived == count - 1


@triton.jit
def release(lock_ptr):
    """Zero the lock for the next launch (by the last program, once it has read the partials)."""
    tl.atomic_xchg(lock_ptr, 0)

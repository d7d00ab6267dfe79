"""What a compiler pass is.

A pass has a name (its registry key and the word users type in `--passes`), a one-line
description of what it fuses, the stage it runs at, and a `uuid` — a hash of its own source and
options — that goes into Inductor's cache key and ours, so editing a pass invalidates exactly
the artifacts it shaped.

Stages:
- "graph": the whole captured FX graph (torch-level ops), once, before the graph is split at
  attention. Sees the real parameter tensors (`self.example_inputs`, set before `apply`).
- "post_grad": each compiled piece's aten-level graph, inside Inductor (its post-grad custom
  pass hook), before Inductor's own fusion and code generation.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import fx

Stage = Literal["graph", "post_grad"]


@dataclass(frozen=True)
class PassContext:
    """What passes may depend on; part of every pass's identity through its options."""

    device_type: str  # "cpu" | "cuda"
    dtype: torch.dtype
    attention_backend: str
    quantization: str | None = None  # the model's quantization method ("fp8"), if any


class CompilerPass(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    stage: ClassVar[Stage] = "post_grad"
    enabled_by_default: ClassVar[bool] = True
    # A pass that rewrites the ops of quantized layers is in the default pipeline exactly for
    # models quantized with one of these methods (and `enabled_by_default` is then ignored).
    default_for_quantization: ClassVar[tuple[str, ...]] = ()
    # A pass that only pays on some devices and dtypes is in the default pipeline exactly for
    # these (device type, dtype) pairs (and `enabled_by_default` is then ignored).
    default_for_device_dtypes: ClassVar[tuple[tuple[str, torch.dtype], ...]] = ()

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        # Graph-stage passes see the real inputs of the captured graph (parameters included).
        self.example_inputs: tuple[Any, ...] = ()

    @classmethod
    def on_by_default(cls, ctx: PassContext | None) -> bool:
        """Whether the default pipeline for `ctx` holds this pass (None: an unquantized model)."""
        if cls.default_for_quantization:
            return ctx is not None and ctx.quantization in cls.default_for_quantization
        if cls.default_for_device_dtypes:
            pairs = cls.default_for_device_dtypes
            return ctx is not None and (ctx.device_type, ctx.dtype) in pairs
        return cls.enabled_by_default

    @abstractmethod
    def apply(self, graph: fx.Graph) -> int:
        """Rewrite `graph` in place; return how many sites were rewritten."""

    def eager_mode(self) -> contextlib.AbstractContextManager[None] | None:
        """The same rewrite for eager code outside the compiled graph (the model runner's output
        head), as a context to run that code in, or None (the default): most fusions have
        nothing to fuse there."""
        return None

    def options(self) -> dict[str, Any]:
        """Everything besides source code that changes what the pass does."""
        options: dict[str, Any] = {
            "device": self.ctx.device_type,
            "dtype": str(self.ctx.dtype),
            "backend": self.ctx.attention_backend,
        }
        if self.ctx.quantization is not None:  # unquantized models keep their cache keys
            options["quantization"] = self.ctx.quantization
        return options

    def uuid(self) -> str:
        source = inspect.getsource(inspect.getmodule(type(self)) or type(self))
        payload = json.dumps([self.name, source, self.options()], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


class PatternPass(CompilerPass):
    """A post-grad pass made of pattern -> replacement pairs for Inductor's pattern matcher.

    Subclasses implement `patterns()`, yielding (search_fn, replace_fn, example_inputs) and
    optionally a dict of scalar arguments matched as wildcards (e.g. {"eps": 1e-6}). Both
    functions are traced to aten graphs with the example inputs, so write them as plain PyTorch.
    """

    stage: ClassVar[Stage] = "post_grad"

    def __init__(self, ctx: PassContext) -> None:
        super().__init__(ctx)
        from torch._inductor.pattern_matcher import (
            PatternMatcherPass,
            fwd_only,
            register_replacement,
        )

        self._matcher = PatternMatcherPass(pass_name=self.name)
        for entry in self.patterns():
            search, replace, example_inputs, *rest = entry
            scalars = rest[0] if rest else None
            register_replacement(
                search,
                replace,
                list(example_inputs),
                fwd_only,
                self._matcher,
                scalar_workaround=scalars or {},
            )

    @abstractmethod
    def patterns(self) -> list[tuple[Any, ...]]:
        """(search_fn, replace_fn, example_inputs[, scalar_workaround]) tuples."""

    def apply(self, graph: fx.Graph) -> int:
        return int(self._matcher.apply(graph))

    def example(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An example input for tracing a pattern, on the pass's device and dtype."""
        return torch.empty(shape, dtype=dtype or self.ctx.dtype, device=self.ctx.device_type)

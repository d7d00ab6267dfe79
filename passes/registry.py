"""Compiler passes by name, and the pipeline a `passes=["+name", "-name"]` edit list selects.

Built-in passes are imported lazily. User passes come from a dotted path (`+pkg.module:Class` or
`+pkg.module.Class`) or from the `compiled_llm.passes` entry-point group (installed packages
that declare `[project.entry-points."compiled_llm.passes"] name = "pkg.module:Class"`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib.metadata import entry_points

from compiled_llm.passes.base import CompilerPass, PassContext

ENTRY_POINT_GROUP = "compiled_llm.passes"

# Pipeline order. Each stage runs its passes in this order.
_BUILTIN: dict[str, str] = {
    "attention_lowering": "compiled_llm.passes.attention_lowering:AttentionLoweringPass",
    "rope_kv_write": "compiled_llm.passes.rope_kv_write:RopeKVWritePass",
    "gemm_merge": "compiled_llm.passes.gemm_merge:GemmMergePass",
    "noop_elimination": "compiled_llm.passes.noop_elimination:NoopEliminationPass",
    "dedup_quant": "compiled_llm.passes.dedup_quant:DedupQuantPass",
    "fuse_norm_quant": "compiled_llm.passes.fuse_norm_quant:FuseNormQuantPass",
    "fuse_act_quant": "compiled_llm.passes.fuse_act_quant:FuseActQuantPass",
    "qk_norm_rope": "compiled_llm.passes.qk_norm_rope:QKNormRopePass",
    "rope": "compiled_llm.passes.rope:RopePass",
    "fuse_add_rmsnorm": "compiled_llm.passes.fuse_add_rmsnorm:FuseAddRMSNormPass",
    "silu_and_mul": "compiled_llm.passes.silu_and_mul:SiluAndMulPass",
    "onednn_linear": "compiled_llm.passes.onednn_linear:OneDNNLinearPass",
}
REQUIRED = frozenset({"attention_lowering"})

_user: dict[str, type[CompilerPass]] = {}


def _import(target: str) -> type[CompilerPass]:
    module_name, _, attr = target.partition(":")
    if not attr:
        module_name, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot load compiler pass {target!r}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, CompilerPass)):
        raise ValueError(f"{target!r} is not a CompilerPass subclass")
    return cls


def _entry_point_passes() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def builtin_names() -> list[str]:
    return list(_BUILTIN)


def all_names() -> list[str]:
    return list(_BUILTIN) + [n for n in _entry_point_passes() if n not in _BUILTIN]


def get_pass(name: str) -> type[CompilerPass]:
    if name in _user:
        return _user[name]
    if name in _BUILTIN:
        return _import(_BUILTIN[name])
    plugins = _entry_point_passes()
    if name in plugins:
        return _import(plugins[name])
    if "." in name or ":" in name:
        cls = _import(name)
        _user[cls.name] = cls
        return cls
    raise ValueError(f"unknown compiler pass {name!r}; known: {', '.join(all_names())}")


def resolve_pipeline(
    edits: Sequence[str], ctx: PassContext | None = None
) -> list[type[CompilerPass]]:
    """The default pipeline for `ctx` (its quantization turns the quantization fusions on)
    edited by "+name" (add) and "-name" (remove) entries, in order."""
    selected = [n for n in _BUILTIN if get_pass(n).on_by_default(ctx)]
    for edit in edits:
        edit = edit.strip()
        if not edit:
            continue
        op, name = (edit[0], edit[1:]) if edit[0] in "+-" else ("+", edit)
        cls = get_pass(name)
        if op == "-":
            if cls.name in REQUIRED:
                raise ValueError(f"compiler pass {cls.name!r} is required and cannot be removed")
            selected = [n for n in selected if n != cls.name]
        elif cls.name not in selected:
            selected.append(cls.name)
    order = {n: i for i, n in enumerate(_BUILTIN)}
    selected.sort(key=lambda n: order.get(n, len(order)))  # user passes last, in given order
    return [get_pass(n) for n in selected]

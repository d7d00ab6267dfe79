"""Lower the model's generic attention op to the selected backend's ops.

`compiled_llm::attention(q, k, v, i, *attrs)` becomes
`dep = compiled_llm::<backend>_kv_write(k, v, i); out = compiled_llm::<backend>_attention(q, dep, i,
*attrs)`, the layer's static attributes (sliding window, soft-cap) passed through as they are,
so which kernels run is decided here, by the compiler, and the write is a separate node that
later passes (RoPE + KV-write fusion) and the graph splitter can see.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx

from compiled_llm.attention_backends.ops import backend_ops
from compiled_llm.passes.base import CompilerPass, Stage


def is_generic_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.compiled_llm.attention.default,
        torch.ops.compiled_llm.attention,
    )


class AttentionLoweringPass(CompilerPass):
    name = "attention_lowering"
    description = "generic attention op -> the attention backend's KV-write + attention ops"
    stage: ClassVar[Stage] = "graph"

    def apply(self, graph: fx.Graph) -> int:
        ops = backend_ops(self.ctx.attention_backend)
        count = 0
        for node in list(graph.nodes):
            if not is_generic_attention(node):
                continue
            q, k, v, layer_idx, *attrs = node.args
            with graph.inserting_before(node):
                dep = graph.call_function(ops.kv_write, (k, v, layer_idx))
                out = graph.call_function(
                    ops.attention, (q, dep, layer_idx, *attrs), dict(node.kwargs)
                )
            out.meta = dict(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            count += 1
        return count

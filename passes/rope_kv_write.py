"""RoPE of q and k plus the KV-cache write -> the attention backend's fused op.

After `attention_lowering`, a layer reads
`dep = <backend>_kv_write(apply_rotary(k, cos, sin), v, i); out = <backend>_attention(
apply_rotary(q, cos, sin), dep, i)`. Where the backend accepts it (`accepts_fused_rope_kv_write`)
this becomes `q_rot, dep = <backend>_rope_kv_write(q, k, v, cos, sin, i); out =
<backend>_attention(q_rot, dep, i)`: one kernel reads q and k once, writes the rotated q and the
rotated k and v straight into the paged cache, and rotated k is never stored elsewhere.

The fused op is a KV write, so the compiler splits the graph at it (see `splitting_predicate`):
it runs with the attention op in the eager piece, and the compiled pieces between layers stay
identical (they no longer contain RoPE). The RoPE subgraph is found by `TorchPattern` on the
model's own `layers.rotary.apply_rotary`, captured by Dynamo for the pass's dtype and device.
A site is rewritten only when q and k are rotated by the same cos/sin and each rotated tensor
feeds only this write or this attention. For other backends the pass changes nothing.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import torch
from torch import fx

from compiled_llm.attention_backends.ops import BackendOps, backend_ops
from compiled_llm.attention_backends.registry import get_backend_class
from compiled_llm.layers.rotary import apply_rotary
from compiled_llm.passes.base import CompilerPass, PassContext, Stage
from compiled_llm.passes.graph_pattern import PatternMatch, TorchPattern


class RopeKVWritePass(CompilerPass):
    name = "rope_kv_write"
    description = "RoPE of q and k + KV-cache write -> the backend's fused rope_kv_write op"
    stage: ClassVar[Stage] = "graph"
    # Unmeasured on GPU; on CPU (torch backend) it moves RoPE out of Inductor into eager code.
    enabled_by_default = False

    def __init__(self, ctx: PassContext) -> None:
        super().__init__(ctx)
        self.accepts = get_backend_class(ctx.attention_backend).accepts_fused_rope_kv_write
        self._rotary: TorchPattern | None = None
        if self.accepts:
            # Sizes are arbitrary (the pattern has no shape literals); dtypes are the model's:
            # activations in ctx.dtype, the cos/sin table in float32 (layers/rotary.py).
            x = torch.empty(5, 3, 8, dtype=ctx.dtype, device=ctx.device_type)
            cos, sin = (
                torch.empty(5, 4, dtype=torch.float32, device=ctx.device_type) for _ in range(2)
            )
            self._rotary = TorchPattern(apply_rotary, (x, cos, sin))

    def options(self) -> dict[str, Any]:
        return dict(super().options(), accepts_fused_rope_kv_write=self.accepts)

    def apply(self, graph: fx.Graph) -> int:
        if self._rotary is None:
            return 0
        ops = backend_ops(self.ctx.attention_backend)
        if ops.rope_kv_write is None:
            return 0
        rotated = {m.outputs[0]: m for m in self._rotary.match(graph)}
        count = 0
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target == ops.kv_write:
                count += self._rewrite(graph, node, rotated, ops)
        return count

    @staticmethod
    def _rewrite(
        graph: fx.Graph, write: fx.Node, rotated: dict[fx.Node, PatternMatch], ops: BackendOps
    ) -> int:
        k_rot, v, layer_idx = write.args
        users = list(write.users)
        if len(users) != 1 or users[0].target != ops.attention:
            return 0
        attend = users[0]
        q_rot, dep, attend_idx, *attrs = attend.args
        if dep is not write or attend_idx != layer_idx:
            return 0
        if not (isinstance(k_rot, fx.Node) and isinstance(q_rot, fx.Node)):
            return 0
        rk, rq = rotated.get(k_rot), rotated.get(q_rot)
        if rk is None or rq is None or len(k_rot.users) != 1 or len(q_rot.users) != 1:
            return 0
        cos, sin = rq.inputs["cos"], rq.inputs["sin"]
        if rk.inputs["cos"] is not cos or rk.inputs["sin"] is not sin:
            return 0
        # Before the attention node: every input (q's included) is defined by then.
        with graph.inserting_before(attend):
            fused = graph.call_function(
                ops.rope_kv_write, (rq.inputs["x"], rk.inputs["x"], v, cos, sin, layer_idx)
            )
            q_new = graph.call_function(operator.getitem, (fused, 0))
            dep_new = graph.call_function(operator.getitem, (fused, 1))
        q_new.meta = dict(q_rot.meta)
        attend.args = (q_new, dep_new, attend_idx, *attrs)
        graph.erase_node(write)  # the rotations, now unused, go with dead-code elimination
        return 1

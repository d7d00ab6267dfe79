"""An EAGLE-3 head in the published checkpoint layout (config.json + model.safetensors: `fc`,
`midlayer.*`, `norm`, `lm_head` over a reduced draft vocabulary, `d2t`, `t2d`, no embedding),
random weights, for a tiny target; and a float64 reference of what the head proposes, computed
from the target's hidden states with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LAYER_IDS = [0, 1, 1]  # the tiny targets have 2 layers: EAGLE-3's default needs 4


def write_head(
    path: Path,
    target: Path,
    draft_vocab: int = 48,
    layer_ids: list[int] | None = LAYER_IDS,
    seed: int = 0,
    follow: list[int] | None = None,
    **overrides: object,
) -> Path:
    """`follow`: instead of random, a head that guesses the token after next as f(f(x)) for the
    permutation f of the cycle model (tests/spec_decode/conftest.py), x the token whose target
    state it reads: fc passes the target's embedding of x through (LAYER_IDS[0] = 0), the layer
    adds nothing, and lm_head's row of y is the embedding of f^-1(f^-1(y)). Its first draft is
    then mostly right, its later ones (the same state again) mostly wrong."""
    t = json.loads((target / "config.json").read_text())
    hidden, vocab = t["hidden_size"], t["vocab_size"]
    heads, kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
    head_dim = hidden // heads
    inter = t["intermediate_size"]
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "draft_vocab_size": draft_vocab,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if layer_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": layer_ids}
    config.update(overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    target_hidden = int(config.get("target_hidden_size") or hidden)  # type: ignore[call-overload]
    kept = torch.sort(torch.randperm(vocab, generator=g)[:draft_vocab]).values
    tensors = {
        "fc.weight": w(hidden, 3 * target_hidden),
        "midlayer.self_attn.q_proj.weight": w(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": w(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": w(inter, hidden),
        "midlayer.mlp.up_proj.weight": w(inter, hidden),
        "midlayer.mlp.down_proj.weight": w(hidden, inter),
        "midlayer.input_layernorm.weight": 1 + w(hidden, std=0.1),
        "midlayer.hidden_norm.weight": 1 + w(hidden, std=0.1),
        "midlayer.post_attention_layernorm.weight": 1 + w(hidden, std=0.1),
        "norm.weight": 1 + w(hidden, std=0.1),
        "lm_head.weight": w(draft_vocab, hidden, std=1.0),
        "d2t": kept - torch.arange(draft_vocab),  # target id = draft id + d2t[draft id]
        "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, kept, True),
    }
    if follow is not None:
        from safetensors.torch import load_file

        embed = load_file(target / "model.safetensors")["model.embed_tokens.weight"]
        inverse = torch.argsort(torch.tensor(follow))
        tensors["fc.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, 2 * hidden)], 1)
        for name in ("midlayer.self_attn.o_proj.weight", "midlayer.mlp.down_proj.weight"):
            tensors[name] = torch.zeros_like(tensors[name])
        tensors["norm.weight"] = torch.ones(hidden)
        # (plus a little noise: without it, a state whose f(f(x)) is outside the draft
        # vocabulary ties every logit, and float32 and float64 break the tie apart)
        tensors["lm_head.weight"] = embed[inverse[inverse[kept]]] + w(draft_vocab, hidden, std=0.05)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def reference_drafts(head: Path, target: Path, tokens: list[int], k: int) -> list[int]:
    """The head's greedy drafts for a request of `tokens` (its newest token last), float64:
    position t reads token t + 1 and fc(the target's hidden states entering the chosen layers at
    t); the positions after the newest read the head's previous draft and its own pre-norm
    output at the position before."""
    import transformers
    from safetensors.torch import load_file

    cfg = json.loads((head / "config.json").read_text())
    layer_ids = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    w = {
        n: t.double() if t.is_floating_point() else t
        for n, t in load_file(head / "model.safetensors").items()
    }
    model = transformers.LlamaForCausalLM.from_pretrained(target, torch_dtype=torch.float64)
    with torch.no_grad():
        states = model(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
    feats = torch.cat([states[i][0] for i in layer_ids], -1) @ w["fc.weight"].T  # [N-1, H]
    embed = model.model.embed_tokens.weight.detach()
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // heads
    theta = float(getattr(model.config, "rope_theta", 10000.0))
    eps = cfg["rms_norm_eps"]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name]

    def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # [T, h, hd], HF's rotate_half
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        f = pos[:, None].double() * inv[None]
        cos, sin = (
            torch.cat([f.cos(), f.cos()], -1)[:, None],
            torch.cat([f.sin(), f.sin()], -1)[:, None],
        )
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    p = "midlayer."

    def step(token: int, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        x = torch.cat(
            [
                norm(embed[token], p + "input_layernorm.weight"),
                norm(hidden, p + "hidden_norm.weight"),
            ]
        )
        q = (w[p + "self_attn.q_proj.weight"] @ x).view(1, heads, hd)
        kk = (w[p + "self_attn.k_proj.weight"] @ x).view(1, kv_heads, hd)
        v = (w[p + "self_attn.v_proj.weight"] @ x).view(kv_heads, hd)
        position = torch.tensor([pos])
        q, kk = rope(q, position)[0], rope(kk, position)[0]
        keys.append(kk)
        values.append(v)
        K, V = torch.stack(keys), torch.stack(values)  # [T, kvh, hd]
        rep = heads // kv_heads
        K, V = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)
        att = torch.einsum("hd,thd->ht", q, K) / hd**0.5
        o = torch.einsum("ht,thd->hd", att.softmax(-1), V).reshape(-1)
        h = hidden + w[p + "self_attn.o_proj.weight"] @ o
        m = norm(h, p + "post_attention_layernorm.weight")
        gate, up = w[p + "mlp.gate_proj.weight"] @ m, w[p + "mlp.up_proj.weight"] @ m
        return h + w[p + "mlp.down_proj.weight"] @ (torch.nn.functional.silu(gate) * up)

    def choose(h: torch.Tensor) -> int:
        logits = w["lm_head.weight"] @ norm(h, "norm.weight")
        i = int(logits.argmax())
        return i + int(w["d2t"][i])

    n = len(tokens)
    for t in range(n - 1):
        h = step(tokens[t + 1], feats[t], t)
    drafts = [choose(h)]
    for j in range(1, k):
        h = step(drafts[-1], h, n - 2 + j)
        drafts.append(choose(h))
    return drafts

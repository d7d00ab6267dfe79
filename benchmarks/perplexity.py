"""Perplexity of a real model on a short real text, unquantized against FP8: how much accuracy
FP8 weights and activations cost (the issue's goal: within 2% of bf16).

Each variant is the engine's own model, loaded as `LLM(...)` loads it (with
`quantization="fp8"` the loader's transform quantizes every linear layer but the output head),
run eagerly on one prefill of the whole text through the torch attention backend; perplexity is
exp(mean negative log-likelihood of each next token). The text is English prose written for this
script (TEXT below, a few hundred tokens). Default model: the embedded SmolLM2-135M-Instruct
(its Q4_1 GGUF, dequantized at load). On CPU the FP8 variant runs the reference FP8 path
(dequantize, multiply in float32).

  python benchmarks/perplexity.py                       # CPU: float32, bf16 and FP8 (on bf16)
  python benchmarks/perplexity.py --variants bfloat16,bfloat16+fp8 --model PATH
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, print_table, write_result  # noqa: E402

TEXT = """\
The lighthouse keeper had lived on the island for eleven years, and in that time he had learned
to read the weather the way other people read the morning paper. A thin line of cloud on the
western horizon meant rain by evening. A sudden stillness in the gulls meant wind. He kept a
notebook on the kitchen table where he wrote down the height of the tide, the colour of the
sky at dawn, and the names of the boats that passed close enough to be seen without the
glass.

Supplies came once a fortnight on a small ferry that also carried the post. The captain was a
cheerful woman who always stayed for a cup of tea, and she brought news from the mainland:
the price of fish, a new school being built in the harbour town, an argument at the council
about the road to the quarry. He listened more than he spoke. When she left, the island grew
quiet again, and he found that he did not mind the quiet at all.

In the winter the storms were long and loud. Waves broke over the lower rocks and threw spray
against the windows of the tower, and the whole building seemed to hum with the force of the
wind. On those nights he climbed the stairs every few hours to check the lamp, to wipe the
glass and to listen to the engine that turned the lens. It was simple work, but it mattered.
Somewhere out in the dark a fishing crew was looking for that light, counting the seconds
between the flashes, and steering for home.

When spring arrived the island changed completely. Small flowers opened between the stones,
seals returned to the sandbar at the northern end, and the evenings stretched out until almost
ten o'clock. He repainted the door, mended the fence around the vegetable garden, and wrote a
long letter to his sister, telling her that he was well and that she should visit in the
summer, when the sea was calm and the days were long.
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded one)")
    p.add_argument(
        "--variants",
        default="float32,bfloat16,bfloat16+fp8",
        help="comma-separated DTYPE or DTYPE+QUANTIZATION; the first bf16 one without "
        "quantization is the reference the others are compared with",
    )
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def perplexity(model_path: str | None, dtype: str, quantization: str | None, device: str) -> dict:
    import numpy as np
    import torch

    from compiled_llm.attention_backends.base import AttentionInputs
    from compiled_llm.attention_backends.registry import create_backend
    from compiled_llm.config import EngineArgs
    from compiled_llm.forward_context import ForwardContext, set_forward_context
    from compiled_llm.models.attention import layer_attention
    from compiled_llm.models.loader import load_engine_tokenizer, load_model

    config = EngineArgs(
        model=model_path,
        dtype=dtype,
        quantization=quantization,
        device=device,
        enforce_eager=True,
        attention_backend="torch",
    ).create_config()
    mc = config.model_config
    ids = load_engine_tokenizer(mc.tokenizer).encode(TEXT)
    start = time.perf_counter()
    model = load_model(mc, config.device)
    load_s = time.perf_counter() - start
    block = config.cache_config.block_size
    spec = mc.attention_spec(block, config.device, layer_attention(model, mc.num_layers))
    backend = create_backend("torch", spec)
    n = len(ids)
    pages = -(-n // block)
    caches = backend.allocate_kv_caches(pages, mc.num_layers)
    attn, positions = AttentionInputs.from_batch(
        np.array([n]), np.array([n]), np.arange(pages, dtype=np.int32)[None], block, config.device
    )
    start = time.perf_counter()
    with torch.inference_mode():
        with set_forward_context(ForwardContext(backend, caches, backend.build_metadata(attn))):
            hidden = model(
                torch.tensor(ids, device=config.device),
                torch.from_numpy(positions).to(config.device),
            )
        logits = model.compute_logits(hidden[: n - 1])
        nll = torch.nn.functional.cross_entropy(
            logits.double(), torch.tensor(ids[1:], device=config.device), reduction="mean"
        )
    return {
        "dtype": dtype,
        "quantization": quantization,
        "tokens": n,
        "perplexity": math.exp(float(nll)),
        "mean_nll": float(nll),
        "load_s": load_s,
        "forward_s": time.perf_counter() - start,
    }


def main() -> None:
    args = parse_args()
    env = environment()
    print("config:", json.dumps(vars(args)), json.dumps(env), sep="\n  ")
    results = []
    for variant in args.variants.split(","):
        dtype, _, quantization = variant.partition("+")
        results.append(perplexity(args.model, dtype, quantization or None, args.device))
        r = results[-1]
        print(f"{variant}: perplexity {r['perplexity']:.4f} over {r['tokens']} tokens")
    ref = next(
        (r for r in results if r["quantization"] is None and r["dtype"] == "bfloat16"), results[0]
    )
    for r in results:
        r["vs_reference"] = r["perplexity"] / ref["perplexity"] - 1
    name = "perplexity-" + ("embedded" if args.model is None else os.path.basename(args.model))
    folder = "cpu" if args.device == "cpu" else ""
    path = write_result(name, {"config": vars(args), "env": env, "results": results}, folder)
    print(f"\nresults: {path}\n")
    rows = [
        [
            r["dtype"] + (f" + {r['quantization']}" if r["quantization"] else ""),
            r["tokens"],
            r["perplexity"],
            f"{100 * r['vs_reference']:+.2f}%",
            r["forward_s"],
        ]
        for r in results
    ]
    print_table(["variant", "tokens", "perplexity", f"vs {ref['dtype']}", "forward s"], rows)


if __name__ == "__main__":
    main()

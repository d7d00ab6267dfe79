"""`compiled-llm` command line: `generate`, `serve`, `passes` (each a subcommand module)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags shared by every subcommand that builds an engine (vLLM's names)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--attention-backend", default="auto", help="auto | flashinfer | triton | torch")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("-O", dest="compilation_level", type=int, default=None, help="0, 1 or 2")
    g.add_argument("--enforce-eager", action="store_true", help="same as -O0")
    g.add_argument("--passes", default="", help='comma-separated "+name"/"-name" pass edits')
    g.add_argument("--compile-cache-dir", default=None)
    g.add_argument("--compile-dump-dir", default=None)
    g.add_argument("--profile-dir", default=None)
    g.add_argument("--nvtx", action="store_true", help="NVTX ranges for Nsight Systems")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--load-format", default="auto", help="auto | dummy (random weights)")
    g.add_argument(
        "--skip-tokenizer-init", action="store_true", help="token ids in and out, no text"
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return dict(
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        block_size=args.block_size,
        attention_backend=args.attention_backend,
        enable_prefix_caching=args.enable_prefix_caching,
        compilation_level=args.compilation_level,
        enforce_eager=args.enforce_eager,
        passes=[p for p in args.passes.split(",") if p],
        compile_cache_dir=args.compile_cache_dir,
        compile_dump_dir=args.compile_dump_dir,
        profile_dir=args.profile_dir,
        nvtx=args.nvtx,
        seed=args.seed,
        load_format=args.load_format,
        skip_tokenizer_init=args.skip_tokenizer_init,
    )


def _generate(args: argparse.Namespace) -> int:
    from compiled_llm import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed
    )
    if args.profile_dir:  # the whole generation is the profiled window
        llm.start_profile()
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)
    if args.profile_dir:
        print(f"profiler trace: {llm.stop_profile()}", file=sys.stderr)
    text = out[0].outputs[0].text
    print(text if args.chat else args.prompt + text)
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt and print it")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    add_engine_args(p)
    p.set_defaults(func=_generate)


# Subcommands register themselves here; serve and passes live beside their packages.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_generate]


def _load_optional_subcommands() -> None:
    import importlib

    for module_name in ("compiled_llm.server.cli", "compiled_llm.passes.cli"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        if module.add_subcommand not in _SUBCOMMANDS:
            _SUBCOMMANDS.append(module.add_subcommand)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _load_optional_subcommands()
    parser = argparse.ArgumentParser(prog="compiled-llm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    if args.verbose:
        logging.getLogger("compiled_llm").setLevel(logging.INFO)
    try:
        return int(args.func(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

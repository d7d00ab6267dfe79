"""`compiled-llm generate PROMPT`: complete one prompt and print it."""

from __future__ import annotations

import argparse
import sys

from compiled_llm.cli.args import (
    add_engine_args,
    add_sampling_args,
    engine_kwargs,
    sampling_params,
    usage_errors,
)
from compiled_llm.config import EngineArgs


def _generate(args: argparse.Namespace) -> int:
    from compiled_llm.llm import LLM, GenerationInterrupted

    with usage_errors(args):  # everything is checked before the model loads
        params = sampling_params(args)
        kwargs = engine_kwargs(args)
        EngineArgs.from_kwargs(**kwargs)
    llm = LLM(**kwargs)
    if args.profile_dir:  # the whole generation is the profiled window
        llm.start_profile()
    try:
        if args.chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            out = llm.generate(args.prompt, params, use_tqdm=False)
    except GenerationInterrupted as e:  # Ctrl-C: what was generated so far, exit 130
        partial = e.outputs[0]
        text = partial.outputs[0].text if partial is not None else ""
        print(text if args.chat else args.prompt + text, flush=True)
        print("interrupted", file=sys.stderr)
        return 130
    if args.profile_dir:
        print(f"profiler trace: {llm.stop_profile()}", file=sys.stderr)
    text = out[0].outputs[0].text
    print(text if args.chat else args.prompt + text)
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="complete one prompt and print it",
        description="Complete one prompt and print it (Ctrl-C prints what was generated so far).",
    )
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=_generate, parser=p)

"""`compiled-llm passes list` and `compiled-llm passes report [MODEL]`."""

from __future__ import annotations

import argparse
import dataclasses
import json

from compiled_llm.cli.args import add_engine_args, at_least, engine_kwargs, usage_errors
from compiled_llm.compilation.report import run_report
from compiled_llm.config import EngineArgs
from compiled_llm.passes.registry import REQUIRED, all_names, builtin_names, get_pass


def _list(args: argparse.Namespace) -> int:
    print(f"{'pass':<20} {'stage':<10} {'default':<8} fuses / does")
    for name in all_names():
        cls = get_pass(name)
        if name in REQUIRED:
            default = "required"
        elif cls.default_for_quantization:
            default = "+".join(cls.default_for_quantization)  # on for models quantized so
        elif cls.default_for_device_dtypes:  # on for these devices and dtypes, e.g. cpu:float32
            default = "+".join(
                f"{d}:{str(t).removeprefix('torch.')}" for d, t in cls.default_for_device_dtypes
            )
        else:
            default = "on" if cls.enabled_by_default else "off"
        print(f"{name:<20} {cls.stage:<10} {default:<8} {cls.description}")
    print(
        '\nselect with --passes "+name,-name" (or +pkg.module:Class for your own pass); '
        "default fp8: on for models with FP8 weights"
    )
    return 0


def _report(args: argparse.Namespace) -> int:

    with usage_errors(args):  # everything is checked before the model loads
        kwargs = engine_kwargs(args)
        if args.all:
            kwargs["passes"] = (*(f"+{n}" for n in builtin_names()), *kwargs["passes"])
        EngineArgs.from_kwargs(**kwargs)
    report = run_report(
        kwargs, num_tokens=args.num_tokens, num_reqs=args.num_reqs, steps=args.steps
    )
    print(
        f"model {report.model}\n{report.device}, {report.dtype}, attention {report.attention_backend}"
        f", batch of {report.num_tokens} tokens in {report.num_reqs} prefills, median of "
        f"{report.steps} steps, -O1 (Inductor, no CUDA graphs)\npipeline: "
        + ", ".join(report.pipeline)
    )
    header = (
        f"{'pass':<20} {'stage':<10} {'matches':>7} {'nodes before->after':>20} "
        f"{'off ms':>8} {'on ms':>8} {'on/off':>7} {'max|dlogit| off':>16} {'on':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in report.rows:
        nodes = f"{r.nodes_before}->{r.nodes_after}"
        print(
            f"{r.name:<20} {r.stage:<10} {r.matches:>7} {nodes:>20} {r.ms_off:>8.2f} "
            f"{r.ms_on:>8.2f} {r.ms_on / r.ms_off:>7.3f} {r.diff_off:>16.2e} {r.diff_on:>9.2e}"
        )
    print("-" * len(header))
    print(
        f"{'all vs required only':<63}{report.none_ms:>8.2f} {report.all_ms:>8.2f} "
        f"{report.all_ms / report.none_ms:>7.3f} {report.none_diff:>16.2e} {report.all_diff:>9.2e}"
    )
    print(f"{'eager (-O0)':<72}{report.eager_ms:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=2)
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "passes",
        help="list the compiler passes, or measure them on a model",
        description="List the compiler passes, or measure them on a model.",
    )
    actions = p.add_subparsers(dest="passes_command", required=True)
    listing = actions.add_parser("list", help="every pass: stage, on/off by default, what it fuses")
    listing.set_defaults(func=_list, parser=listing)
    r = actions.add_parser(
        "report",
        help="per pass: matches, graph nodes, step time off vs on, logit difference vs eager",
        description="Per pass: matches, graph nodes, step time off vs on, logit difference vs "
        "eager (-O1, compile caches off).",
    )
    r.add_argument("--all", action="store_true", help="every built-in pass on, not the defaults")
    r.add_argument(
        "--num-tokens",
        type=at_least(1),
        default=32,
        help="tokens in the timed batch (default: %(default)s)",
    )
    r.add_argument(
        "--num-reqs",
        type=at_least(1),
        default=4,
        help="requests the batch is split into (default: %(default)s)",
    )
    r.add_argument(
        "--steps",
        type=at_least(1),
        default=10,
        help="timed steps per variant, median (default: %(default)s)",
    )
    r.add_argument("--json", default=None, help="also write the report here (default: no file)")
    # The report compiles at -O1 itself (Inductor, no CUDA graphs): no -O or --enforce-eager.
    add_engine_args(r, model_positional=True, without=("compilation_level", "enforce_eager"))
    r.set_defaults(func=_report, parser=r)

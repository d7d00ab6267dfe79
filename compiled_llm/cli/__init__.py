"""`compiled-llm` command line: `generate`, `serve`, `passes`, one module each in this package.
Nothing else imports it: the command line sits above every other part of the engine."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

from compiled_llm.cli import generate, passes, serve
from compiled_llm.cli.args import Parser, passes_importable_from_cwd


def build_parser() -> Parser:
    parser = Parser(
        prog="compiled-llm",
        description="Generate text, serve an OpenAI-compatible API, or inspect compiler passes.",
    )
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument(
        "-v", "--verbose", action="store_true", help="also log details (each pass, each piece)"
    )
    loud.add_argument(
        "-q", "--quiet", action="store_true", help="no progress: only warnings and errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (generate, serve, passes):
        module.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 for a bad argument or model (message, no traceback), 130 on Ctrl-C."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # One status line per start stage by default (loading weights, compiling, capturing, ready).
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.getLogger("compiled_llm").setLevel(level)
    passes_importable_from_cwd(getattr(args, "passes", ()))
    try:
        return int(args.func(args))
    except ValueError as e:
        print(f"{args.parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `compiled-llm` command: `main`, then `exit_now` with its status."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown (collecting every object of torch,
    Inductor and the model: 1.5-2 s of a 2-core start), once everything an ordinary exit would
    still do is done: outputs flushed, logging shut down, atexit callbacks run (compile workers,
    multiprocessing children, weakref finalizers such as temporary folders). What is skipped is
    only the freeing of memory and `__del__` of objects still alive, which Python does not
    promise at exit either. While a non-daemon thread runs, the ordinary exit waits for it."""
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    logging.shutdown()
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # e.g. a closed pipe: the ordinary exit reports it as it always has
        sys.exit(code)
    os._exit(code)

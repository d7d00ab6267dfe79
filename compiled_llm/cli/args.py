"""What the subcommands share: the engine flags, generated from EngineArgs' fields
(compiled_llm/config.py: one flag per field, its type, default and help taken from the field, so a
new engine option needs no CLI code), the sampling flags, and argument checking."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from compiled_llm.config import EngineArgs
from compiled_llm.sampling_params import SamplingParams


class Parser(argparse.ArgumentParser):
    """Unknown arguments are refused by the parser that met them, so a subcommand's error shows
    that subcommand's usage (argparse hands them up to the top-level parser, whose usage says
    nothing about the subcommand's flags)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def comma_list(item: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type: "a,b,c" -> a tuple of `item`s (empty entries dropped)."""

    def parse(text: str) -> tuple[Any, ...]:
        return tuple(item(x.strip()) for x in text.split(",") if x.strip())

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')} list"
    return parse


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


json_object.__name__ = "JSON object"


def json_strings(text: str) -> list[str]:
    """An argparse type: a JSON list of strings."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"must be a JSON list of strings, got {text!r}")
    return value


json_strings.__name__ = "JSON list of strings"


def _cli_type(hint: Any) -> Any:
    """The argparse type of a field annotation: `X | None` -> X, `list[X] | tuple[X, ...]` -> a
    comma-separated list of X, `dict[...]` -> a JSON object."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (list, tuple):
        return comma_list(typing.get_args(hint)[0])
    if typing.get_origin(hint) is dict:
        return json_object
    return hint


def _add_flag(
    group: Any,
    flags: Sequence[str],
    dest: str,
    hint: Any,
    default: Any,
    help: str,
    meta: typing.Mapping[str, Any],
) -> None:
    """One flag of a dataclass field: type from its annotation (bool: --x/--no-x), its default,
    its help with the default shown (help of a None or empty default says what that means)."""
    help = help.replace("%", "%%")
    if default not in (None, ()):
        help += " (default: %(default)s)"
    kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": help}
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = _cli_type(hint)
        choices = meta.get("choices")
        if choices is not None:
            kwargs["choices"] = choices() if callable(choices) else choices
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
    group.add_argument(*flags, **kwargs)


def add_engine_args(
    parser: argparse.ArgumentParser,
    *,
    model_positional: bool = False,
    without: Collection[str] = (),
) -> None:
    """A flag for every EngineArgs field (`--field-name`, vLLM's names). `model_positional`: the
    model is also the optional positional MODEL (serve, passes report), with `--model` beside it.
    `without`: fields the subcommand sets itself (no flag; `engine_kwargs` gives their default)."""
    group = parser.add_argument_group(
        "engine", "EngineArgs: each flag is the LLM(...) keyword of the same name"
    )
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        if f.name in without:
            continue
        flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
        dest = f.name
        if f.name == "model" and model_positional:
            parser.add_argument("model", nargs="?", default=None, help=f.metadata["help"])
            dest = "model_flag"
        _add_flag(group, flags, dest, hints[f.name], f.default, f.metadata["help"], f.metadata)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Every EngineArgs field from a namespace that `add_engine_args` filled."""
    kwargs = {f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(EngineArgs)}
    flag = getattr(args, "model_flag", None)
    if flag is not None:
        if kwargs["model"] not in (None, flag):
            raise ValueError("give the model once: positional MODEL or --model")
        kwargs["model"] = flag
    return kwargs


@contextlib.contextmanager
def usage_errors(args: argparse.Namespace) -> Iterator[None]:
    """A ValueError inside is a bad command-line value: argparse prints the subcommand's usage
    and the message, and exits 2. Subcommands check every value this way before loading."""
    try:
        yield
    except ValueError as e:
        args.parser.error(str(e))


# generate's sampling flags: SamplingParams fields, with their types and defaults, except
# generate's own defaults below. The request's seed is --sampling-seed, apart from the engine's
# --seed (vLLM's name for the engine seed).
_SAMPLING_HELP = {
    "max_tokens": "most tokens to generate",
    "temperature": "0 is greedy; higher flattens the distribution",
    "top_p": "sample from the smallest set of tokens whose probability reaches this",
    "top_k": "sample from the k most likely tokens (0: all)",
    "min_p": "drop tokens less likely than this times the most likely one",
    "presence_penalty": "subtracted from the logit of every token already generated, in [-2, 2]",
    "frequency_penalty": "subtracted once per earlier occurrence of a token, in [-2, 2]",
    "repetition_penalty": "divides positive logits of tokens seen in the prompt or output "
    "(multiplies negative ones); 1 is off",
    "ignore_eos": "keep generating after the end-of-sequence token, up to --max-tokens",
    "seed": "this request's sampling seed (SamplingParams.seed); without it the request's seed "
    "is drawn from the engine's --seed, so runs repeat either way",
}
_GENERATE_DEFAULTS: dict[str, Any] = {"max_tokens": 64, "temperature": 0.0}
_SAMPLING_DEST = {"seed": "sampling_seed"}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling", "SamplingParams of the request")
    hints = typing.get_type_hints(SamplingParams)
    for f in dataclasses.fields(SamplingParams):
        if f.name not in _SAMPLING_HELP:
            continue
        dest = _SAMPLING_DEST.get(f.name, f.name)
        flag = "--" + dest.replace("_", "-")
        default = _GENERATE_DEFAULTS.get(f.name, f.default)
        _add_flag(group, (flag,), dest, hints[f.name], default, _SAMPLING_HELP[f.name], {})


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The request's SamplingParams (validated: a bad value raises ValueError)."""
    return SamplingParams(
        **{name: getattr(args, _SAMPLING_DEST.get(name, name)) for name in _SAMPLING_HELP}
    )


def passes_importable_from_cwd(passes: Sequence[str]) -> None:
    """A pass named by dotted path (+pkg.module:Class) imports from the current folder, as under
    `python -m`: an installed console script's sys.path lacks that folder. Processes spawned
    later (the server's engine core) start with a copy of sys.path, so they find it too."""
    if any("." in p or ":" in p for p in passes):
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)

"""Warm starts without Dynamo: the split graph saved next to its compiled pieces.

For a given cache key (model config, pass pipeline, our source, torch version), Dynamo's trace
plus our graph-stage passes always produce the same split graph, and on an 8B model that trace is
most of a warm start. So a cold start also saves what it takes to call the split graph without
Dynamo: its FX code (pickled: GraphModules serialize as code), which compiled piece each
submodule is, where each graph input comes from, and which inputs must share one storage. A warm
start loads that, binds the inputs and calls the graph directly: no tracing, no guards.

Where each input comes from: a tensor of the model (parameter, buffer or plain tensor attribute)
by dotted name, a forward argument by position, or a size of one. A graph with an input of any
other kind is not saved; the next start traces with Dynamo again.

On x86 CPUs it also records the vector instruction sets Inductor found usable when it built the
pieces. Inductor probes them in every process (a test build and a subprocess that loads it, per
ISA: 2-3 s of a warm start on a 2-core machine); a warm start loads the pieces with the record
instead, unless it was made under other conditions (then Inductor probes as usual).
"""

from __future__ import annotations

import contextlib
import inspect
import pickle
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from compiled_llm.passes.storage import merge_storage

FORMAT = 2


@dataclass(frozen=True)
class InputSource:
    """Where one input of the split graph comes from."""

    kind: Literal["tensor", "arg", "size"]
    name: str = ""  # "tensor": dotted name in the model
    arg: int = 0  # "arg" and "size": forward argument position
    dim: int = 0  # "size": which dimension

    def resolve(self, model: nn.Module) -> torch.Tensor:
        module_name, _, attr = self.name.rpartition(".")
        value = getattr(model.get_submodule(module_name), attr)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{self.name} is not a tensor")
        return value


@dataclass(frozen=True)
class SavedGraph:
    format: int
    graph: bytes  # pickled split GraphModule, compiled pieces replaced by empty modules
    pieces: dict[str, tuple[str, bool]]  # submodule -> (piece key, returns a single value)
    inputs: tuple[InputSource, ...]
    storage_groups: tuple[tuple[str, ...], ...]  # model tensors laid out back to back, in order
    out_spec: str  # pytree spec of the forward's result over the graph's outputs
    vec_isa: dict[str, Any] | None = None  # Inductor's CPU ISAs (probed_vec_isa), x86 only

    def dumps(self) -> bytes:
        return pickle.dumps(self)

    @staticmethod
    def loads(data: bytes) -> SavedGraph:
        saved = pickle.loads(data)
        if not isinstance(saved, SavedGraph) or saved.format != FORMAT:
            raise ValueError("not a saved graph of this format")
        return saved


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model holds (parameters, buffers, plain tensor attributes), each once,
    under the first dotted name that reaches it."""
    named: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        members = {**module._parameters, **module._buffers}
        members.update((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor))
        for attr, value in members.items():
            if value is not None and id(value) not in seen:
                seen.add(id(value))
                named[prefix + attr] = value
    return named


def describe_inputs(
    forward: Callable[..., Any],
    model: nn.Module,
    call_args: Sequence[Any],
    example_inputs: Sequence[Any],
    sources: Sequence[Any],
) -> tuple[InputSource, ...] | None:
    """Sources of the captured graph's inputs (Dynamo's example values and their sources), or
    None if one cannot be named."""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource

    arg_index = {n: i for i, n in enumerate(inspect.signature(forward).parameters)}
    tensors = {id(t): name for name, t in model_tensors(model).items()}
    out = []
    for value, source in zip(example_inputs, sources, strict=True):
        if isinstance(value, torch.Tensor):
            hit = [i for i, a in enumerate(call_args) if a is value]
            if hit:
                out.append(InputSource("arg", arg=hit[0]))
            elif id(value) in tensors:
                out.append(InputSource("tensor", name=tensors[id(value)]))
            else:
                return None
        elif (
            isinstance(source, TensorPropertySource)
            and source.prop is TensorProperty.SIZE
            and isinstance(source.base, LocalSource)
            and source.base.local_name in arg_index
            and source.idx is not None
        ):
            out.append(InputSource("size", arg=arg_index[source.base.local_name], dim=source.idx))
        else:
            return None
    return tuple(out)


def storage_groups(
    inputs: Sequence[InputSource], values: Sequence[Any]
) -> tuple[tuple[str, ...], ...]:
    """Model tensors among the inputs that share a storage (e.g. weights merged by gemm_merge),
    each group in storage order."""
    by_storage: dict[int, list[tuple[int, str]]] = {}
    for src, value in zip(inputs, values, strict=True):
        if src.kind == "tensor":
            key = value.untyped_storage().data_ptr()
            by_storage.setdefault(key, []).append((value.storage_offset(), src.name))
    return tuple(
        tuple(name for _, name in sorted(members))
        for members in by_storage.values()
        if len(members) > 1
    )


def graph_blob(split_gm: fx.GraphModule, is_split_piece: dict[str, bool]) -> bytes:
    """The split graph with its to-be-compiled pieces left out (their artifacts are cached)."""
    shell = fx.GraphModule(split_gm, split_gm.graph)
    for name, splitting in is_split_piece.items():
        if not splitting:
            setattr(shell, name, nn.Module())
    return pickle.dumps(shell)


class SavedGraphForward:
    """Calls a saved split graph like the model's forward."""

    def __init__(
        self, gm: fx.GraphModule, saved: SavedGraph, model: nn.Module, num_args: int
    ) -> None:
        for group in saved.storage_groups:
            tensors = [InputSource("tensor", name=n).resolve(model) for n in group]
            if not merge_storage(tensors):
                raise ValueError(f"cannot lay out {group} in one storage")
        self.gm = gm
        self.spec = pytree.treespec_loads(saved.out_spec)
        self.inputs: list[Any] = []
        self.args: list[tuple[int, int]] = []  # (input slot, argument)
        self.sizes: list[tuple[int, int, int]] = []  # (input slot, argument, dim)
        for slot, src in enumerate(saved.inputs):
            if src.kind == "tensor":
                self.inputs.append(src.resolve(model))
                continue
            if src.arg >= num_args:
                raise ValueError(f"graph input from forward argument {src.arg}")
            self.inputs.append(None)
            if src.kind == "arg":
                self.args.append((slot, src.arg))
            else:
                self.sizes.append((slot, src.arg, src.dim))

    def __call__(self, *args: torch.Tensor) -> Any:
        inputs = list(self.inputs)
        for slot, i in self.args:
            inputs[slot] = args[i]
        for slot, i, dim in self.sizes:
            inputs[slot] = args[i].shape[dim]
        out = self.gm(*inputs)
        return pytree.tree_unflatten(list(out), self.spec)


# --- Inductor's CPU vector ISAs ------------------------------------------------------------------
def _isa_probe() -> Any | None:
    """Inductor's ISA probe on x86 (`cpu_vec_isa.valid_vec_isa_list`, a cached function), or
    None where there is none to skip or torch's internals differ from what this code knows:
    then nothing is recorded or replaced."""
    if platform.machine() != "x86_64":
        return None
    from torch._inductor import cpu_vec_isa

    probe = getattr(cpu_vec_isa, "valid_vec_isa_list", None)
    names = ("supported_vec_isa_list", "x86_isa_checker", "pick_vec_isa", "VecAMX")
    if not hasattr(probe, "cache_info") or not all(hasattr(cpu_vec_isa, n) for n in names):
        return None
    return probe


def _vec_isa_conditions() -> dict[str, Any]:
    """What the probe depends on besides the compile cache's key (which already names torch's
    version and the CPU's instruction sets): the compiler it builds with, the override, and the
    instruction sets torch reports. A record made under others is not used."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    return {
        "cxx": list(inductor_config.cpp.cxx),
        "vec_isa_ok": inductor_config.cpp.vec_isa_ok,
        "x86": cpu_vec_isa.x86_isa_checker(),
    }


def probed_vec_isa() -> dict[str, Any] | None:
    """What Inductor's probe found in this process, as a record for later starts; None if it has
    not run (this never probes)."""
    probe = _isa_probe()
    if probe is None or probe.cache_info().currsize == 0:
        return None
    isas = [
        {
            "class": type(isa).__name__,
            # set by the probe; they add compiler flags (build_arch_flags)
            "avx512_bf16": bool(getattr(isa, "_is_avx512_bf16_supported", False)),
            "amx_fp16": bool(getattr(isa, "_is_amx_fp16_supported", False)),
        }
        for isa in probe()
    ]
    return {"conditions": _vec_isa_conditions(), "isas": isas}


def _isas_from_record(record: Any) -> list[Any] | None:
    """The recorded ISAs as Inductor's objects, with the flags its probe sets; None if the
    record cannot be used here (then nothing is changed)."""
    import torch
    from torch._inductor import cpu_vec_isa

    if not isinstance(record, dict) or record.get("conditions") != _vec_isa_conditions():
        return None
    known = {type(isa).__name__: isa for isa in cpu_vec_isa.supported_vec_isa_list}
    try:
        entries = [
            (known[e["class"]], bool(e["avx512_bf16"]), bool(e["amx_fp16"])) for e in record["isas"]
        ]
    except (KeyError, TypeError):
        return None
    # The AMX probe also asks the kernel for this process's AMX tile permission.
    amx = any(isinstance(isa, cpu_vec_isa.VecAMX) for isa, _, _ in entries)
    if amx and not torch.cpu._init_amx():
        return None
    for isa, avx512_bf16, amx_fp16 in entries:
        if hasattr(isa, "_is_avx512_bf16_supported"):
            isa._is_avx512_bf16_supported = avx512_bf16
        if hasattr(isa, "_is_amx_fp16_supported"):
            isa._is_amx_fp16_supported = amx_fp16
    return [isa for isa, _, _ in entries]


@contextlib.contextmanager
def recorded_vec_isa(record: dict[str, Any] | None) -> Iterator[None]:
    """Inside the block, Inductor takes its CPU ISAs from `record` (probed_vec_isa of an earlier
    start) instead of probing; loading a compiled piece asks for them. Without a usable record,
    or once this process has probed, Inductor is left as it is."""
    probe = _isa_probe()
    probed = probe is None or probe.cache_info().currsize > 0
    isas = None if record is None or probed else _isas_from_record(record)
    if isas is None:
        yield
        return
    from torch._inductor import cpu_vec_isa

    # pick_vec_isa() looks valid_vec_isa_list up in its module at each call.
    cpu_vec_isa.valid_vec_isa_list = lambda: list(isas)  # type: ignore[assignment]
    try:
        yield
    finally:
        cpu_vec_isa.valid_vec_isa_list = probe  # type: ignore[assignment]

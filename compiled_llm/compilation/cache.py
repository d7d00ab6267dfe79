"""On-disk cache of compiled pieces.

Layout: `<root>/<engine key>/<name>.bin` plus `<name>.sha256`: one entry per compiled piece
(named by its piece key) and one, `graph`, for the split graph that lets warm starts skip Dynamo
(graph_cache.py). The engine key hashes everything a compiled piece depends on besides its own
graph: torch's version, our own source code, Inductor's configuration (which TORCHINDUCTOR_*
variables set), the pass pipeline's uuids and options, the model config, dtype, device and
attention backend, and the machine (`platform_key`): the GPU and its
compute capability, or on CPU its instruction sets and thread count, and the CUDA, Triton and
FlashInfer versions. Warm starts skip Dynamo's guards, so nothing else would notice a cache
directory shared between machines: a different machine is a different key, and builds its own.
A piece key hashes the piece's graph and input layout. An entry whose checksum does not match,
or that fails to load, is deleted and rebuilt; it never stops a start.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

import compiled_llm.envs as envs

logger = logging.getLogger(__name__)

T = TypeVar("T")


@contextlib.contextmanager
def no_compile_caches() -> Iterator[None]:
    """No compile cache and no Inductor/AOT caches: every stage runs (graph passes, Inductor
    with our post-grad passes), as graph dumps and pass measurements need."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # Without Inductor's cache, standalone_compile warns that it cannot make a saveable
    # artifact; nothing compiled here is saved.
    quiet = logging.getLogger("torch._inductor.standalone_compile")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with (
            envs.override(disable_compile_cache=True),
            inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False),
            functorch_config.patch(enable_autograd_cache=False),
        ):
            yield
    finally:
        quiet.setLevel(level)


def source_hash() -> str:
    """Hash of our own Python sources that shape compiled code (the server's excluded). The
    packages are found, not imported: this module sits below them."""
    files: set[Path] = set()
    for package in ("compiled_llm", "compiled_llm.passes", "compiled_llm.attention_backends"):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin is not None
        root = Path(spec.origin).resolve().parent
        files.update(p for p in root.rglob("*.py") if "server" not in p.relative_to(root).parts)
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def dist_version(*names: str) -> str | None:
    """The installed version of the first of these distributions found, read from its metadata
    (importing FlashInfer to ask it would take seconds)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def gpu_properties(device: torch.device) -> dict[str, Any]:
    """The GPU's name and compute capability: what Triton and Inductor compile for."""
    props = torch.cuda.get_device_properties(device)
    found: dict[str, Any] = {"name": props.name, "capability": f"{props.major}.{props.minor}"}
    if torch.version.hip:
        found["arch"] = props.gcnArchName
    return found


def cpu_properties() -> dict[str, Any]:
    """What Inductor's C++ code is built for: the instruction sets (its vector ISA follows
    them and ATEN_CPU_CAPABILITY), and the thread count it writes into `omp parallel`."""
    probe = getattr(torch.cpu, "get_capabilities", None)  # newer than torch 2.11
    caps: Mapping[str, Any] = probe() if probe is not None else {}
    return {
        "arch": platform.machine(),
        "isa": sorted(k for k, v in caps.items() if v is True),
        "sve_max_length": caps.get("sve_max_length"),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def platform_key(device: torch.device) -> dict[str, Any]:
    """The machine and toolchain compiled pieces were built for."""
    key: dict[str, Any] = {
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "triton": dist_version("triton", "pytorch-triton", "pytorch-triton-rocm"),
        "flashinfer": dist_version("flashinfer-python", "flashinfer"),
    }
    if device.type == "cuda":
        key["gpu"] = gpu_properties(device)
    elif device.type == "cpu":
        key["cpu"] = cpu_properties()
    return key


def engine_key(parts: dict[str, Any]) -> str:
    """`parts` names the device the pieces run on (`parts["device"]`, e.g. "cuda" or "cuda:1";
    a bare "cuda" is the current device)."""
    import torch._inductor.config as inductor_config

    device = torch.device(parts.get("device", "cpu"))
    payload = dict(
        parts,
        torch=torch.__version__,
        source=source_hash(),
        platform=platform_key(device),
        # e.g. TORCHINDUCTOR_ENABLE_PDL=1 changes the kernels Inductor writes
        inductor=inductor_config.get_hash().hex(),
    )
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class CompileCache:
    def __init__(self, root: str, key: str) -> None:
        self.dir = Path(root) / key
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.bin", self.dir / f"{name}.sha256"

    def _read(self, name: str) -> tuple[Path, bytes] | None:
        """An entry's bytes if present and matching its checksum; a mismatch raises."""
        blob, digest = self._paths(name)
        if not blob.exists():
            return None
        data = blob.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest.read_text().strip():
            raise ValueError("checksum mismatch")
        return blob, data

    def _drop(self, name: str, error: Exception) -> None:
        blob, digest = self._paths(name)
        logger.warning("compile cache entry %s is corrupt (%s); rebuilding it", blob, error)
        blob.unlink(missing_ok=True)
        digest.unlink(missing_ok=True)
        self.rebuilt += 1

    def load(self, piece_key: str) -> Any | None:
        """A compiled piece (an Inductor artifact), or None if absent or broken."""
        from torch._inductor import CompiledArtifact

        try:
            found = self._read(piece_key)
            artifact = (
                None
                if found is None
                else CompiledArtifact.load(path=str(found[0]), format="binary")
            )
        except Exception as e:  # noqa: BLE001 - any broken entry is rebuilt, never fatal
            self._drop(piece_key, e)
            artifact = None
        if artifact is None:
            self.misses += 1
            return None
        self.hits += 1
        return artifact

    def load_bytes(self, name: str, parse: Callable[[bytes], T]) -> T | None:
        """`parse` of a raw entry, or None if absent or broken (then the entry is deleted)."""
        try:
            found = self._read(name)
            return None if found is None else parse(found[1])
        except Exception as e:  # noqa: BLE001 - any broken entry is rebuilt, never fatal
            self._drop(name, e)
            return None

    def save(self, piece_key: str, artifact: Any) -> None:
        self._write(piece_key, lambda path: artifact.save(path=path, format="binary"))

    def save_bytes(self, name: str, data: bytes) -> None:
        self._write(name, lambda path: Path(path).write_bytes(data))

    def _write(self, name: str, write: Callable[[str], object]) -> None:
        """Write to a temporary file, then move it into place: readers never see half."""
        blob, digest = self._paths(name)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            os.close(fd)
            write(tmp)
            data = Path(tmp).read_bytes()
            os.replace(tmp, blob)
            digest.write_text(hashlib.sha256(data).hexdigest())
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written is only slower
            logger.warning("could not write compile cache entry %s: %s", blob, e)

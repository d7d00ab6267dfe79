"""The compile cache's engine key names the machine: a different GPU, compute capability, CUDA,
Triton or FlashInfer version, or CPU instruction set or thread count is a different key (a cache
directory shared between machines never hands one machine's artifacts to another), and the key
is stable when nothing changes. The probes are replaced, so this runs without a GPU."""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any

import pytest
import torch

from compiled_llm.compilation import cache

PARTS = {"model": "{}", "dtype": "torch.float16", "attention_backend": "triton", "passes": "x"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}


@pytest.fixture(autouse=True)
def fixed_machine(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fixed GPU and fixed versions; our sources hashed as a constant (other work in the tree
    must not move the key under the test)."""
    machine: dict[str, Any] = {
        "gpu": dict(H100),
        "versions": {"triton": "3.6.0", "flashinfer-python": "0.6.18"},
    }
    monkeypatch.setattr(cache, "source_hash", lambda: "sources")
    monkeypatch.setattr(cache, "gpu_properties", lambda device: dict(machine["gpu"]))
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def version(name: str) -> str:
        if name in machine["versions"]:
            return str(machine["versions"][name])
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cache.importlib.metadata, "version", version)
    return machine


def key(device: str = "cuda") -> str:
    return cache.engine_key(dict(PARTS, device=device))


def test_stable_when_nothing_changes() -> None:
    assert key() == key()
    assert key("cpu") == key("cpu")
    assert key("cpu") != key("cuda")


@pytest.mark.parametrize(
    "change",
    [
        lambda m, mp: m["gpu"].update(name="NVIDIA H200"),
        lambda m, mp: m["gpu"].update(capability="10.0"),
        lambda m, mp: mp.setattr(torch.version, "cuda", "12.8"),
        lambda m, mp: m["versions"].update(triton="3.7.1"),
        lambda m, mp: m["versions"].pop("triton"),
        lambda m, mp: m["versions"].update({"flashinfer-python": "0.6.19"}),
        lambda m, mp: m["versions"].pop("flashinfer-python"),
    ],
    ids=["gpu-name", "capability", "cuda", "triton", "no-triton", "flashinfer", "no-flashinfer"],
)
def test_gpu_key_changes_with_the_machine(fixed_machine, monkeypatch, change) -> None:
    before = key()
    change(fixed_machine, monkeypatch)
    assert key() != before


def test_cpu_key_changes_with_isa_and_threads(fixed_machine, monkeypatch) -> None:
    before = key("cpu")
    fixed_machine["gpu"]["name"] = "another GPU"  # not consulted on CPU
    assert key("cpu") == before

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # Inductor writes the count into its C++ code
    try:
        assert key("cpu") != before
    finally:
        torch.set_num_threads(threads)
    assert key("cpu") == before

    real = cache.cpu_properties()
    monkeypatch.setattr(cache, "cpu_properties", lambda: dict(real, isa=["avx2"]))
    assert key("cpu") != before
    monkeypatch.setattr(cache, "cpu_properties", lambda: dict(real, aten_capability="DEFAULT"))
    assert key("cpu") != before


def test_key_changes_with_inductor_config() -> None:
    """Inductor's settings (TORCHINDUCTOR_* variables) shape the kernels it writes: a start under
    others must not load these pieces."""
    import torch._inductor.config as inductor_config

    before = key()
    with inductor_config.patch({"triton.enable_pdl": not inductor_config.triton.enable_pdl}):
        assert key() != before
    assert key() == before


def test_gpu_probe_gets_the_device_in_use(monkeypatch) -> None:
    seen: list[torch.device] = []
    monkeypatch.setattr(cache, "gpu_properties", lambda d: seen.append(d) or dict(H100))
    key("cuda:1")
    assert seen == [torch.device("cuda:1")]


def test_flashinfer_version_is_read_without_importing_it() -> None:
    had = "flashinfer" in sys.modules
    assert cache.platform_key(torch.device("cpu"))["flashinfer"] == "0.6.18"
    assert ("flashinfer" in sys.modules) == had

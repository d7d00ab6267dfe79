"""On x86, a warm start takes Inductor's CPU vector ISAs from the saved graph instead of probing
them (a test build and a subprocess per ISA, in every process). A record made under other
conditions, or a broken one, is not used: Inductor probes as usual. The probe itself is
replaced by a fake here (this process's real one may have run already), except in the last
test, which starts fresh processes."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch._inductor.config as inductor_config
from torch._inductor import cpu_vec_isa

from compiled_llm.compilation.graph_cache import probed_vec_isa, recorded_vec_isa

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="recorded on x86 only")


def isa(cls: type) -> cpu_vec_isa.VecISA:
    return next(i for i in cpu_vec_isa.supported_vec_isa_list if type(i) is cls)


class FakeProbe:
    """Stands in for Inductor's probe (this process's real one may have run already): it finds
    AVX-512 with bf16, then AVX2, and counts its runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.avx512 = isa(cpu_vec_isa.VecAVX512)
        # restored after the test: the probe sets it on Inductor's own ISA object
        flag = self.avx512._is_avx512_bf16_supported
        monkeypatch.setattr(self.avx512, "_is_avx512_bf16_supported", flag)
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        self.new_process()

    def new_process(self) -> None:
        """What a fresh process sees: the probe not run yet, the flag it sets unset."""
        self.runs = 0
        self.avx512._is_avx512_bf16_supported = False

        @functools.cache
        def probe() -> list[cpu_vec_isa.VecISA]:
            self.runs += 1
            self.avx512._is_avx512_bf16_supported = True
            return [self.avx512, isa(cpu_vec_isa.VecAVX2)]

        self.monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", probe)


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProbe]:
    with inductor_config.patch({"cpp.simdlen": None}):
        yield FakeProbe(monkeypatch)


def test_recorded_isas_replace_the_probe(probe: FakeProbe) -> None:
    assert probed_vec_isa() is None and probe.runs == 0  # recording never probes
    picked = cpu_vec_isa.pick_vec_isa()
    record = probed_vec_isa()
    assert record is not None

    probe.new_process()
    fake = cpu_vec_isa.valid_vec_isa_list
    with recorded_vec_isa(record):
        again = cpu_vec_isa.pick_vec_isa()
    assert probe.runs == 0
    assert again is picked and "-mavx512bf16" in again.build_arch_flags()  # the probe's flags
    assert cpu_vec_isa.valid_vec_isa_list is fake  # restored after the block
    cpu_vec_isa.pick_vec_isa()
    assert probe.runs == 1  # outside the block Inductor probes as it would


@pytest.mark.parametrize(
    "patch", [{"cpp.cxx": (None, "clang++")}, {"cpp.vec_isa_ok": True}], ids=["cxx", "vec_isa_ok"]
)
def test_record_made_under_other_conditions_probes(patch: dict, probe: FakeProbe) -> None:
    cpu_vec_isa.pick_vec_isa()
    record = probed_vec_isa()
    probe.new_process()
    with inductor_config.patch(patch), recorded_vec_isa(record):
        cpu_vec_isa.pick_vec_isa()
    assert probe.runs == 1


@pytest.mark.parametrize(
    "spoil",
    [
        lambda r: {**r, "isas": [*r["isas"], {"class": "VecNew", "avx512_bf16": False}]},
        lambda r: {**r, "isas": [{"class": "VecAVX2"}]},
        lambda r: {"isas": r["isas"]},
        lambda r: "not a record",
    ],
    ids=["unknown-isa", "no-flags", "no-conditions", "junk"],
)
def test_broken_record_probes(spoil, probe: FakeProbe) -> None:
    cpu_vec_isa.pick_vec_isa()
    record = probed_vec_isa()
    probe.new_process()
    with recorded_vec_isa(spoil(record)):
        cpu_vec_isa.pick_vec_isa()
    assert probe.runs == 1


def test_no_record_or_already_probed_leaves_inductor_alone(probe: FakeProbe) -> None:
    cpu_vec_isa.pick_vec_isa()
    record = probed_vec_isa()
    fake = cpu_vec_isa.valid_vec_isa_list
    with recorded_vec_isa(None):
        assert cpu_vec_isa.valid_vec_isa_list is fake
    with recorded_vec_isa(record):  # this process has probed: its answer stands
        assert cpu_vec_isa.valid_vec_isa_list is fake


_START = """
import json, sys
from torch._inductor import cpu_vec_isa
dlopen_probes = []
real = cpu_vec_isa.VecISA._probe_load
cpu_vec_isa.VecISA._probe_load = lambda self, path: dlopen_probes.append(path) or real(self, path)
from compiled_llm import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=256, compilation_level=1, compile_cache_dir=sys.argv[2])
out = llm.generate(["Warm and cold agree"], SamplingParams(temperature=0, max_tokens=8,
                   ignore_eos=True), use_tqdm=False)
stats = llm.engine.core.runner.compiled.stats
print(json.dumps({"tokens": out[0].outputs[0].token_ids, "probes": len(dlopen_probes),
                  "warm": stats.warm and stats.dynamo_skipped}))
"""


@pytest.mark.slow
def test_warm_start_in_a_fresh_process_does_not_probe(tiny_models, tmp_path: Path) -> None:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))

    def start() -> dict:
        result = subprocess.run(
            [sys.executable, "-c", _START, str(tiny_models("llama")), str(tmp_path / "cc")],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    cold, warm = start(), start()
    assert not cold["warm"] and cold["probes"] > 0
    assert warm["warm"] and warm["probes"] == 0
    assert warm["tokens"] == cold["tokens"]

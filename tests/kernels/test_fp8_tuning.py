"""The tuned FP8 GEMM tables (kernels/fp8_tuning.py): what a table says is what the CUDA op runs,
and every table that ships parses."""

from __future__ import annotations

import json

import pytest
import torch

from compiled_llm.kernels import fp8_tuning
from compiled_llm.kernels.triton_fp8 import Tiles

TABLE = {
    "shapes": {
        "64,32": [
            {"max_tokens": 16, "kernel": "cublas"},
            {"max_tokens": 1, "kernel": "gemv", "block_n": 32, "block_k": 512, "num_warps": 8},
            {
                "max_tokens": 4,
                "kernel": "triton",
                "block_m": 16,
                "block_n": 16,
                "block_k": 128,
                "num_stages": 5,
            },
        ]
    }
}


@pytest.fixture
def table(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.setattr(fp8_tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(fp8_tuning, "_device_name", lambda index: "Test GPU 80GB")
    fp8_tuning.load_table.cache_clear()
    fp8_tuning.table_path("Test GPU 80GB").write_text(json.dumps(TABLE))
    yield
    fp8_tuning.load_table.cache_clear()


def test_first_entry_covering_the_token_count_is_chosen(table) -> None:  # noqa: ANN001
    dev = torch.device("cuda", 0)
    one = fp8_tuning.choose(64, 32, 1, dev)
    assert one is not None and one.kernel == "gemv"
    assert one.tiles == Tiles(1, 32, 512, num_warps=8, num_stages=3, gemv=True)
    three = fp8_tuning.choose(64, 32, 3, dev)
    assert three is not None and three.tiles == Tiles(16, 16, 128, num_stages=5)
    sixteen = fp8_tuning.choose(64, 32, 16, dev)
    assert sixteen is not None and sixteen.kernel == "cublas" and sixteen.tiles is None
    assert fp8_tuning.choose(64, 32, 17, dev) is None  # above the table: the default
    assert fp8_tuning.choose(128, 32, 1, dev) is None  # a shape it does not list


def test_a_gpu_without_a_table_keeps_the_defaults(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(fp8_tuning, "CONFIG_DIR", tmp_path)
    fp8_tuning.load_table.cache_clear()
    assert fp8_tuning.load_table("Other GPU") == {}
    fp8_tuning.load_table.cache_clear()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"max_tokens": 1, "kernel": "cutlass"}, "kernel must be one of"),
        ({"max_tokens": 2, "kernel": "gemv", "block_n": 32, "block_k": 256}, "one token"),
    ],
)
def test_bad_entries_are_refused(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fp8_tuning.parse_table({"shapes": {"64,32": [entry]}}, "t.json")


def test_shipped_tables_parse_and_use_tiles_the_tuner_tries() -> None:
    for path in fp8_tuning.CONFIG_DIR.glob("fp8_gemm-*.json"):
        table = fp8_tuning.parse_table(json.loads(path.read_text()), str(path))
        for choices in table.values():
            for c in choices:
                assert c.tiles is None or c.tiles in fp8_tuning.candidate_tiles(c.max_tokens)

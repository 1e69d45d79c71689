"""tools/bench_engine.py at toy scale: greedy parity with transformers and the report's shape."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dora.models.config import ModelConfig

pytest.importorskip("transformers")

_SPEC = importlib.util.spec_from_file_location("bench_engine", Path(__file__).parents[2] / "tools" / "bench_engine.py")
bench_engine = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_engine"] = bench_engine  # dataclasses look their module up while the file runs
_SPEC.loader.exec_module(bench_engine)


def test_bench_runs_parity_and_reports_every_cell():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = bench_engine.run_benchmark(ModelConfig.tiny(), batches=(1, 4), prompt_len=8, fixed_tokens=6,
                                            requests=8, median_tokens=4, max_tokens=12, quick=True, log=lambda _: None)
    finally:
        torch.set_num_threads(before)
    tps = report["tokens_per_s"]
    assert set(tps) == {"dora", "hf"}
    for side in tps.values():
        assert set(side) == {"fixed", "variable"}
        for cells in side.values():
            assert set(cells) == {"1", "4"} and all(v > 0 for v in cells.values())
    assert set(report["ratio"]) == {"fixed", "variable"} and set(report["ratio"]["fixed"]) == {"4"}


def test_long_tailed_lengths_are_seeded_and_bounded():
    a = bench_engine.long_tailed_lengths(256, median=24, cap=256, seed=3)
    assert a == bench_engine.long_tailed_lengths(256, median=24, cap=256, seed=3)
    assert min(a) >= 4 and max(a) <= 256 and max(a) > 4 * sorted(a)[128]

"""tools/bench_balancer.py at toy scale: every policy is simulated and the report has the issue's shape."""

import importlib.util
import json
import sys
from pathlib import Path

from dora.moe import cost_model
from dora.moe.plan import Topology
from dora.moe.traces import TraceConfig, synthetic_counts

_SPEC = importlib.util.spec_from_file_location("bench_balancer",
                                               Path(__file__).parents[2] / "tools" / "bench_balancer.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_balancer"] = bench  # dataclasses look their module up while the file runs
_SPEC.loader.exec_module(bench)


def test_bench_simulates_every_policy_and_reports_the_issue_shape():
    cfg = TraceConfig(num_experts=64, num_layers=2, tokens_per_microbatch=8192, microbatches_per_step=4,
                      num_steps=3, num_hot=8, hot_share=0.12, seed=1)
    w = bench.Workload("reference", synthetic_counts(cfg), Topology(64, 16, 4, 5), 4, cost_model.QWEN3_30B_A3B)
    timing = bench.Timing()
    summary = bench.summarize(bench.run_workload(w, timing, timing_repeats=1))
    report = json.loads(json.dumps(bench.build_report({"reference": summary}, timing, 4)))
    assert set(report["policies"]) == set(bench.POLICIES)
    for policy in report["policies"].values():
        assert {"imbalance_p50", "imbalance_p99", "imbalance_max", "step_time", "bytes_moved"} <= set(policy)
        assert 1.0 <= policy["imbalance_p50"] <= policy["imbalance_p99"] <= policy["imbalance_max"]
    for key in ("speedup_vs_eplb_oracle_step", "speedup_vs_none", "planner_ms_p50", "planner_ms_p99"):
        assert report[key] > 0
    p = report["policies"]
    assert p["ideal"]["step_time"] <= p["dora"]["step_time"] < p["none"]["step_time"]
    assert p["dora"]["imbalance_p50"] < p["eplb_oracle_step"]["imbalance_p50"] < p["none"]["imbalance_p50"]
    assert p["none"]["bytes_moved"] == 0 and p["dora"]["bytes_moved"] > 0
    assert len(timing.microbatch) == 2 * 2 * 4  # measured steps x layers x micro-batches
    assert timing.spread == [1.0] * len(timing.microbatch)  # one run each: no spread
    assert report["planner_repeat_spread_p50"] == 1.0

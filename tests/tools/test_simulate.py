"""tools/simulate.py end to end on a tiny preset: the report's JSON shape and the table."""

import importlib.util
import json
from pathlib import Path

import pytest

from dora.rollout.cluster_sim import H800, Cluster, DenseModel, Efficiency, LengthModel
from dora.rollout.sim_runs import Scenario

_SPEC = importlib.util.spec_from_file_location("simulate_tool", Path(__file__).parents[2] / "tools" / "simulate.py")
simulate_tool = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(simulate_tool)


def tiny(num_steps=5, warmup_steps=2):
    return Scenario(name="tiny", description="8 x 1-accelerator engines, 1B model",
                    cluster=Cluster(H800, DenseModel("dense-1B", 1e9, 16, 16, 4, 64), 8, tp=1,
                                    eff=Efficiency(max_seqs_cap=32)),
                    lengths=LengthModel(300, 0.5, 0.7, 0.05, 4000), batch_groups=16, group_size=4, prompt_len=32,
                    num_steps=num_steps, warmup_steps=warmup_steps)


def test_report_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(simulate_tool.PRESETS, "tiny", tiny)
    out = tmp_path / "sim.json"
    assert simulate_tool.main(["--preset", "tiny", "--workers", "1", "--json", str(out), "--modes", "sync",
                               "one_step_off", "partial_rollout", "dora_k2", "dora_k2:m1"]) == 0
    report = json.loads(out.read_text())
    assert report["scenario"]["name"] == "tiny"
    assert set(report["modes"]) >= {"sync", "one_step_off", "partial_rollout", "dora_k2", "dora_k2:m1"}
    assert all(m["trained_tokens_per_s"] > 0 for m in report["modes"].values())
    assert report["best"] in ("dora_k2", "dora_k2:m1")
    best = report["modes"][report["best"]]["trained_tokens_per_s"]
    for baseline in ("sync", "one_step_off", "partial_rollout"):
        assert abs(report["ratios"][f"vs_{baseline}"] - best / report["modes"][baseline]["trained_tokens_per_s"]) < 1e-9
    assert report["modes"]["sync"]["arrangement"] == "colocated"
    assert "dora_k2:m1" in capsys.readouterr().out


def test_unknown_mode_fails_clearly():
    with pytest.raises(SystemExit, match="unknown mode 'dora_k7'"):
        simulate_tool.parse_mode("dora_k7")
    with pytest.raises(SystemExit, match="mN"):
        simulate_tool.parse_mode("dora_k2:x")

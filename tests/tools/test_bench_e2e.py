"""bench_e2e runs its modes on the same data and reports the JSON the README and the simulator read."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_e2e_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_e2e.py"), "--steps", "2", "--seeds", "1",
         "--modes", "sync,dora_k2", "--out", str(tmp_path / "runs"), "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"sync", "dora_k2"}
    for mode in report["modes"].values():
        assert mode["trained_tokens_per_s"] > 0 and 0 <= mode["engine_idle_frac"] <= 1
        assert 0 <= mode["final_accuracy"] <= 1
    assert report["ratios_vs_sync"]["sync"] == 1.0
    assert report["best_sync"] == "sync" and report["ratios_vs_best_sync"] == report["ratios_vs_sync"]
    assert set(report["modes"]["sync"]["staleness"]) == {"0"}, "k = 0 trained a stale sample"
    assert max(int(k) for k in report["modes"]["dora_k2"]["staleness"]) <= 2
    assert "rollout.max_staleness" in result.stdout  # the config diff between modes is printed
    assert (tmp_path / "runs" / "timeline_dora_k2.png").exists()

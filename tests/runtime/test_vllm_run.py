"""A short multi-version GRPO run with two vLLM engine replicas on CPU (`make test-vllm`)."""

import pytest

from dora.cli import compose_config
from dora.runtime.inline import train_inline
from dora.telemetry.metrics import read_jsonl

pytestmark = pytest.mark.vllm


def test_two_vllm_replicas_serve_two_versions_at_once(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config("grpo_tiny_vllm_cpu", [
        "steps=5", "rollout.batch_groups=4", "rollout.group_size=4", "sampling.max_new_tokens=48",
        "eval.every=0", "eval.num_prompts=8", "logging.wandb=false", "data.train_size=200", "data.eval_size=8",
        f"logging.run_dir={run_dir}"])
    summary = train_inline(cfg, run_dir)
    rows = read_jsonl(summary.metrics_path)
    assert [r["version"] for r in rows] == [0, 1, 2, 3, 4]
    assert max(len(r["live_versions"]) for r in rows) >= 2, "versions never overlapped across the replicas"
    assert all(0 <= r["staleness_max"] <= 2 for r in rows)
    trained = [p for r in rows for p in r["prompt_ids"]]
    assert len(trained) == len(set(trained)) == 5 * 4, "a prompt was trained twice or a batch was short"

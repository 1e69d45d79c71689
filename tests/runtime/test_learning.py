"""The whole loop learns: a synchronous (deterministic) inline run climbs a reward from a user's
reward function given by import path, and a control run with learning rate 0 does not."""

import json

import torch

from dora.cli import compose_config
from dora.models.io import load_state_dict
from dora.runtime.inline import train_inline
from dora.telemetry.metrics import read_jsonl

ARGS = ["model=tiny_random", "rollout.batch_groups=4", "rollout.group_size=8", "sampling.max_new_tokens=12",
        "eval.num_prompts=4", "eval.max_new_tokens=4", "logging.wandb=false", "data.train_size=400",
        "data.eval_size=4", "engine.max_model_len=48", "reward.name=reward_fixtures:digit_fraction",
        "reward.max_workers=1", "steps=10", "algorithm.aggregation=seq_mean_token_mean"]


def run(tmp_path, name, lr):
    run_dir = tmp_path / name
    cfg = compose_config("grpo_tiny_sync", [*ARGS, f"trainer.lr={lr}", f"logging.run_dir={run_dir}"])
    train_inline(cfg, run_dir)
    rewards = [r["reward_mean"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    return rewards, load_state_dict(run_dir / "checkpoints" / "step_10" / "model"), run_dir


def test_grpo_raises_the_reward_and_a_zero_lr_control_does_not(tmp_path):
    learned, weights, run_dir = run(tmp_path, "learn", 3e-3)
    control, control_weights, _ = run(tmp_path, "control", 0.0)
    first, last = sum(learned[:3]) / 3, sum(learned[-3:]) / 3
    assert last > first + 0.1, f"reward did not rise: {learned}"
    assert abs(sum(control[-3:]) / 3 - sum(control[:3]) / 3) < 0.1, f"lr=0 control moved: {control}"
    assert any(not torch.equal(weights[k], control_weights[k]) for k in weights)
    assert all(torch.equal(control_weights[k], v) for k, v in load_state_dict(
        run_dir.parent / "control" / "checkpoints" / "step_10" / "model").items())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward"]["num_failures"]["exception"] == 0

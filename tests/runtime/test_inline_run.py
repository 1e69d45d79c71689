"""End-to-end runs of the inline runtime on the tiny MoE from its committed warm start (these test
the machinery; tests/runtime/test_learning.py tests that the loop learns)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dora.cli import compose_config
from dora.data.prompt_source import PromptSource
from dora.data.tokenizer import CharTokenizer, load_tokenizer
from dora.engines.torch_engine import TorchEngine
from dora.models.io import load_model, load_state_dict
from dora.rewards.registry import get_reward, to_result
from dora.runtime.evaluate import generate
from dora.runtime.inline import train_inline
from dora.runtime.components import resolve_path, sampling_params
from dora.telemetry.metrics import read_jsonl
from dora.trainer.trainer import Trainer
from dora.types import Batch

SMALL = ["rollout.batch_groups=2", "rollout.group_size=4", "sampling.max_new_tokens=16",
         "eval.num_prompts=8", "eval.max_new_tokens=8", "logging.wandb=false", "trainer.lr=1e-3",
         "data.train_size=200", "data.eval_size=8", "engine.max_model_len=64"]
REQUIRED_KEYS = {"step", "version", "live_versions", "staleness_max", "reward_mean", "trained_tokens", "wait_s"}


WARM_START = resolve_path("assets/tiny_arith")


def test_async_run_keeps_the_version_rules_and_trains(tmp_path):
    run_dir = tmp_path / "run"
    # entropy_coef keeps the gradient non-zero even if every group of this short run scores uniformly.
    cfg = compose_config("grpo_tiny", [*SMALL, "steps=4", "rollout.max_staleness=2", "algorithm.entropy_coef=0.01",
                                       f"logging.run_dir={run_dir}"])
    summary = train_inline(cfg, run_dir)

    rows = read_jsonl(summary.metrics_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(REQUIRED_KEYS <= r.keys() for r in rows)
    assert all(0 <= r["staleness_max"] <= 2 for r in rows)
    assert [r["version"] for r in rows] == [0, 1, 2, 3]
    assert "eval_accuracy" in rows[-1]
    trained = [p for r in rows for p in r["prompt_ids"]]
    assert len(trained) == len(set(trained)) == 4 * 2, "a prompt was trained twice or a batch was short"
    assert rows[-1]["trained_tokens"] == summary.trained_tokens > 0
    final = load_state_dict(run_dir / "checkpoints" / "step_4" / "model")
    start = load_state_dict(WARM_START)
    assert any(not torch.equal(final[k], start[k]) for k in start), "no parameter changed"
    assert (run_dir / "timeline.json").exists() and (run_dir / "summary.json").exists()


def test_k0_run_equals_a_reference_synchronous_grpo_loop(tmp_path):
    """dora with k = 0 must be plain synchronous GRPO: same parameters as a hand-written loop."""
    run_dir, steps = tmp_path / "run", 3
    cfg = compose_config("grpo_tiny_sync", [*SMALL, f"steps={steps}", f"logging.run_dir={run_dir}",
                                            "runtime.engine_threads=1", "runtime.trainer_threads=1"])
    train_inline(cfg, run_dir)
    dora_final = load_state_dict(run_dir / "checkpoints" / f"step_{steps}" / "model")

    # The reference: generate the next B prompts on the current weights, score, one GRPO step, repeat.
    tokenizer = load_tokenizer(WARM_START)
    model = load_model(WARM_START)
    source = PromptSource(cfg.data, tokenizer)
    source.eval_groups()  # the run draws its held-out groups first (they share the group-id counter)
    engine = TorchEngine(model.config, dataclasses.replace(cfg.engine, engine_id=0, seed=cfg.seed * 1000,
                                                           num_threads=None))
    trainer = Trainer(model, cfg.algorithm, cfg.trainer)
    reward = get_reward(cfg.reward.name)
    sampling = sampling_params(cfg, tokenizer)
    engine.add_version(0, trainer.publish_weights())
    for step in range(steps):
        groups = [source.next_group() for _ in range(cfg.rollout.batch_groups)]
        trajectories = generate(engine, step, groups, sampling)
        for t in trajectories:
            row = source.row(t.prompt_id)
            t.reward = to_result(reward(tokenizer.decode(t.response_ids), row.answer, row.meta)).score
        n = cfg.rollout.group_size
        trainer.train_step(Batch(step, [trajectories[i:i + n] for i in range(0, len(trajectories), n)]))
        engine.drop_version(step)
        engine.add_version(step + 1, trainer.publish_weights())
    reference = trainer.publish_weights()
    assert dora_final.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(dora_final[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_kill_and_resume_trains_every_prompt_exactly_once(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    args = [*SMALL, "steps=6", "checkpoint.every=2", "rollout.max_staleness=1"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dora.cli", "grpo_tiny", *args, f"logging.run_dir={first}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = first / "checkpoints" / "step_2" / "meta.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"no checkpoint at step 2: {proc.stderr.read().decode()[-2000:] if proc.poll() else ''}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    cfg = compose_config("grpo_tiny", [*args, f"logging.run_dir={second}", f"resume={first}/checkpoints/step_2"])
    train_inline(cfg, second)
    before = [r for r in read_jsonl(first / "metrics.jsonl") if r["step"] < 2]
    after = read_jsonl(second / "metrics.jsonl")
    assert [r["step"] for r in before + after] == list(range(6))
    trained = [p for r in before + after for p in r["prompt_ids"]]
    assert len(trained) == len(set(trained)) == 6 * 2, "a prompt was lost or trained twice across the resume"
    # Nothing skipped either: every trained prompt is among the first prompts the source serves.
    source = PromptSource(cfg.data, CharTokenizer())
    served = {source.next_group().prompt_id for _ in range((6 + 1 + 1) * 2)}
    assert set(trained) <= served
    summary = json.loads((second / "summary.json").read_text())
    assert summary["steps"] == 4


@pytest.mark.parametrize("override, key", [("rollout.batch_groups=0", "batch_groups"),
                                           ("rollout.group_size=0", "group_size"),
                                           ("rollout.max_staleness=-1", "max_staleness")])
def test_cli_rejects_bad_values_before_building_anything(tmp_path, override, key):
    result = subprocess.run([sys.executable, "-m", "dora.cli", "grpo_tiny", override,
                             f"logging.run_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert key in result.stderr + result.stdout
    assert not (Path(tmp_path) / "metrics.jsonl").exists()

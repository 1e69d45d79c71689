"""The local runtime: inline's stages with the trainer in a child process."""

import asyncio
import os
import signal

import pytest
import torch

from dora.cli import compose_config
from dora.models.io import load_state_dict
from dora.runtime.components import resolve_path
from dora.runtime.inline import train_inline
from dora.runtime.local import ProcessTrainer, train_local
from dora.telemetry.metrics import read_jsonl
from dora.types import Batch

SMALL = ["rollout.batch_groups=2", "rollout.group_size=4", "sampling.max_new_tokens=16",
         "eval.num_prompts=8", "eval.max_new_tokens=8", "logging.wandb=false", "trainer.lr=1e-3",
         "data.train_size=200", "data.eval_size=8", "engine.max_model_len=64", "algorithm.entropy_coef=0.01"]


def test_k0_local_run_equals_the_inline_run(tmp_path):
    """Same seeds, same schedule (k = 0 is deterministic): the trainer in a child process computes
    exactly what it computes in this one."""
    final = {}
    for kind, train in (("inline", train_inline), ("local", train_local)):
        run_dir = tmp_path / kind
        cfg = compose_config("grpo_tiny", [*SMALL, "steps=3", "rollout=synchronous", "rollout.max_staleness=0",
                                           "rollout.max_live_versions=1", f"runtime={kind}",
                                           f"logging.run_dir={run_dir}"])
        summary = train(cfg, run_dir)
        rows = read_jsonl(summary.metrics_path)
        final[kind] = ([r["prompt_ids"] for r in rows], [r["train/loss"] for r in rows],
                       load_state_dict(run_dir / "checkpoints" / "step_3" / "model"))
    assert final["local"][0] == final["inline"][0]
    assert final["local"][1] == final["inline"][1]
    inline_weights, local_weights = final["inline"][2], final["local"][2]
    assert inline_weights.keys() == local_weights.keys()
    assert all(torch.equal(local_weights[k], inline_weights[k]) for k in inline_weights)


def test_async_local_run_keeps_the_version_rules(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config("grpo_tiny", [*SMALL, "steps=4", "rollout.max_staleness=2", "runtime=local",
                                       f"logging.run_dir={run_dir}"])
    summary = train_local(cfg, run_dir)
    rows = read_jsonl(summary.metrics_path)
    assert [r["version"] for r in rows] == [0, 1, 2, 3]
    assert all(0 <= r["staleness_max"] <= 2 for r in rows)
    trained = [p for r in rows for p in r["prompt_ids"]]
    assert len(trained) == len(set(trained)) == 4 * 2
    final = load_state_dict(run_dir / "checkpoints" / "step_4" / "model")
    start = load_state_dict(resolve_path(cfg.model.path))
    assert any(not torch.equal(final[k], start[k]) for k in start), "no parameter changed"


def test_child_errors_and_death_are_raised_with_what_was_asked(tmp_path):
    cfg = compose_config("grpo_tiny", [*SMALL, "runtime=local", "rollout.wait_timeout_s=60"])
    trainer = ProcessTrainer(cfg)
    try:
        assert trainer.model_config.num_experts == 8
        weights = asyncio.run(trainer.weights())
        assert weights["model.embed_tokens.weight"].shape == (trainer.model_config.vocab_size,
                                                               trainer.model_config.hidden_size)
        # The child's exception, with its own type and message.
        with pytest.raises(ValueError, match="without trajectories"):
            asyncio.run(trainer.train_step(Batch(step=7, groups=[])))
        # Still serving after an error; then killed: the next call names the process and the call.
        assert asyncio.run(trainer.weights()).keys() == weights.keys()
        os.kill(trainer._process.pid, signal.SIGKILL)
        trainer._process.join(timeout=30)
        with pytest.raises(RuntimeError, match=r"trainer process \(pid \d+\) exited with code -9 while serving "
                                               r"train step 7"):
            asyncio.run(trainer.train_step(Batch(step=7, groups=[])))
    finally:
        trainer.close()
    assert not trainer._process.is_alive()


def test_requests_carry_tensors_exactly():
    """Batches cross to the trainer process as raw bytes: every dtype, shape and value comes back,
    writable, and without autograd history."""
    import pickle

    from dora.runtime.local import _dumps

    sent = {"f32": torch.randn(2, 3), "bf16": torch.randn(4).bfloat16(), "scalar": torch.tensor(7),
            "empty": torch.zeros(0, 2, dtype=torch.uint8), "bool": torch.tensor([True, False]),
            "grad": torch.ones(2, requires_grad=True), "strided": torch.arange(12).view(3, 4).t()}
    got = pickle.loads(_dumps(sent))
    for name, tensor in sent.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor.detach()), name
        assert not got[name].requires_grad
    got["f32"] += 1  # owned memory, not a read-only view of the message

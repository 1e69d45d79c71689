"""The trainer scores the torch engine's samples exactly as the engine did: same log-probs (temperature
convention included) and same experts. This is what makes the importance ratio and replay meaningful."""

import pytest
import torch

from dora.engines.config import EngineConfig
from dora.engines.torch_engine import TorchEngine
from dora.trainer import AlgorithmConfig, Trainer, TrainerConfig
from dora.types import Batch, PromptGroup, SamplingParams
from trainer_fixtures import tiny_model


def _engine_batch(model, temperature):
    engine = TorchEngine(model.config, EngineConfig(max_num_seqs=8, max_model_len=64, max_num_batched_tokens=16))
    engine.add_version(0, model.state_dict())
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        group = PromptGroup(group_id=i, prompt_id=i, prompt_ids=torch.randint(1, 16, (3 + i,), generator=g).tolist(),
                            num_samples=4)
        engine.submit(group, 0, SamplingParams(max_new_tokens=6 + i, temperature=temperature, seed=i))
    finished = []
    while engine.has_work():
        finished += engine.step()
    groups: dict[int, list] = {}
    for t in finished:
        t.reward = float(t.response_ids.count(5))
        groups.setdefault(t.group_id, []).append(t)
    return Batch(step=0, groups=[sorted(g, key=lambda t: t.sample_idx) for _, g in sorted(groups.items())])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_reproduces_engine_logprobs_and_routing(temperature):
    model = tiny_model(seed=3)
    batch = _engine_batch(model, temperature)
    assert all(t.routing is not None for t in batch.trajectories)
    trainer = Trainer(model, AlgorithmConfig(temperature=temperature), TrainerConfig(lr=0.0, max_tokens_per_microbatch=40))
    metrics = trainer.train_step(batch)
    assert metrics.num_microbatches > 1
    assert metrics.extra["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert metrics.extra["ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert metrics.routing_mismatch == 0.0
    if temperature != 1.0:
        # a trainer on the wrong temperature sees a different distribution than the one sampled from
        wrong = Trainer(model, AlgorithmConfig(temperature=1.0), TrainerConfig(lr=0.0)).train_step(batch)
        assert abs(wrong.extra["ratio_max"] - 1.0) > 1e-2

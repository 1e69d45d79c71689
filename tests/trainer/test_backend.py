"""TorchBackend: LR schedule, grad clipping, non-finite gradients, state round trip."""

import math

import pytest
import torch
from torch import nn

from dora.trainer.backend import TorchBackend, TrainerBackend, lr_factor
from dora.trainer.config import TrainerConfig


def test_lr_schedules():
    warm = TrainerConfig(lr_schedule="linear", warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    # warm-up 1/2, 2/2; then linear from 1 to 0.1 over 4 updates: progress 0, .25, .5, .75, 1 (then stays)
    expected = [0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]
    assert [lr_factor(i, warm) for i in range(8)] == pytest.approx(expected)
    cosine = TrainerConfig(lr_schedule="cosine", total_steps=4)
    # 0.5 * (1 + cos(pi * k / 4)) for k = 0..4
    assert [lr_factor(i, cosine) for i in range(5)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])
    assert lr_factor(100, TrainerConfig()) == 1.0


def _backend(**cfg):
    torch.manual_seed(0)
    return TorchBackend(nn.Linear(3, 2), TrainerConfig(**cfg), value_head=nn.Linear(2, 1))


def test_backend_satisfies_the_protocol_and_clips():
    backend = _backend(lr=0.1, max_grad_norm=1.0, value_lr=0.5)
    assert isinstance(backend, TrainerBackend)
    assert [g["lr"] for g in backend.optimizer.param_groups] == [0.1, 0.5]
    before = {k: v.clone() for k, v in backend.policy.state_dict().items()}
    loss = 10 * backend.policy(torch.ones(1, 3)).sum() + backend.value_head(torch.ones(1, 2)).sum()
    backend.backward(loss)
    result = backend.step()
    # grads: weight 10 each (6 entries), bias 10 (2), value head 1 (3 entries): norm = sqrt(800 + 3)
    assert result.grad_norm == pytest.approx(math.sqrt(803), rel=1e-5)
    assert not result.skipped and result.lr == 0.1 and backend.num_updates == 1
    # Adam's first update moves each parameter by ~lr whatever the clipped scale
    delta = backend.policy.weight - before["weight"]
    torch.testing.assert_close(delta, torch.full_like(delta, -0.1), atol=1e-4, rtol=0)
    assert all(p.grad is None for p in backend.policy.parameters())


def test_non_finite_gradient_skips_without_touching_state():
    backend = _backend(lr=0.1)
    before = {k: v.clone() for k, v in backend.policy.state_dict().items()}
    backend.backward(backend.policy(torch.ones(1, 3)).sum() * float("inf"))
    result = backend.step()
    assert result.skipped and not math.isfinite(result.grad_norm)
    assert backend.num_updates == 0 and backend.num_skipped == 1 and backend.optimizer.state == {}
    assert all(torch.equal(before[k], v) for k, v in backend.policy.state_dict().items())
    assert all(p.grad is None for p in backend.policy.parameters())


def test_state_round_trip_and_publish():
    a = _backend(lr=0.1, lr_schedule="linear", total_steps=10)
    for _ in range(3):
        a.backward(a.policy(torch.ones(1, 3)).sum() + a.value_head(torch.ones(1, 2)).sum())
        a.step()
    b = _backend(lr=0.1, lr_schedule="linear", total_steps=10)
    b.load_state_dict(a.state_dict())
    assert b.num_updates == 3 and b.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.7)
    for x, y in ((a, b), (b, a)):
        x.backward(x.policy(torch.ones(1, 3)).sum() + x.value_head(torch.ones(1, 2)).sum())
        x.step()
    assert all(torch.equal(a.publish_state_dict()[k], v) for k, v in b.publish_state_dict().items())
    published = a.publish_state_dict()
    assert set(published) == {"weight", "bias"}  # the policy only, in its own naming
    with pytest.raises(ValueError, match="value head"):
        TorchBackend(nn.Linear(3, 2), TrainerConfig()).load_state_dict(a.state_dict())

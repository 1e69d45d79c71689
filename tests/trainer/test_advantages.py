"""Advantage estimators against hand-computed values."""

import pytest
import torch

from dora.trainer.advantages import (ADVANTAGES, gae_advantages, group_normalized_advantages, rloo_advantages,
                                     token_rewards)
from dora.trainer.config import AlgorithmConfig
from dora.types import FinishReason, Trajectory


def _traj(group_id, idx, reward, num_tokens=2, token_rewards=None):
    return Trajectory(group_id=group_id, sample_idx=idx, prompt_id=group_id, prompt_ids=[1], response_ids=[2] * num_tokens,
                      behavior_logprobs=torch.zeros(num_tokens), version=0, min_version=0, max_version=0,
                      finish_reason=FinishReason.STOP, reward=reward, token_rewards=token_rewards)


def test_grpo_group_normalized():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.577350 -> +-0.5 / 0.577350 = +-0.866025
    adv = group_normalized_advantages(rewards, std_normalize=True, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-6, rtol=0)
    # Dr. GRPO: centred only
    adv = group_normalized_advantages(rewards, std_normalize=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # all-equal group: zero advantage (0 / (0 + eps)), one-sample group: zero
    assert group_normalized_advantages(torch.tensor([3.0, 3.0])).abs().max() == 0
    assert group_normalized_advantages(torch.tensor([3.0])).item() == 0


def test_rloo():
    # r=1: 1 - mean(0, 0, 1) = 2/3; r=0: 0 - mean(1, 0, 1) = -2/3
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0])),
                               torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


def test_gae_hand_computed():
    rewards = torch.tensor([0.0, 0.0, 1.0])
    values = torch.tensor([0.5, 0.6, 0.7])
    # gamma 0.9, lambda 0.8 (gamma * lambda = 0.72), V after the last token = 0:
    # t=2: delta = 1 - 0.7 = 0.3                      A2 = 0.3
    # t=1: delta = 0.9 * 0.7 - 0.6 = 0.03             A1 = 0.03 + 0.72 * 0.3 = 0.246
    # t=0: delta = 0.9 * 0.6 - 0.5 = 0.04             A0 = 0.04 + 0.72 * 0.246 = 0.21712
    adv, ret = gae_advantages(rewards, values, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([0.21712, 0.246, 0.3]))
    torch.testing.assert_close(ret, torch.tensor([0.71712, 0.846, 1.0]))
    # lambda = 1, gamma = 1: advantage = return-to-go - V = 1 - V
    adv, _ = gae_advantages(rewards, values, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.4, 0.3]))


def test_registry_estimators_on_groups():
    cfg = AlgorithmConfig(std_normalize=False)
    groups = [[_traj(0, 0, 1.0, 3), _traj(0, 1, 0.0, 1)], [_traj(1, 0, 2.0), _traj(1, 1, 2.0)]]
    out = ADVANTAGES.get("grpo")()(groups, cfg)
    assert [a.tolist() for a in out.advantages] == [[0.5] * 3, [-0.5], [0.0, 0.0], [0.0, 0.0]]
    out = ADVANTAGES.get("rloo")()(groups, cfg)
    assert [a.tolist() for a in out.advantages] == [[1.0] * 3, [-1.0], [0.0, 0.0], [0.0, 0.0]]


def test_gae_estimator_uses_token_rewards_and_final_reward():
    cfg = AlgorithmConfig(loss="ppo", advantage="gae", gamma=1.0, lam=1.0)
    traj = _traj(0, 0, 1.0, 3, token_rewards=torch.tensor([0.5, 0.0, 0.0]))
    assert token_rewards(traj).tolist() == [0.5, 0.0, 1.0]
    out = ADVANTAGES.get("gae")()([[traj]], cfg, [torch.zeros(3)])
    # gamma = lambda = 1, V = 0: advantage = reward-to-go = [1.5, 1, 1]
    assert out.advantages[0].tolist() == [1.5, 1.0, 1.0]
    assert out.returns[0].tolist() == [1.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="value"):
        ADVANTAGES.get("gae")()([[traj]], cfg, None)


def test_missing_reward_names_the_sample():
    with pytest.raises(ValueError, match=r"group 7: samples \[1\] have no reward"):
        ADVANTAGES.get("grpo")()([[_traj(7, 0, 1.0), _traj(7, 1, None)]], AlgorithmConfig())

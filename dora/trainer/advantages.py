"""Advantage estimators: turn the rewards on a batch's trajectories into per-token advantages.

First thing the trainer does with a `Batch` (rewards were filled by the reward stage): pick the
estimator named by `algorithm.advantage` from `ADVANTAGES` and compute one [T] advantage tensor per
trajectory, in `Batch.trajectories` order. Group estimators (`grpo`, `rloo`) only read the scalar
rewards of each group and broadcast the sequence advantage over its tokens; `gae` (PPO) needs the
value head's per-token values, taken with the weights at the start of the step.

Shape legend: N = trajectories of one group, T = response tokens of one trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from dora.registry import Registry
from dora.types import Trajectory

if TYPE_CHECKING:
    from dora.trainer.config import AlgorithmConfig


@dataclass(slots=True)
class AdvantageOutput:
    advantages: list[torch.Tensor]
    """Per trajectory, [T] float32."""
    returns: list[torch.Tensor] | None = None
    """Per trajectory, [T] float32 value targets (estimators with a critic only)."""


class AdvantageEstimator(Protocol):
    needs_values: bool
    """True when the estimator reads per-token values from a value head."""

    def __call__(self, groups: list[list[Trajectory]], cfg: AlgorithmConfig,
                 values: list[torch.Tensor] | None = None) -> AdvantageOutput: ...


ADVANTAGES: Registry[type[AdvantageEstimator]] = Registry("advantage estimator")


def _group_rewards_N(group: list[Trajectory]) -> torch.Tensor:
    missing = [t.sample_idx for t in group if t.reward is None]
    if missing:
        raise ValueError(f"group {group[0].group_id}: samples {missing} have no reward (reward stage not run?)")
    return torch.tensor([t.reward for t in group], dtype=torch.float32)


def group_normalized_advantages(rewards_N: torch.Tensor, *, std_normalize: bool = True,
                                eps: float = 1e-6) -> torch.Tensor:
    """GRPO: r - mean(group), divided by (std + eps) when `std_normalize` (Dr. GRPO turns it off).

    The std is the unbiased sample std, as in the GRPO paper's implementations; a group of one
    sample has advantage 0 (no baseline can be formed from the others).
    """
    centered_N = rewards_N - rewards_N.mean()
    if std_normalize and rewards_N.numel() > 1:
        centered_N = centered_N / (rewards_N.std(unbiased=True) + eps)
    return centered_N


def rloo_advantages(rewards_N: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: r_i - mean(r_j for j != i) = n / (n - 1) * (r_i - mean(r))."""
    n = rewards_N.numel()
    if n < 2:
        return torch.zeros_like(rewards_N)
    return (rewards_N - rewards_N.mean()) * (n / (n - 1))


def gae_advantages(rewards_T: torch.Tensor, values_T: torch.Tensor, *, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over one response; the episode ends after the last token,
    so V(s_T) = 0. Returns (advantages_T, returns_T) with returns = advantages + values."""
    if rewards_T.shape != values_T.shape or rewards_T.dim() != 1:
        raise ValueError(f"gae: rewards {tuple(rewards_T.shape)} and values {tuple(values_T.shape)} "
                         "must both be [T]")
    # A plain-float recursion: per-token tensor ops would cost ~10 us each on 30k-token responses.
    rewards, values = rewards_T.tolist(), values_T.float().tolist()
    advantages = [0.0] * len(values)
    running, next_value = 0.0, 0.0
    for t in range(len(values) - 1, -1, -1):
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
        next_value = values[t]
    advantages_T = torch.tensor(advantages, dtype=torch.float32)
    values_T = values_T.float().cpu()
    return advantages_T, advantages_T + values_T


def token_rewards(traj: Trajectory) -> torch.Tensor:
    """[T] per-token rewards: the task's per-token rewards (if any) plus the scalar reward on the
    last token, where the outcome is known."""
    if traj.reward is None:
        raise ValueError(f"group {traj.group_id} sample {traj.sample_idx} has no reward")
    rewards_T = torch.zeros(traj.num_tokens, dtype=torch.float32)
    if traj.token_rewards is not None:
        if traj.token_rewards.shape != (traj.num_tokens,):
            raise ValueError(f"group {traj.group_id} sample {traj.sample_idx}: token_rewards has shape "
                             f"{tuple(traj.token_rewards.shape)}, expected ({traj.num_tokens},)")
        rewards_T += traj.token_rewards.float()
    rewards_T[-1] += traj.reward
    return rewards_T


@ADVANTAGES.register("grpo")
class GroupNormalized:
    """Group-relative advantage, the same for every token of a response."""

    needs_values = False

    def __call__(self, groups, cfg, values=None) -> AdvantageOutput:
        out = []
        for group in groups:
            adv_N = group_normalized_advantages(_group_rewards_N(group), std_normalize=cfg.std_normalize,
                                                eps=cfg.adv_eps)
            out += [adv_N[i].expand(t.num_tokens).clone() for i, t in enumerate(group)]
        return AdvantageOutput(out)


@ADVANTAGES.register("rloo")
class LeaveOneOut:
    """REINFORCE leave-one-out baseline (Ahmadian et al. 2024), per response, broadcast over tokens."""

    needs_values = False

    def __call__(self, groups, cfg, values=None) -> AdvantageOutput:
        out = []
        for group in groups:
            adv_N = rloo_advantages(_group_rewards_N(group))
            out += [adv_N[i].expand(t.num_tokens).clone() for i, t in enumerate(group)]
        return AdvantageOutput(out)


@ADVANTAGES.register("gae")
class GAE:
    """PPO's per-token GAE against the value head (values from the start of the step)."""

    needs_values = True

    def __call__(self, groups, cfg, values=None) -> AdvantageOutput:
        trajectories = [t for group in groups for t in group]
        if values is None or len(values) != len(trajectories):
            raise ValueError("advantage 'gae' needs one [T] value tensor per trajectory (a value head: "
                             "use loss 'ppo')")
        advantages, returns = [], []
        for traj, values_T in zip(trajectories, values):
            adv_T, ret_T = gae_advantages(token_rewards(traj), values_T.detach().cpu(), gamma=cfg.gamma, lam=cfg.lam)
            advantages.append(adv_T)
            returns.append(ret_T)
        return AdvantageOutput(advantages, returns)

"""PPO loss: the clipped policy surrogate of `policy.py` plus a clipped value loss for the value head.

value loss per token = 0.5 * max((V - R)^2, (V_clipped - R)^2) with
V_clipped = V_old + clamp(V - V_old, -value_clip, value_clip) (unclipped when value_clip is None),
scaled by `value_coef` and aggregated with the same token weights as the policy loss.

Shape legend: N = response tokens of one micro-batch.
"""

from __future__ import annotations

import torch

from dora.telemetry.metrics import Reduce
from dora.trainer.config import AlgorithmConfig
from dora.trainer.losses.base import LOSSES, LossInputs, LossOutput
from dora.trainer.losses.policy import policy_token_losses


def value_token_losses(values_N: torch.Tensor, old_values_N: torch.Tensor, returns_N: torch.Tensor,
                       value_clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_N, clipped_N): the per-token value loss and where the clipped branch was taken."""
    err_N = (values_N - returns_N) ** 2
    if value_clip is None:
        return 0.5 * err_N, torch.zeros_like(err_N, dtype=torch.bool)
    clipped_values_N = old_values_N + (values_N - old_values_N).clamp(-value_clip, value_clip)
    err_clipped_N = (clipped_values_N - returns_N) ** 2
    return 0.5 * torch.maximum(err_N, err_clipped_N), err_clipped_N > err_N


@LOSSES.register("ppo")
class PPOLoss:
    needs_values = True

    def __init__(self, cfg: AlgorithmConfig) -> None:
        self.cfg = cfg

    def __call__(self, inputs: LossInputs) -> LossOutput:
        if inputs.values_N is None or inputs.old_values_N is None or inputs.returns_N is None:
            raise ValueError("loss 'ppo' needs values, old values and returns (advantage estimator 'gae')")
        policy_N, metrics = policy_token_losses(inputs, self.cfg)
        value_N, value_clipped_N = value_token_losses(inputs.values_N, inputs.old_values_N, inputs.returns_N,
                                                      self.cfg.value_clip)
        policy_loss = (policy_N * inputs.weights_N).sum()
        value_loss = (value_N * inputs.weights_N).sum()
        num_tokens = inputs.values_N.numel()
        # policy/value loss: this micro-batch's share of the step loss, so they add up (SUM).
        policy_share, value_share, clip_frac, value_mean = torch.stack([
            policy_loss.detach(), value_loss.detach(), value_clipped_N.float().mean(),
            inputs.values_N.detach().float().mean()]).tolist()
        metrics.add("policy_loss", policy_share, Reduce.SUM)
        metrics.add("value_loss", value_share, Reduce.SUM)
        metrics.add("value_clip_frac", clip_frac, weight=num_tokens)
        metrics.add("value_mean", value_mean, weight=num_tokens)
        return LossOutput(policy_loss + self.cfg.value_coef * value_loss, metrics)

"""What every loss receives and returns, and the loss registry.

The trainer flattens a micro-batch's response tokens into one axis (N) and hands the loss one
`LossInputs`. `weights_N` already carries the aggregation mode (token_mean, seq_mean_token_mean,
seq_mean_token_sum_norm; see `aggregation.py`) normalised over the whole step, so a loss returns
`sum(weights_N * per_token_loss_N)` and the micro-batch losses add up to the step loss whatever the
split: the gradient does not depend on how the step was cut into micro-batches.

Shape legend: N = response tokens of one micro-batch (all its trajectories, flattened).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from dora.registry import Registry
from dora.telemetry.metrics import MetricBag

if TYPE_CHECKING:
    from dora.trainer.config import AlgorithmConfig


@dataclass(slots=True)
class LossInputs:
    logprobs_N: torch.Tensor
    """float32, current policy log-probs of the sampled tokens (requires grad)."""
    behavior_logprobs_N: torch.Tensor
    """float32, the engine's log-probs (the policy that sampled the tokens)."""
    advantages_N: torch.Tensor
    weights_N: torch.Tensor
    """Aggregation weight of each token; summed over the whole step's tokens it gives the step loss."""
    proximal_logprobs_N: torch.Tensor | None = None
    """Log-probs under the weights at the start of the step (decoupled PPO, TIS, MIS)."""
    ref_logprobs_N: torch.Tensor | None = None
    """Log-probs under the reference model (KL penalty)."""
    entropy_N: torch.Tensor | None = None
    """Entropy of the current policy at each position (requires grad when there is a bonus)."""
    values_N: torch.Tensor | None = None
    """Value head output (requires grad), PPO."""
    old_values_N: torch.Tensor | None = None
    """Values at the start of the step (value clipping), PPO."""
    returns_N: torch.Tensor | None = None
    """Value targets, PPO."""


@dataclass(slots=True)
class LossOutput:
    loss: torch.Tensor
    """Scalar: this micro-batch's share of the step loss (back-propagate it as is)."""
    metrics: MetricBag = field(default_factory=MetricBag)
    """Token-weighted statistics (clip fraction, approx KL, ratio, IS weights, entropy, ...)."""


class Loss(Protocol):
    needs_values: bool
    """True when the loss trains a value head (the trainer then builds one)."""

    def __init__(self, cfg: AlgorithmConfig) -> None: ...

    def __call__(self, inputs: LossInputs) -> LossOutput: ...


LOSSES: Registry[type[Loss]] = Registry("loss")

"""GRPO loss: the clipped surrogate (with the configured off-policy correction, KL and entropy
terms, see `policy.py`) aggregated by the step-normalised token weights. Clip-higher (DAPO) is
`clip_high > clip_low`; Dr. GRPO is `aggregation=seq_mean_token_sum_norm` with `std_normalize=false`.

Shape legend: N = response tokens of one micro-batch.
"""

from __future__ import annotations

from dora.trainer.config import AlgorithmConfig
from dora.trainer.losses.base import LOSSES, LossInputs, LossOutput
from dora.trainer.losses.policy import policy_token_losses


@LOSSES.register("grpo")
class GRPOLoss:
    needs_values = False

    def __init__(self, cfg: AlgorithmConfig) -> None:
        self.cfg = cfg

    def __call__(self, inputs: LossInputs) -> LossOutput:
        loss_N, metrics = policy_token_losses(inputs, self.cfg)
        loss = (loss_N * inputs.weights_N).sum()
        return LossOutput(loss, metrics)

"""Token weights that turn per-token losses into one step loss (Dr. GRPO / DAPO aggregation modes).

Computed once per optimizer update over all of its trajectories, before they are split into
micro-batches, so every micro-batch is normalised by the whole update's token (or sequence) count:
`step_loss = sum over tokens of weight * loss`, whatever the micro-batch split.

Shape legend: T = response tokens of one trajectory.
"""

from __future__ import annotations

import torch

from dora.trainer.config import Aggregation


def aggregation_weights(lengths: list[int], mode: Aggregation, *, seq_norm_constant: float = 1024.0) -> list[torch.Tensor]:
    """Per trajectory a [T] float32 weight tensor.

    token_mean:              1 / (total tokens)                 -> every token counts the same.
    seq_mean_token_mean:     1 / (num sequences * T_i)          -> every sequence counts the same.
    seq_mean_token_sum_norm: 1 / (num sequences * constant)     -> Dr. GRPO, no length bias.
    """
    if not lengths or min(lengths) < 1:
        raise ValueError(f"aggregation needs at least one trajectory and >= 1 token each, got lengths {lengths}")
    num_seqs = len(lengths)
    if mode is Aggregation.token_mean:
        total = sum(lengths)
        return [torch.full((n,), 1.0 / total) for n in lengths]
    if mode is Aggregation.seq_mean_token_mean:
        return [torch.full((n,), 1.0 / (num_seqs * n)) for n in lengths]
    if mode is Aggregation.seq_mean_token_sum_norm:
        return [torch.full((n,), 1.0 / (num_seqs * seq_norm_constant)) for n in lengths]
    raise ValueError(f"unknown aggregation {mode!r}; allowed: {[m.value for m in Aggregation]}")

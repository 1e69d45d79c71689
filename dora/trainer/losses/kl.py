"""Per-token KL estimators between the current policy and a frozen reference model.

Both are Schulman's estimators of KL(pi || ref) from samples of pi (here: the sampled tokens):
k1 = log pi - log ref (unbiased, can be negative, high variance);
k3 = exp(log ref - log pi) - (log ref - log pi) - 1 (unbiased, never negative, low variance).

Shape legend: N = response tokens of one micro-batch.
"""

from __future__ import annotations

import torch

from dora.trainer.config import KLEstimator


def kl_penalty(logprobs_N: torch.Tensor, ref_logprobs_N: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    log_ratio_N = ref_logprobs_N - logprobs_N
    if estimator is KLEstimator.k1:
        return -log_ratio_N
    if estimator is KLEstimator.k3:
        return torch.exp(log_ratio_N) - log_ratio_N - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {[e.value for e in KLEstimator]}")

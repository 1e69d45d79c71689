"""The clipped policy-gradient objective shared by GRPO and PPO, with the off-policy corrections.

Off-policy handling (`algorithm.off_policy`):
- behavior (default): ratio = pi / pi_behavior, clipped to [1 - clip_low, 1 + clip_high].
- decoupled (AReaL): ratio = pi / pi_prox against the proximal policy (the weights at the start of
  the step), clipped; the clipped surrogate is multiplied by the importance weight
  w = pi_prox / pi_behavior (no gradient), tokens with w > is_cap masked when a cap is set.
- tis: as decoupled with w truncated: min(w, is_cap).
- mis: as decoupled with tokens whose w lies outside [is_cap_low, is_cap] masked out (weight 0).
Masked tokens still count in the normaliser (their weight in `weights_N` is unchanged).

Optional terms: KL to the reference model (k1/k3) times `kl_coef`, and an entropy bonus
(`- entropy_coef * entropy`).

Shape legend: N = response tokens of one micro-batch.
"""

from __future__ import annotations

import torch

from dora.telemetry.metrics import MetricBag, Reduce
from dora.trainer.config import AlgorithmConfig, OffPolicy
from dora.trainer.losses.base import LossInputs
from dora.trainer.losses.kl import kl_penalty


def importance_weights(proximal_logprobs_N: torch.Tensor, behavior_logprobs_N: torch.Tensor,
                       cfg: AlgorithmConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_N, kept_N): the detached behavior-correction weight per token and the mask of tokens
    kept in the loss, for the decoupled / TIS / MIS modes."""
    raw_N = torch.exp(proximal_logprobs_N.detach() - behavior_logprobs_N)
    kept_N = torch.ones_like(raw_N, dtype=torch.bool)
    if cfg.off_policy is OffPolicy.tis:
        return raw_N.clamp(max=cfg.is_cap), kept_N
    if cfg.off_policy is OffPolicy.mis:
        kept_N = (raw_N >= cfg.is_cap_low) & (raw_N <= cfg.is_cap)
    elif cfg.off_policy is OffPolicy.decoupled and cfg.is_cap is not None:
        kept_N = raw_N <= cfg.is_cap
    return raw_N * kept_N, kept_N


def policy_token_losses(inp: LossInputs, cfg: AlgorithmConfig) -> tuple[torch.Tensor, MetricBag]:
    """Per-token policy loss [N] (surrogate + KL + entropy terms) and its token-mean metrics."""
    num_tokens = inp.logprobs_N.numel()
    metrics = MetricBag()
    if cfg.off_policy is OffPolicy.behavior:
        old_logprobs_N = inp.behavior_logprobs_N
        is_weight_N = None
    else:
        if inp.proximal_logprobs_N is None:
            raise ValueError(f"off_policy={cfg.off_policy.value!r} needs proximal log-probs")
        old_logprobs_N = inp.proximal_logprobs_N
        is_weight_N, kept_N = importance_weights(inp.proximal_logprobs_N, inp.behavior_logprobs_N, cfg)

    log_ratio_N = inp.logprobs_N - old_logprobs_N.detach()
    ratio_N = torch.exp(log_ratio_N)
    adv_N = inp.advantages_N
    surr_N = ratio_N * adv_N
    surr_clipped_N = ratio_N.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * adv_N
    loss_N = -torch.minimum(surr_N, surr_clipped_N)
    if is_weight_N is not None:
        loss_N = loss_N * is_weight_N

    with torch.no_grad():
        clipped_N = surr_clipped_N < surr_N
        # Token means here, extremes below; gathered as tensors and read back in one transfer.
        means = {
            "clip_frac": clipped_N.float().mean(),
            "clip_frac_low": (clipped_N & (adv_N < 0)).float().mean(),
            "clip_frac_high": (clipped_N & (adv_N > 0)).float().mean(),
            # k3 estimate of KL(old || current) from the tokens: how far the update has moved the policy.
            "approx_kl": (ratio_N - 1 - log_ratio_N).mean(),
            "ratio_mean": ratio_N.mean(),
        }
        extremes = {"ratio_max": (ratio_N.max(), Reduce.MAX), "ratio_min": (ratio_N.min(), Reduce.MIN)}
        if is_weight_N is not None:
            # How far the engine's distribution is from the trainer's at the start of the update.
            behavior_log_ratio_N = inp.behavior_logprobs_N - old_logprobs_N.detach()
            means["behavior_kl"] = (torch.exp(behavior_log_ratio_N) - 1 - behavior_log_ratio_N).mean()
            means["is_weight_mean"] = is_weight_N.mean()
            means["is_masked_frac"] = (~kept_N).float().mean()
            extremes["is_weight_max"] = (is_weight_N.max(), Reduce.MAX)
            extremes["is_weight_min"] = (is_weight_N.min(), Reduce.MIN)

    terms: dict[str, torch.Tensor] = {}
    if cfg.kl_coef > 0:
        if inp.ref_logprobs_N is None:
            raise ValueError("algorithm.kl_coef > 0 needs reference log-probs")
        kl_N = kl_penalty(inp.logprobs_N, inp.ref_logprobs_N, cfg.kl_estimator)
        loss_N = loss_N + cfg.kl_coef * kl_N
        terms["kl"] = kl_N.detach().mean()
    if inp.entropy_N is not None:
        if cfg.entropy_coef > 0:
            loss_N = loss_N - cfg.entropy_coef * inp.entropy_N
        terms["entropy"] = inp.entropy_N.detach().mean()
    means.update(terms)
    values = torch.stack([v.double() for v in [*means.values(), *(t for t, _ in extremes.values())]]).tolist()
    for key, value in zip(means, values):
        metrics.add(key, value, weight=num_tokens)
    for (key, (_, reduce)), value in zip(extremes.items(), values[len(means):]):
        metrics.add(key, value, reduce)
    return loss_N, metrics

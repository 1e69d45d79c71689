"""GRPO / PPO losses, KL estimators, off-policy corrections and aggregation against hand-computed values."""

import math

import pytest
import torch

from dora.trainer.config import AlgorithmConfig, Aggregation, KLEstimator, OffPolicy
from dora.trainer.losses import LOSSES, LossInputs
from dora.trainer.losses.aggregation import aggregation_weights
from dora.trainer.losses.kl import kl_penalty

ln = math.log


def _inputs(ratios, advantages, **kw):
    """Behavior log-probs 0, current log-probs ln(ratio): the ratio against behavior is `ratios`."""
    logprobs = torch.tensor([ln(r) for r in ratios], dtype=torch.float64, requires_grad=True)
    n = len(ratios)
    return LossInputs(logprobs_N=logprobs, behavior_logprobs_N=torch.zeros(n, dtype=torch.float64),
                      advantages_N=torch.tensor(advantages, dtype=torch.float64),
                      weights_N=torch.full((n,), 1.0 / n, dtype=torch.float64), **kw)


def _value(metrics, key):
    return metrics.compute()[key]


def test_grpo_clipped_surrogate_with_clip_higher():
    cfg = AlgorithmConfig(clip_low=0.2, clip_high=0.28)
    inp = _inputs([1.0, 1.5, 0.5, 1.1], [1.0, 1.0, -1.0, -2.0])
    out = LOSSES.get("grpo")(cfg)(inp)
    # token 0: r=1,   A=1:  min(1, 1) = 1                          -> -1
    # token 1: r=1.5, A=1:  min(1.5, clip(1.5)=1.28) = 1.28        -> -1.28 (clipped high)
    # token 2: r=0.5, A=-1: min(-0.5, clip(0.5)=0.8 * -1) = -0.8   ->  0.8  (clipped low)
    # token 3: r=1.1, A=-2: min(-2.2, -2.2)                        ->  2.2
    # token_mean: (-1 - 1.28 + 0.8 + 2.2) / 4 = 0.18
    assert out.loss.item() == pytest.approx(0.18, abs=1e-12)
    out.loss.backward()
    # d/d logp = -w * A * r where unclipped, 0 where clipped: [-0.25, 0, 0, -(1/4)(-2)(1.1) = 0.55]
    torch.testing.assert_close(inp.logprobs_N.grad, torch.tensor([-0.25, 0.0, 0.0, 0.55], dtype=torch.float64))
    assert _value(out.metrics, "clip_frac") == pytest.approx(0.5)
    assert _value(out.metrics, "clip_frac_low") == pytest.approx(0.25)
    assert _value(out.metrics, "clip_frac_high") == pytest.approx(0.25)
    assert _value(out.metrics, "ratio_max") == pytest.approx(1.5)
    assert _value(out.metrics, "ratio_min") == pytest.approx(0.5)
    assert _value(out.metrics, "ratio_mean") == pytest.approx((1.0 + 1.5 + 0.5 + 1.1) / 4)
    # approx KL (k3 of old||new) = mean(r - 1 - ln r)
    expected_kl = sum(r - 1 - ln(r) for r in [1.0, 1.5, 0.5, 1.1]) / 4
    assert _value(out.metrics, "approx_kl") == pytest.approx(expected_kl)


def test_symmetric_clip_changes_the_clipped_value():
    out = LOSSES.get("grpo")(AlgorithmConfig(clip_low=0.2, clip_high=0.2))(_inputs([1.5], [1.0]))
    assert out.loss.item() == pytest.approx(-1.2)  # clipped at 1 + 0.2


def test_aggregation_weights_modes():
    # lengths 1 and 3: 4 tokens, 2 sequences
    w = aggregation_weights([1, 3], Aggregation.token_mean)
    assert [x.tolist() for x in w] == [[0.25], [0.25] * 3]
    w = aggregation_weights([1, 3], Aggregation.seq_mean_token_mean)  # 1 / (2 * T_i)
    torch.testing.assert_close(torch.cat(w), torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6]))
    w = aggregation_weights([1, 3], Aggregation.seq_mean_token_sum_norm, seq_norm_constant=10.0)  # 1 / (2 * 10)
    torch.testing.assert_close(torch.cat(w), torch.full((4,), 0.05))
    with pytest.raises(ValueError, match="at least one"):
        aggregation_weights([], Aggregation.token_mean)


def test_kl_estimators():
    logp, ref = torch.tensor([ln(0.5)]), torch.tensor([ln(0.25)])
    # k1 = ln 0.5 - ln 0.25 = ln 2 = 0.693147
    assert kl_penalty(logp, ref, KLEstimator.k1).item() == pytest.approx(0.693147, abs=1e-6)
    # k3 = ref/pi - ln(ref/pi) - 1 = 0.5 + ln 2 - 1 = 0.193147
    assert kl_penalty(logp, ref, KLEstimator.k3).item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_penalty(ref, ref, KLEstimator.k3).item() == 0.0


def test_kl_and_entropy_terms_in_the_loss():
    cfg = AlgorithmConfig(kl_coef=0.1, kl_estimator=KLEstimator.k1, entropy_coef=0.01)
    inp = _inputs([1.0, 1.0], [0.0, 0.0], ref_logprobs_N=torch.tensor([ln(0.5), ln(2.0)], dtype=torch.float64),
                  entropy_N=torch.tensor([1.0, 2.0], dtype=torch.float64))
    out = LOSSES.get("grpo")(cfg)(inp)
    # surrogate 0 (A = 0); k1 = 0 - ref = [ln 2, -ln 2] -> mean 0; entropy bonus -0.01 * mean(1, 2) = -0.015
    assert out.loss.item() == pytest.approx(-0.015)
    assert _value(out.metrics, "kl") == pytest.approx(0.0, abs=1e-12)
    assert _value(out.metrics, "entropy") == pytest.approx(1.5)
    out.loss.backward()
    # d k1 / d logp = 1 -> grad = w * kl_coef = 0.5 * 0.1
    torch.testing.assert_close(inp.logprobs_N.grad, torch.tensor([0.05, 0.05], dtype=torch.float64))
    with pytest.raises(ValueError, match="reference"):
        LOSSES.get("grpo")(cfg)(_inputs([1.0], [1.0]))


def _offpolicy_inputs():
    # token 0: behavior 0.5, proximal 0.6, current 0.9, A = +1 -> ratio 1.5, IS weight 1.2
    # token 1: behavior 0.5, proximal 0.2, current 0.2, A = -1 -> ratio 1.0, IS weight 0.4
    logprobs = torch.tensor([ln(0.9), ln(0.2)], dtype=torch.float64, requires_grad=True)
    return LossInputs(logprobs_N=logprobs, behavior_logprobs_N=torch.tensor([ln(0.5), ln(0.5)], dtype=torch.float64),
                      advantages_N=torch.tensor([1.0, -1.0], dtype=torch.float64),
                      weights_N=torch.tensor([0.5, 0.5], dtype=torch.float64),
                      proximal_logprobs_N=torch.tensor([ln(0.6), ln(0.2)], dtype=torch.float64))


def test_decoupled_ppo():
    out = LOSSES.get("grpo")(AlgorithmConfig(off_policy=OffPolicy.decoupled))(_offpolicy_inputs())
    # token 0: -min(1.5, 1.2) * 1 * w=1.2 = -1.44; token 1: -(1 * -1) * w=0.4 = 0.4; mean = -0.52
    assert out.loss.item() == pytest.approx(-0.52)
    assert _value(out.metrics, "is_weight_max") == pytest.approx(1.2)
    assert _value(out.metrics, "is_weight_min") == pytest.approx(0.4)
    assert _value(out.metrics, "is_weight_mean") == pytest.approx(0.8)
    assert _value(out.metrics, "clip_frac") == pytest.approx(0.5)
    # behavior ratio against "behavior" mode would be 0.9 / 0.5 = 1.8 -> clipped at 1.2 for token 0:
    plain = LOSSES.get("grpo")(AlgorithmConfig())(_offpolicy_inputs())
    # token 0: -1.2; token 1: r = 0.4, A=-1: -min(-0.4, -0.8) = 0.8; mean = -0.2
    assert plain.loss.item() == pytest.approx(-0.2)


def test_truncated_importance_sampling():
    inp = _offpolicy_inputs()
    out = LOSSES.get("grpo")(AlgorithmConfig(off_policy=OffPolicy.tis, is_cap=1.0))(inp)
    # weights min(1.2, 1) = 1 and 0.4: (-1.2 * 1 + 1 * 0.4) / 2 = -0.4
    assert out.loss.item() == pytest.approx(-0.4)
    out.loss.backward()
    # token 0 clipped -> 0; token 1: -w_agg * A * r * is_w = -0.5 * -1 * 1 * 0.4 = 0.2
    torch.testing.assert_close(inp.logprobs_N.grad, torch.tensor([0.0, 0.2], dtype=torch.float64))


def test_masked_importance_sampling():
    out = LOSSES.get("grpo")(AlgorithmConfig(off_policy=OffPolicy.mis, is_cap=1.0))(_offpolicy_inputs())
    # token 0 masked (1.2 > 1); token 1 kept with weight 0.4: 0.4 / 2 = 0.2 (normaliser unchanged)
    assert out.loss.item() == pytest.approx(0.2)
    assert _value(out.metrics, "is_masked_frac") == pytest.approx(0.5)
    out = LOSSES.get("grpo")(AlgorithmConfig(off_policy=OffPolicy.mis, is_cap=1.0, is_cap_low=0.5))(_offpolicy_inputs())
    assert out.loss.item() == 0.0  # token 1 (0.4 < 0.5) masked too
    # decoupled with a cap masks like MIS with no lower bound
    out = LOSSES.get("grpo")(AlgorithmConfig(off_policy=OffPolicy.decoupled, is_cap=1.0))(_offpolicy_inputs())
    assert out.loss.item() == pytest.approx(0.2)


def test_ppo_value_loss():
    cfg = AlgorithmConfig(loss="ppo", advantage="gae", value_clip=0.2, value_coef=0.5)
    values = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    inp = _inputs([1.0, 1.0], [1.0, -1.0], values_N=values, old_values_N=torch.tensor([0.5, 0.5], dtype=torch.float64),
                  returns_N=torch.tensor([2.0, 0.0], dtype=torch.float64))
    out = LOSSES.get("ppo")(cfg)(inp)
    # policy: (-1 + 1) / 2 = 0
    # value token 0: (1 - 2)^2 = 1 vs clipped 0.5 + 0.2 = 0.7: (0.7 - 2)^2 = 1.69 -> 0.5 * 1.69 = 0.845
    # value token 1: (0 - 0)^2 = 0 vs clipped 0.5 - 0.2 = 0.3: 0.09            -> 0.5 * 0.09 = 0.045
    # value loss = (0.845 + 0.045) / 2 = 0.445; total = 0 + 0.5 * 0.445 = 0.2225
    assert out.loss.item() == pytest.approx(0.2225)
    assert _value(out.metrics, "value_loss") == pytest.approx(0.445)
    assert _value(out.metrics, "value_clip_frac") == pytest.approx(1.0)
    out.loss.backward()
    # both tokens on the clipped branch (constant in V) -> no value gradient
    assert values.grad.abs().max().item() == 0.0
    unclipped = LOSSES.get("ppo")(AlgorithmConfig(loss="ppo", advantage="gae", value_clip=None, value_coef=1.0))(
        _inputs([1.0], [0.0], values_N=torch.tensor([1.0]), old_values_N=torch.tensor([0.5]),
                returns_N=torch.tensor([2.0])))
    assert unclipped.loss.item() == pytest.approx(0.5)  # 0.5 * (1 - 2)^2
    with pytest.raises(ValueError, match="values"):
        LOSSES.get("ppo")(cfg)(_inputs([1.0], [1.0]))


def test_offpolicy_needs_proximal():
    with pytest.raises(ValueError, match="proximal"):
        LOSSES.get("grpo")(AlgorithmConfig(off_policy=OffPolicy.decoupled))(_inputs([1.0], [1.0]))

"""Typed configuration of the trainer (`TrainerConfig`) and of the RL algorithm (`AlgorithmConfig`).

Both are plain dataclasses so Hydra can register them in its ConfigStore (enums, no `Literal`), and
both validate in `__post_init__`: a wrong value fails at start with a `ValueError` naming the key and
what is allowed. Loss and advantage-estimator names are checked against their registries (or
accepted as import paths), so a typo fails before any model is built.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from dora.registry import parse_enum

# Enum member names equal their values: OmegaConf matches a YAML/CLI string against member *names*,
# so `algorithm.aggregation=token_mean` must be a name.


class Aggregation(str, enum.Enum):
    """How per-token losses are combined into one step loss (Dr. GRPO / DAPO terminology)."""

    token_mean = "token_mean"
    """Mean over every response token of the step (DAPO): long responses weigh by their length."""
    seq_mean_token_mean = "seq_mean_token_mean"
    """Mean over sequences of each sequence's token mean (original GRPO): biased to short answers."""
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"
    """Per sequence the token sum divided by a constant, then mean over sequences (Dr. GRPO)."""


class OffPolicy(str, enum.Enum):
    """Which policy the importance ratio is taken against and how the behavior mismatch is corrected."""

    behavior = "behavior"
    """Ratio against the engine's behavior log-probs, PPO clipping only (default)."""
    decoupled = "decoupled"
    """Decoupled PPO (AReaL): ratio against the proximal policy (weights at the start of the step),
    clipped, times the importance weight proximal / behavior (uncapped unless `is_cap` is set)."""
    tis = "tis"
    """Truncated importance sampling: as decoupled, with the weight truncated at `is_cap`."""
    mis = "mis"
    """Masked importance sampling: as decoupled, tokens whose weight lies outside
    [`is_cap_low`, `is_cap`] are masked out of the loss."""


class KLEstimator(str, enum.Enum):
    k1 = "k1"  # log pi - log ref: unbiased for KL(pi || ref), high variance, can be negative
    k3 = "k3"  # exp(ref - pi) - (ref - pi) - 1: unbiased, always >= 0, low variance (Schulman)


class LRSchedule(str, enum.Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@dataclass(slots=True)
class AlgorithmConfig:
    """The RL objective: advantage estimator, loss, clipping, off-policy correction, KL, entropy."""

    loss: str = "grpo"
    """Registered loss (`dora.trainer.losses.LOSSES`: grpo, ppo) or an import path."""
    advantage: str = "grpo"
    """Registered advantage estimator (`dora.trainer.advantages.ADVANTAGES`: grpo, rloo, gae) or an import path."""
    std_normalize: bool = True
    """GRPO: divide the group-centred reward by the group std (off = Dr. GRPO)."""
    adv_eps: float = 1e-6
    clip_low: float = 0.2
    """Ratio lower clip: 1 - clip_low."""
    clip_high: float = 0.2
    """Ratio upper clip: 1 + clip_high (DAPO's clip-higher uses e.g. 0.28)."""
    aggregation: Aggregation = Aggregation.token_mean
    seq_norm_constant: float = 1024.0
    """The constant of `seq_mean_token_sum_norm` (Dr. GRPO uses the generation budget)."""
    off_policy: OffPolicy = OffPolicy.behavior
    is_cap: float | None = None
    """TIS truncation / MIS upper mask bound on the importance weight; decoupled: optional mask bound."""
    is_cap_low: float = 0.0
    """MIS lower mask bound on the importance weight (0 = none)."""
    kl_coef: float = 0.0
    """Coefficient of the KL penalty to the reference model (0 = no reference model is kept)."""
    kl_estimator: KLEstimator = KLEstimator.k3
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (the loss subtracts entropy_coef * entropy)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    value_coef: float = 0.5
    value_clip: float | None = 0.2
    """PPO value clipping around the values at the start of the step (None = unclipped)."""
    ppo_epochs: int = 1
    """Passes over the step's batch; each pass runs `num_minibatches` optimizer updates."""
    num_minibatches: int = 1
    temperature: float = 1.0
    """Sampling temperature of the engine; log-probs are of log_softmax(logits / temperature) (0 = 1)."""
    routing_replay: bool | None = None
    """Replay the engine's recorded experts in training (None = on for MoE models)."""

    def __post_init__(self) -> None:
        from dora.trainer.advantages import ADVANTAGES
        from dora.trainer.losses import LOSSES

        try:
            advantage, loss = ADVANTAGES.get(self.advantage), LOSSES.get(self.loss)
        except ValueError as e:
            key = "algorithm.advantage" if "advantage" in str(e) else "algorithm.loss"
            raise ValueError(f"{key}: {e}") from None
        if getattr(loss, "needs_values", False) != getattr(advantage, "needs_values", False):
            raise ValueError(f"algorithm.loss={self.loss!r} and algorithm.advantage={self.advantage!r} do not fit: "
                             "a value-head loss (ppo) needs a value-based estimator (gae) and vice versa")
        self.aggregation = parse_enum(Aggregation, self.aggregation, "algorithm.aggregation")
        self.off_policy = parse_enum(OffPolicy, self.off_policy, "algorithm.off_policy")
        self.kl_estimator = parse_enum(KLEstimator, self.kl_estimator, "algorithm.kl_estimator")
        for key in ("clip_low", "clip_high"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ValueError(f"algorithm.{key} must be a finite value >= 0, got {getattr(self, key)}")
        if self.clip_low >= 1:
            raise ValueError(f"algorithm.clip_low must be < 1 (the lower bound is 1 - clip_low), got {self.clip_low}")
        for key in ("adv_eps", "seq_norm_constant"):
            if not getattr(self, key) > 0:
                raise ValueError(f"algorithm.{key} must be > 0, got {getattr(self, key)}")
        for key in ("kl_coef", "entropy_coef", "value_coef", "temperature", "is_cap_low"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"algorithm.{key} must be >= 0, got {getattr(self, key)}")
        if self.is_cap is not None and not self.is_cap > max(self.is_cap_low, 0.0):
            raise ValueError(f"algorithm.is_cap must be > is_cap_low ({self.is_cap_low}) and > 0, got {self.is_cap}")
        if self.off_policy in (OffPolicy.tis, OffPolicy.mis) and self.is_cap is None:
            raise ValueError(f"algorithm.is_cap must be set for off_policy={self.off_policy.value!r}")
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"algorithm.value_clip must be > 0 or null, got {self.value_clip}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"algorithm.gamma and algorithm.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        for key in ("ppo_epochs", "num_minibatches"):
            if getattr(self, key) < 1:
                raise ValueError(f"algorithm.{key} must be >= 1, got {getattr(self, key)}")

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.num_minibatches


@dataclass(slots=True)
class TrainerConfig:
    """Optimisation and memory knobs of the trainer backend."""

    lr: float = 1e-5
    value_lr: float | None = None
    """Learning rate of the value head's param group (None = lr)."""
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the global grad norm to this (0 = no clipping; the norm is still measured)."""
    lr_schedule: LRSchedule = LRSchedule.constant
    warmup_steps: int = 0
    """Linear warm-up over this many optimizer updates."""
    total_steps: int = 0
    """Optimizer updates over which linear/cosine decay to `min_lr_ratio * lr` (required for them)."""
    min_lr_ratio: float = 0.0
    max_tokens_per_microbatch: int = 4096
    """Token budget of one micro-batch, counting padding (rows x longest row)."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk of the log-prob/entropy computation (memory O(chunk x vocab))."""
    value_hidden_size: int = 0
    """Hidden width of the PPO value head MLP (0 = the model's hidden size)."""
    value_trunk_grad: bool = False
    """Let the value loss back-propagate into the shared trunk (off: only the head learns from it)."""
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        self.lr_schedule = parse_enum(LRSchedule, self.lr_schedule, "trainer.lr_schedule")
        for key in ("lr", "weight_decay", "eps", "max_grad_norm", "min_lr_ratio"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        if self.value_lr is not None and not self.value_lr >= 0:
            raise ValueError(f"trainer.value_lr must be >= 0 or null, got {self.value_lr}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for key in ("warmup_steps", "total_steps", "value_hidden_size"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        if self.lr_schedule is not LRSchedule.constant and self.total_steps <= self.warmup_steps:
            raise ValueError(f"trainer.total_steps ({self.total_steps}) must exceed trainer.warmup_steps "
                             f"({self.warmup_steps}) for lr_schedule={self.lr_schedule.value!r}")
        for key in ("max_tokens_per_microbatch", "logprob_chunk_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")

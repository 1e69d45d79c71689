"""Records that cross stage boundaries (see DESIGN.md, "Records").

dataset -> PromptSource -> `PromptGroup` -> RolloutPool -> Engine -> `Trajectory` -> RewardPool
-> TrajectoryBuffer -> `Batch` -> Trainer -> `PolicyVersion` -> WeightSync -> Engine.

Stages only exchange these records (and the small protocols next to each stage), never each
other's internals. Token ids are plain Python lists (cheap to hash, decode and checkpoint as JSON);
per-token numeric arrays are torch tensors on the CPU.

Shape legend: T = response tokens of one trajectory, P = prompt tokens, L = MoE layers,
K = experts per token (top-k).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token was sampled (it is part of response_ids)
    LENGTH = "length"  # max_new_tokens or the context limit was reached
    ABORT = "abort"  # aborted by the rollout pool (e.g. `on_stale=regenerate`); never trained on


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How an engine samples one group. RL defaults: top_p=1 and top_k off, because truncating the
    distribution biases the importance ratio against the trainer's full softmax.

    Temperature convention (the trainer must match it): behavior log-probs are
    `log_softmax(logits / temperature)` at the sampled token, i.e. the log-probability under the
    distribution actually sampled from, before top-p/top-k truncation. Greedy (`temperature == 0`)
    reports `log_softmax(logits)`.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # per-request seed; sample i of a group uses seed + i

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"sampling.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass(slots=True)
class PromptGroup:
    """One prompt to be sampled `num_samples` times (a GRPO group). Trained on only when all
    `num_samples` trajectories are finished."""

    group_id: int
    """Unique per admission attempt. A regenerated prompt gets a new group_id, same prompt_id."""
    prompt_id: int
    """Stable id of the dataset row (the exactly-once unit across regenerations and resumes)."""
    prompt_ids: list[int]
    """[P] token ids of the prompt."""
    num_samples: int = 1
    prompt_text: str = ""
    answer: Any = None
    """What the reward compares against (reference answer, test cases, ...)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form per-row metadata passed to the reward (task name, difficulty, ...)."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples (n) must be >= 1, got {self.num_samples}")
        if not self.prompt_ids:
            raise ValueError(f"group {self.group_id} (prompt {self.prompt_id}) has an empty prompt")


@dataclass(slots=True)
class Trajectory:
    """One sampled response. Every token of it comes from exactly one policy version."""

    group_id: int
    sample_idx: int
    """0..num_samples-1 within the group."""
    prompt_id: int
    prompt_ids: list[int]
    """[P] prompt token ids."""
    response_ids: list[int]
    """[T] sampled token ids (including a final stop token, if any)."""
    behavior_logprobs: torch.Tensor
    """[T] float32: log-prob of each sampled token under the engine's sampling distribution (see
    SamplingParams for the temperature convention)."""
    version: int
    """The policy version that produced the tokens (== min_version == max_version except in the
    labelled partial-rollout baseline, where it is min_version: staleness counts the oldest token)."""
    min_version: int
    """Lowest policy version that produced any token of this trajectory (reported by the engine)."""
    max_version: int
    """Highest policy version that produced any token of this trajectory (reported by the engine)."""
    finish_reason: FinishReason
    reward: float | None = None
    """Scalar reward, filled by the reward stage."""
    token_rewards: torch.Tensor | None = None
    """[T] float32 per-token rewards, for tasks that give them."""
    routing: torch.Tensor | None = None
    """[P + T - 1, L, K] uint8 (int16 when experts > 256): top-k expert ids chosen by each MoE
    layer for every token fed to the model (the last sampled token is never fed back). Same layout
    as vLLM's routed-experts output. None for dense models or when the engine cannot record it."""
    engine_id: int = 0
    queued_at: float = 0.0
    """Engine clock (time.monotonic seconds) when the sequence was submitted."""
    first_token_at: float = 0.0
    finished_at: float = 0.0
    reward_info: dict[str, Any] = field(default_factory=dict)
    """Reward diagnostics (extracted answer, failure reason, ...)."""

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)

    @property
    def is_single_version(self) -> bool:
        return self.min_version == self.max_version


@dataclass(slots=True)
class PolicyVersion:
    """One published set of weights. A train step publishes exactly one."""

    version: int
    weights: Mapping[str, torch.Tensor]
    """Named tensors, the dora model's `state_dict()` naming: Hugging Face parameter names, except
    that each MoE layer's experts are stacked as transformers (>= 5) holds them in memory,
    `...mlp.experts.gate_up_proj` [E, 2I, D] and `...mlp.experts.down_proj` [E, D, I]. Conversion
    to and from the per-expert on-disk layout lives in `dora.models` (folder save/load)."""
    step: int = 0
    """Train step that produced it (version v is published by step v - 1; version 0 = initial)."""

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())


@dataclass(slots=True)
class Batch:
    """What one train step consumes: complete groups (all n trajectories each)."""

    step: int
    groups: list[list[Trajectory]]
    """B groups, each a list of its num_samples trajectories ordered by sample_idx."""
    advantages: list[torch.Tensor] | None = None
    """Per trajectory (flattened in group order), [T] float32; filled by the advantage estimator."""

    @property
    def trajectories(self) -> list[Trajectory]:
        return [t for group in self.groups for t in group]

    @property
    def versions(self) -> list[int]:
        return [group[0].version for group in self.groups]

    @property
    def max_staleness(self) -> int:
        return max(self.step - t.version for t in self.trajectories)

    @property
    def num_tokens(self) -> int:
        return sum(t.num_tokens for t in self.trajectories)

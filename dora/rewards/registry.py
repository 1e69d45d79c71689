"""The reward registry and the reward function contract.

A reward is `fn(response_text, answer, meta, **options) -> float | RewardResult`, where `answer` and
`meta` come from the prompt's `PromptGroup` and `options` from `reward.options` in the config.
Built-ins register with `@register("exact_match", inline=True)`: `inline` marks a cheap, trusted
verifier that the RewardPool may run in the caller's thread; everything else (users' functions,
named by import path 'package.module:fn') runs in killable worker processes.

This module must stay free of torch: reward worker processes import it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dora.registry import Registry

RewardFn = Callable[..., "float | RewardResult"]
REWARDS: Registry[RewardFn] = Registry("reward")


@dataclass(slots=True)
class RewardResult:
    score: float
    info: dict[str, Any] = field(default_factory=dict)
    """Diagnostics copied into `Trajectory.reward_info` (extracted answer, partial credit, ...)."""


def register(name: str, *, inline: bool = False) -> Callable[[RewardFn], RewardFn]:
    def decorator(fn: RewardFn) -> RewardFn:
        fn.dora_inline = inline  # type: ignore[attr-defined]
        return REWARDS.register(name)(fn)

    return decorator


def get_reward(name: str) -> RewardFn:
    """A registered reward or an import path; unknown names fail listing the registered ones."""
    import dora.rewards.math  # noqa: F401  (registers the built-ins)
    import dora.rewards.synthetic  # noqa: F401

    fn = REWARDS.get(name)
    if not callable(fn):
        raise ValueError(f"reward {name!r} is a {type(fn).__name__}, not a function fn(response, answer, meta)")
    return fn


def is_inline(fn: RewardFn) -> bool:
    return bool(getattr(fn, "dora_inline", False))


def to_result(value: Any) -> RewardResult:
    """Normalise what a reward returned; a non-number or non-finite score is a TypeError/ValueError."""
    if isinstance(value, RewardResult):
        score, info = value.score, dict(value.info)
    else:
        score, info = value, {}
    if isinstance(score, bool):
        score = float(score)
    if not isinstance(score, numbers.Real):
        raise TypeError(f"reward returned {type(score).__name__}; expected a float or RewardResult")
    if not math.isfinite(score):
        raise ValueError(f"reward returned a non-finite score {score}")
    return RewardResult(float(score), info)

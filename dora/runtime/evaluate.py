"""Held-out evaluation: greedy decoding of one policy version on a fixed prompt set, exact-answer
accuracy. Used by the training loop every `eval_every` steps and by `tools/warm_start.py`.

It runs on its own engine (in the caller's thread, `engine.step()` until done) so evaluation never
mixes with rollout groups or changes what the rollout engines hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dora.data.tokenizer import Tokenizer
from dora.engines.config import EngineConfig
from dora.engines.torch_engine import TorchEngine
from dora.models.model import DecoderLM
from dora.rewards.registry import get_reward, to_result
from dora.types import PromptGroup, SamplingParams, Trajectory


@dataclass(slots=True)
class EvalResult:
    accuracy: float
    """Fraction of prompts whose greedy response scores >= 1 (an exact, fully correct answer)."""
    mean_reward: float
    mean_response_tokens: float
    num_prompts: int


def generate(engine: TorchEngine, version: int, groups: Sequence[PromptGroup], sampling: SamplingParams,
             max_in_flight: int | None = None) -> list[Trajectory]:
    """Run `groups` to completion on `engine` (stepped in this thread); trajectories in group order."""
    limit = max_in_flight or engine.config.max_num_seqs
    pending = list(groups)
    done: dict[tuple[int, int], Trajectory] = {}
    in_flight = 0
    while pending or engine.has_work():
        while pending and in_flight + pending[0].num_samples <= limit:
            group = pending.pop(0)
            engine.submit(group, version, sampling)
            in_flight += group.num_samples
        for t in engine.step():
            done[(t.group_id, t.sample_idx)] = t
            in_flight -= 1
    return [done[(g.group_id, i)] for g in groups for i in range(g.num_samples)]


def evaluate(engine: TorchEngine, version: int, groups: Sequence[PromptGroup], tokenizer: Tokenizer,
             reward: str, max_new_tokens: int, reward_options: Mapping | None = None) -> EvalResult:
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                              stop_token_ids=(tokenizer.eos_token_id,), seed=0)
    trajectories = generate(engine, version, groups, sampling)
    fn = get_reward(reward)
    by_group = {g.group_id: g for g in groups}
    scores = []
    for t in trajectories:
        group = by_group[t.group_id]
        text = tokenizer.decode(t.response_ids, skip_special_tokens=True)
        scores.append(to_result(fn(text, group.answer, group.meta, **dict(reward_options or {}))).score)
    num = max(len(scores), 1)
    return EvalResult(accuracy=sum(s >= 1.0 for s in scores) / num, mean_reward=sum(scores) / num,
                      mean_response_tokens=sum(t.num_tokens for t in trajectories) / max(len(trajectories), 1),
                      num_prompts=len(groups))


def greedy_accuracy(model: DecoderLM, tokenizer: Tokenizer, groups: Sequence[PromptGroup], reward: str,
                    max_new_tokens: int, engine_config: EngineConfig | None = None) -> float:
    """Accuracy of `model`'s current weights, on a throwaway engine."""
    prompt_len = max(len(g.prompt_ids) for g in groups)
    config = engine_config or EngineConfig(max_num_seqs=64, max_model_len=prompt_len + max_new_tokens + 1,
                                                max_num_batched_tokens=1024, max_live_versions=1)
    engine = TorchEngine(model.config, config)
    with torch.no_grad():
        engine.add_version(0, {k: v.detach() for k, v in model.state_dict().items()})
    return evaluate(engine, 0, groups, tokenizer, reward, max_new_tokens).accuracy

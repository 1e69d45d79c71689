"""Tiny models and synthetic trajectories for the trainer tests (no engine needed).

Imported by the test modules of this folder (pytest puts it on sys.path), not a conftest, so the
helpers are plain functions with explicit arguments.
"""

from __future__ import annotations

import torch

from dora.models.config import ModelConfig
from dora.models.model import DecoderLM
from dora.types import Batch, FinishReason, Trajectory


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    return ModelConfig.tiny(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> DecoderLM:
    return DecoderLM.from_config(tiny_config(**overrides), seed=seed)


@torch.no_grad()
def score(model: DecoderLM, prompt: list[int], response: list[int], temperature: float = 1.0):
    """(behavior log-probs [T], routing [P + T - 1, L, K] or None) as an engine would record them."""
    out = model(torch.tensor([prompt + response[:-1]]))
    logits = out.logits_BSV[0, len(prompt) - 1:].float() / (temperature or 1.0)
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None])[:, 0]
    routing = None if out.routing_BSLK is None else out.routing_BSLK[0].to(model.config.routing_dtype)
    return logprobs, routing


@torch.no_grad()
def sample_batch(model: DecoderLM, *, step: int, num_groups: int, group_size: int, prompt_len: int,
                 response_len: int, reward_fn, generator: torch.Generator, temperature: float = 1.0) -> Batch:
    """Sample `num_groups` groups from `model` (full recompute per token: fine for 4-token answers)."""
    vocab = model.config.vocab_size
    prompts = torch.randint(1, vocab, (num_groups, prompt_len), generator=generator)
    ids = prompts.repeat_interleave(group_size, dim=0)
    for _ in range(response_len):
        logits = model(ids).logits_BSV[:, -1].float() / temperature
        ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)], dim=1)
    groups = []
    for g in range(num_groups):
        group = []
        for i in range(group_size):
            row = ids[g * group_size + i].tolist()
            prompt, response = row[:prompt_len], row[prompt_len:]
            logprobs, routing = score(model, prompt, response, temperature)
            group.append(Trajectory(group_id=step * 1000 + g, sample_idx=i, prompt_id=g, prompt_ids=prompt,
                                    response_ids=response, behavior_logprobs=logprobs, version=step, min_version=step,
                                    max_version=step, finish_reason=FinishReason.LENGTH, reward=reward_fn(response),
                                    routing=routing))
        groups.append(group)
    return Batch(step=step, groups=groups)


def random_batch(model: DecoderLM, *, seed: int, num_groups: int = 3, group_size: int = 3, max_prompt: int = 5,
                 max_response: int = 7) -> Batch:
    """Trajectories of varied lengths with behavior log-probs near the model's (ratios != 1)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    groups = []
    for gid in range(num_groups):
        group = []
        for i in range(group_size):
            prompt = torch.randint(0, vocab, (int(torch.randint(1, max_prompt + 1, (1,), generator=g)),), generator=g)
            response = torch.randint(0, vocab, (int(torch.randint(1, max_response + 1, (1,), generator=g)),), generator=g)
            logprobs, routing = score(model, prompt.tolist(), response.tolist())
            logprobs = logprobs + 0.3 * torch.randn(logprobs.shape, generator=g)
            group.append(Trajectory(group_id=gid, sample_idx=i, prompt_id=gid, prompt_ids=prompt.tolist(),
                                    response_ids=response.tolist(), behavior_logprobs=logprobs, version=0, min_version=0,
                                    max_version=0, finish_reason=FinishReason.LENGTH,
                                    reward=float(torch.rand((), generator=g)), routing=routing))
        groups.append(group)
    return Batch(step=0, groups=groups)

"""Token sampling for the torch engine: one vectorized call per step for every row of the batch.

Where it sits: `torch_engine` runs the forward pass, takes the logits of every row that produces a
token this step (decode rows and the last prompt token of finished prefills) and calls `sample`.

Reproducibility without per-row generators: each row draws its uniform from a counter-based hash of
(seed, token index) — a splitmix64 finalizer computed on int64 tensors — so a sequence's random
stream depends only on its own seed and how many tokens it has produced, never on which other rows
share the batch or in which order they sit. The token is then drawn by inverse CDF (one uniform per
row), which keeps the whole step to a handful of tensor ops.

Log-prob convention (see `dora.types.SamplingParams`): `log_softmax(logits / temperature)` at the
sampled token, before top-p/top-k truncation; greedy rows (temperature 0) report `log_softmax(logits)`.

Shape legend: B rows sampled this step, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned constant x (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic on signed ints)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors; int64 multiplication wraps modulo 2**64."""
    x = x ^ _shr(x, 30)
    x = x * _signed(_MIX1)
    x = x ^ _shr(x, 27)
    x = x * _signed(_MIX2)
    return x ^ _shr(x, 31)


def mix64_reference(x: int) -> int:
    """The same function on Python ints (unsigned), used by tests to pin the tensor version."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * _MIX1) & _MASK64
    x ^= x >> 27
    x = (x * _MIX2) & _MASK64
    return x ^ (x >> 31)


def uniforms(seed_B: torch.Tensor, counter_B: torch.Tensor) -> torch.Tensor:
    """One float32 uniform in (0, 1) per row, a pure function of (seed, counter)."""
    key_B = mix64(seed_B * _signed(_GOLDEN) + counter_B)
    bits_B = _shr(key_B, 40)  # top 24 bits: exactly representable in float32
    return (bits_B.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, as tensors on the logits' device."""

    temperature_B: torch.Tensor
    """float32; 0 = greedy."""
    top_p_B: torch.Tensor
    """float32 in (0, 1]; 1 = off."""
    top_k_B: torch.Tensor
    """int64; 0 = off."""
    seed_B: torch.Tensor
    """int64 per-sequence seed."""
    counter_B: torch.Tensor
    """int64 index of the token being sampled within its sequence's response (0 = first)."""
    all_greedy: bool
    any_truncation: bool
    """Some row has top-p < 1 or top-k > 0 (the sort path is skipped otherwise)."""


def sample(logits_BV: torch.Tensor, params: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tokens_B int64, logprobs_B float32) following the module's conventions."""
    logits_BV = logits_BV.float()
    greedy_tokens_B = logits_BV.argmax(dim=-1)
    if params.all_greedy:
        logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
        return greedy_tokens_B, logprobs_BV.gather(1, greedy_tokens_B[:, None]).squeeze(1)

    greedy_B = params.temperature_B == 0
    temperature_B = torch.where(greedy_B, torch.ones_like(params.temperature_B), params.temperature_B)
    logprobs_BV = torch.log_softmax(logits_BV / temperature_B[:, None], dim=-1)
    probs_BV = logprobs_BV.exp()
    u_B1 = uniforms(params.seed_B, params.counter_B)[:, None]
    if params.any_truncation:
        tokens_B = _sample_truncated(probs_BV, params.top_p_B, params.top_k_B, u_B1)
    else:
        cdf_BV = probs_BV.cumsum(dim=-1)
        tokens_B = _invert_cdf(cdf_BV, u_B1)
    tokens_B = torch.where(greedy_B, greedy_tokens_B, tokens_B)
    return tokens_B, logprobs_BV.gather(1, tokens_B[:, None]).squeeze(1)


def _invert_cdf(cdf_BV: torch.Tensor, u_B1: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative mass reaches u * total (zero-mass tokens are never chosen)."""
    target_B1 = u_B1 * cdf_BV[:, -1:]
    index_B = torch.searchsorted(cdf_BV, target_B1).squeeze(1)
    return index_B.clamp_(max=cdf_BV.shape[1] - 1)


def _sample_truncated(probs_BV: torch.Tensor, top_p_B: torch.Tensor, top_k_B: torch.Tensor,
                      u_B1: torch.Tensor) -> torch.Tensor:
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    vocab = probs_BV.shape[1]
    # Top-p keeps the smallest prefix whose mass reaches p: a token stays if the mass strictly
    # before it is < p (so the most likely token always stays).
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    keep_BV = mass_before_BV < top_p_B[:, None]
    k_B = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, vocab))
    keep_BV &= torch.arange(vocab, device=probs_BV.device)[None, :] < k_B[:, None]
    kept_BV = sorted_BV * keep_BV
    rank_B = _invert_cdf(kept_BV.cumsum(dim=-1), u_B1)
    return order_BV.gather(1, rank_B[:, None]).squeeze(1)

"""Log-probs and entropy of the sampled tokens from the final hidden state, in chunks of tokens.

The trainer's memory hot spot is the LM head: `[tokens, vocab]` fp32 logits for a step of 64k
tokens and a 150k vocabulary are 38 GB, twice more with their gradient. Here the logits exist only
for `chunk_size` tokens at a time, in the forward and again (recomputed) in the backward, so memory
is O(chunk x vocab) + O(tokens): a custom autograd function saves only the hidden states, the
targets and one log-sum-exp per token.

Temperature follows the engine (see `SamplingParams`): log-probs are those of
`log_softmax(logits / temperature)` (temperature 0, greedy, is treated as 1).

This is the pure-torch reference for a fused kernel in `dora_kernels/`: a kernel must match
`chunked_logprobs` values and gradients, which the tests check against `naive_logprobs`.

Shape legend: N = tokens, D = hidden size, V = vocabulary, C = tokens in one chunk.
"""

from __future__ import annotations

import torch


def _scale(temperature: float) -> float:
    return 1.0 / temperature if temperature > 0 else 1.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least (bf16/fp16 hidden states are upcast); fp64 stays fp64 (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits_CV(hidden_CD: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    logits_CV = hidden_CD.to(weight_VD.dtype) @ weight_VD.t()
    if bias_V is not None:
        logits_CV = logits_CV + bias_V
    return logits_CV * scale


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, targets_N, scale, chunk_size, with_entropy):
        dtype = _compute_dtype(hidden_ND.dtype)
        weight32_VD = weight_VD.to(dtype)
        bias32_V = None if bias_V is None else bias_V.to(dtype)
        num_tokens = hidden_ND.shape[0]
        logprobs_N = hidden_ND.new_empty(num_tokens, dtype=dtype)
        entropy_N = hidden_ND.new_empty(num_tokens if with_entropy else 0, dtype=dtype)
        lse_N = hidden_ND.new_empty(num_tokens, dtype=dtype)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits_CV = _chunk_logits_CV(hidden_ND[start:end], weight32_VD, bias32_V, scale)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            lse_N[start:end] = lse_C
            logprobs_N[start:end] = logits_CV.gather(1, targets_N[start:end, None]).squeeze(1) - lse_C
            if with_entropy:
                probs_CV = torch.exp(logits_CV - lse_C[:, None])
                # H = lse - sum(p * z): avoids 0 * log(0) for underflowed probabilities.
                entropy_N[start:end] = lse_C - (probs_CV * logits_CV).sum(-1)
        ctx.save_for_backward(hidden_ND, weight_VD, bias_V, targets_N, lse_N, entropy_N)
        ctx.scale, ctx.chunk_size, ctx.with_entropy = scale, chunk_size, with_entropy
        ctx.mark_non_differentiable(lse_N)
        # An unused entropy output gets grad None (not zeros), so its backward term is skipped.
        ctx.set_materialize_grads(False)
        return logprobs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprobs_N, grad_entropy_N):
        hidden_ND, weight_VD, bias_V, targets_N, lse_N, entropy_N = ctx.saved_tensors
        scale, chunk_size = ctx.scale, ctx.chunk_size
        dtype = _compute_dtype(hidden_ND.dtype)
        weight32_VD = weight_VD.to(dtype)
        bias32_V = None if bias_V is None else bias_V.to(dtype)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden_ND = torch.zeros_like(hidden_ND, dtype=dtype) if need_hidden else None
        grad_weight_VD = torch.zeros_like(weight32_VD) if need_weight else None
        grad_bias_V = torch.zeros_like(bias32_V) if need_bias and bias32_V is not None else None
        with_entropy = ctx.with_entropy and grad_entropy_N is not None
        for start in range(0, hidden_ND.shape[0], chunk_size):
            end = min(start + chunk_size, hidden_ND.shape[0])
            hidden_CD = hidden_ND[start:end]
            logits_CV = _chunk_logits_CV(hidden_CD, weight32_VD, bias32_V, scale)
            logp_CV = logits_CV - lse_N[start:end, None]
            probs_CV = torch.exp(logp_CV)
            # d logp_target / d z = onehot(target) - p
            grad_z_CV = torch.zeros_like(logits_CV)
            if grad_logprobs_N is not None:
                g_C = grad_logprobs_N[start:end].to(dtype)
                grad_z_CV -= probs_CV * g_C[:, None]
                grad_z_CV.scatter_add_(1, targets_N[start:end, None], g_C[:, None])
            if with_entropy:
                # dH / dz_k = -p_k (log p_k + H)
                g_C = grad_entropy_N[start:end].to(dtype)
                grad_z_CV -= probs_CV * (logp_CV + entropy_N[start:end, None]) * g_C[:, None]
            grad_z_CV *= scale
            if grad_hidden_ND is not None:
                grad_hidden_ND[start:end] = grad_z_CV @ weight32_VD
            if grad_weight_VD is not None:
                grad_weight_VD += grad_z_CV.t() @ hidden_CD.to(dtype)
            if grad_bias_V is not None:
                grad_bias_V += grad_z_CV.sum(0)
        return (None if grad_hidden_ND is None else grad_hidden_ND.to(hidden_ND.dtype),
                None if grad_weight_VD is None else grad_weight_VD.to(weight_VD.dtype),
                None if grad_bias_V is None else grad_bias_V.to(bias_V.dtype),
                None, None, None, None)


def chunked_logprobs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, *,
                     bias_V: torch.Tensor | None = None, temperature: float = 1.0, chunk_size: int = 1024,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs_N, entropy_N or None), float32 (float64 for float64 inputs), of `targets_N` under
    log_softmax((hidden_ND @ weight_VD.T + bias_V) / temperature), differentiable with respect to
    the hidden states, the LM-head weight and bias, without materialising the [N, V] logits."""
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"chunked_logprobs: hidden {tuple(hidden_ND.shape)} must be [N, D] and weight "
                         f"{tuple(weight_VD.shape)} [V, D] with the same D")
    if targets_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"chunked_logprobs: targets {tuple(targets_N.shape)} must be [{hidden_ND.shape[0]}]")
    if chunk_size < 1:
        raise ValueError(f"chunked_logprobs: chunk_size must be >= 1, got {chunk_size}")
    logprobs_N, entropy_N = _ChunkedLogprobs.apply(hidden_ND, weight_VD, bias_V, targets_N.long(),
                                                   _scale(temperature), chunk_size, with_entropy)
    return logprobs_N, (entropy_N if with_entropy else None)


def naive_logprobs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, *,
                   bias_V: torch.Tensor | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantities from the full [N, V] logits: the test oracle, and fine for tiny vocabularies."""
    dtype = _compute_dtype(hidden_ND.dtype)
    logits_NV = _chunk_logits_CV(hidden_ND, weight_VD.to(dtype), None if bias_V is None else bias_V.to(dtype),
                                 _scale(temperature))
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(-1)
    return logp_NV.gather(1, targets_N.long()[:, None]).squeeze(1), entropy_N

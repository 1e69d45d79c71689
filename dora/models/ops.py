"""The decoder's math as pure functions, shared by the model (training) and the engines (inference).

`dora.models.model.DecoderLM` and `dora.engines.torch_engine` both call these, so the trainer and
the engine compute exactly the same function: same RMSNorm precision, same RoPE convention
(Hugging Face `rotate_half`), same router (softmax in fp32, top-k, optional renormalisation) and
the same expert grouping. No function here holds state; weights come in as arguments.

Shape legend (suffixes of tensor names):
  N  tokens (any flattened batch of positions; leading dims `...` are allowed where noted)
  B  batch rows, S sequence positions
  D  hidden size (model width)
  H  query heads, G key/value heads, Dh head dim (written D in `_NHD` names: the last dim)
  E  experts (the first dim of the expert weight tensors; may stack several versions' experts)
  K  experts per token (top-k)
  I  expert hidden width, F = 2 * I (gate and up stacked)
  V  vocabulary
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- norms and RoPE

def rms_norm(x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; statistics in fp32, scaled in the input dtype (as HF Qwen3)."""
    x32 = x_ND.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight_D * x32.to(x_ND.dtype)


def rope_cos_sin(positions_N: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., Dh] for integer positions of any shape (HF default RoPE, fp32 then cast)."""
    device = positions_N.device if device is None else device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = positions_N.to(device=device, dtype=torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_NHD: torch.Tensor, cos_ND: torch.Tensor, sin_ND: torch.Tensor) -> torch.Tensor:
    """Rotate every head of x [..., H, Dh] by the position tables [..., Dh] (broadcast over heads)."""
    cos, sin = cos_ND.unsqueeze(-2), sin_ND.unsqueeze(-2)
    return x_NHD * cos + rotate_half(x_NHD) * sin


# ---------------------------------------------------------------------------- attention

def project_qkv(
    x_ND: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    *,
    head_dim: int,
    cos_ND: torch.Tensor,
    sin_ND: torch.Tensor,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> q [..., H, Dh], k [..., G, Dh], v [..., G, Dh]: projection (+ bias), per-head
    q/k RMSNorm when given (Qwen3), then RoPE on q and k. cos/sin are [..., Dh] for the same positions."""
    q_NHD = F.linear(x_ND, q_weight, q_bias).unflatten(-1, (-1, head_dim))
    k_NGD = F.linear(x_ND, k_weight, k_bias).unflatten(-1, (-1, head_dim))
    v_NGD = F.linear(x_ND, v_weight, v_bias).unflatten(-1, (-1, head_dim))
    if q_norm_weight is not None:
        q_NHD = rms_norm(q_NHD, q_norm_weight, eps)
    if k_norm_weight is not None:
        k_NGD = rms_norm(k_NGD, k_norm_weight, eps)
    return apply_rope(q_NHD, cos_ND, sin_ND), apply_rope(k_NGD, cos_ND, sin_ND), v_NGD


def causal_attention(q_BSHD: torch.Tensor, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor,
                     attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA self-attention over whole sequences -> [B, S, H, Dh]. `attention_mask_BS` (1 = real
    token, right padding) only hides padded keys; padded query rows give finite garbage, to be masked
    by the caller's loss."""
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSGD, v_BSGD))
    if attention_mask_BS is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        S = q.shape[2]
        causal_SS = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        # Key j is visible from query i if j <= i and j is real; with right padding every query row
        # keeps key 0 visible, so no row is fully masked (which would give NaN).
        mask_B1SS = causal_SS & attention_mask_BS.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1SS, enable_gqa=True)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------- feed-forward

def dense_mlp(x_ND: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
              down_weight: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN: down(silu(gate(x)) * up(x))."""
    return F.linear(F.silu(F.linear(x_ND, gate_weight)) * F.linear(x_ND, up_weight), down_weight)


def route(
    router_logits_NE: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool,
    replay_ids_NK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax router -> (weights [N, K] in the logits' dtype, ids [N, K] int64).

    Softmax over all E experts in fp32, then top-k, then (optionally) renormalised to sum to 1.
    With `replay_ids_NK` (R3 routing replay) the ids are not recomputed: the weights are the current
    router's probabilities at the replayed ids (renormalised likewise), so the router keeps its
    gradient while the experts used are the recorded ones.
    """
    num_tokens, num_experts = router_logits_NE.shape
    probs_NE = torch.softmax(router_logits_NE, dim=-1, dtype=torch.float32)
    if replay_ids_NK is None:
        weights_NK, ids_NK = torch.topk(probs_NE, top_k, dim=-1)
    else:
        ids_NK = _check_replay(replay_ids_NK, num_tokens, top_k, num_experts).to(router_logits_NE.device)
        weights_NK = probs_NE.gather(1, ids_NK)
    if norm_topk_prob:
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
    return weights_NK.to(router_logits_NE.dtype), ids_NK


def _check_replay(replay_ids_NK: torch.Tensor, num_tokens: int, top_k: int, num_experts: int) -> torch.Tensor:
    if replay_ids_NK.shape != (num_tokens, top_k):
        raise ValueError(f"replayed expert ids must have shape [tokens={num_tokens}, top_k={top_k}], "
                         f"got {list(replay_ids_NK.shape)}")
    if replay_ids_NK.dtype.is_floating_point or replay_ids_NK.dtype == torch.bool:
        raise TypeError(f"replayed expert ids must be an integer tensor, got {replay_ids_NK.dtype}")
    ids_NK = replay_ids_NK.long()
    if ids_NK.numel():
        lo, hi = int(ids_NK.min()), int(ids_NK.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"replayed expert ids must be in [0, {num_experts}), found values in [{lo}, {hi}]")
    return ids_NK


MOE_IMPLS = ("loop", "grouped")
# Forces one expert implementation everywhere ("loop" or "grouped"); unset = chosen per call.
MOE_IMPL_ENV = "DORA_MOE_IMPL"


def moe_experts(
    x_ND: torch.Tensor,
    ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
    gate_up_EFD: torch.Tensor,
    down_EDI: torch.Tensor,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Dropless SwiGLU experts -> y [N, D] = sum_k weights[n, k] * expert_{ids[n, k]}(x[n]).

    Token slots are grouped by expert with one stable sort of the flattened ids (slot order inside
    an expert stays token order, so the result does not depend on how the batch was grouped), each
    expert runs its matmuls over one contiguous slice, and the weighted outputs are summed back per
    token with index_add. Expert weights are indexed by their first dim, so callers may stack several
    versions' experts and offset ids by version * E. Autograd flows to x, the weights and the experts.

    `impl`: "loop" (the reference: one matmul pair per expert that has tokens) or "grouped" (one
    `torch._grouped_mm` per projection, bit-identical on CPU and ~10-20% faster there, no host sync);
    None = $DORA_MOE_IMPL, else "grouped" where supported, else "loop".
    """
    num_tokens, top_k = ids_NK.shape
    num_experts = gate_up_EFD.shape[0]
    flat_ids = ids_NK.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of_slot = order // top_k
    counts_E = torch.bincount(flat_ids, minlength=num_experts)
    x_sorted = x_ND[token_of_slot]
    impl = impl or os.environ.get(MOE_IMPL_ENV) or ("grouped" if grouped_mm_supported(x_ND, gate_up_EFD, down_EDI)
                                                    else "loop")
    if impl == "grouped":
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        gate_up_cF = torch._grouped_mm(x_sorted, gate_up_EFD.transpose(1, 2), offs=offsets_E)
        gate_cI, up_cI = gate_up_cF.chunk(2, dim=-1)
        y_sorted = torch._grouped_mm(F.silu(gate_cI) * up_cI, down_EDI.transpose(1, 2), offs=offsets_E)
    elif impl == "loop":
        outputs, start = [], 0
        for expert, count in enumerate(counts_E.tolist()):
            if count:
                gate_cI, up_cI = F.linear(x_sorted[start:start + count], gate_up_EFD[expert]).chunk(2, dim=-1)
                outputs.append(F.linear(F.silu(gate_cI) * up_cI, down_EDI[expert]))
                start += count
        y_sorted = torch.cat(outputs) if outputs else x_sorted
    else:
        raise ValueError(f"moe impl must be one of {MOE_IMPLS}, got {impl!r}")
    y_sorted = y_sorted * weights_NK.reshape(-1)[order].to(x_ND.dtype)[:, None]
    return torch.zeros_like(x_ND).index_add(0, token_of_slot, y_sorted)


def grouped_mm_supported(x_ND: torch.Tensor, gate_up_EFD: torch.Tensor, down_EDI: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` can run these experts: CPU only (its CUDA kernel needs bf16 on
    sm90+ and is not exercised by dora's tests), fp32/bf16, rows aligned to 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x_ND.device.type != "cpu":
        return False
    if x_ND.dtype not in (torch.float32, torch.bfloat16) or not x_ND.dtype == gate_up_EFD.dtype == down_EDI.dtype:
        return False
    if not (gate_up_EFD.is_contiguous() and down_EDI.is_contiguous()):
        return False
    align = 16 // x_ND.element_size()
    return x_ND.shape[-1] % align == 0 and down_EDI.shape[-1] % align == 0

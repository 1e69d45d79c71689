"""The MoE experts of the torch engine's forward, in the engine's weight layout.

Where it sits: `PackedForward` calls `moe_experts(..., impl)` for every MoE layer of a step. The
engine keeps expert weights transposed and contiguous (`[E, D, 2I]` and `[E, I, D]`, see
`versions.LayerWeights`), which is the layout `torch._grouped_mm` and `torch.mm` read directly.

Implementations (same function as `dora.models.ops.moe_experts`, the trainer's; parity is tested in
tests/engines/test_torch_experts.py):
- "grouped": tokens sorted by expert, one `torch._grouped_mm` per projection (CPU, fp32/bf16).
- "loop": tokens sorted by expert, one matmul pair per expert that has tokens; used automatically
  for a handful of tokens (fewer token slots than experts), where only the weights of the experts
  actually used should be read, and where grouped_mm is unsupported.
- "padded": slots gathered into an [E, C, D] block (C = the busiest expert's count), one `torch.bmm`
  per projection. torch splits a bmm over experts across threads, while grouped_mm on CPU runs its
  groups one after another, each a matmul too small to split well.
- "ops": `dora.models.ops.moe_experts` itself (the reference), through transposed views.
- "auto" (default): "loop" for a handful of tokens, else "grouped" where supported, else "loop".
Measured per MoE layer on the bench model (64 tokens, top-2 of 8; best of 25 interleaved windows on a
shared 2-core machine): grouped 553-615 us at 1 thread / 477-557 us at 2; padded 639-739 / 431-549;
loop 596 / 536. A decode step at batch 64 is ~6.5 ms at 1 thread and ~5.4-5.9 ms at 2 with grouped or
padded alike: the expert matmuls read ~6 MB of weights per layer for ~16 rows per expert (bandwidth-
bound, ~1.5x from a 2nd thread at best), and ~2 ms of the step is a few hundred small ops whose
dispatch does not parallelise. So "auto" keeps grouped; force padded with `moe_impl`.
Expert weights are indexed by their first dim: several versions' experts may be stacked with ids
offset by version * E, and one call serves every version.

Shape legend: N tokens, K top-k, n = N * K token slots, E experts, C rows per expert (padded), D hidden,
I expert width, F = 2I.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dora.models import ops

MOE_IMPLS = ("auto", "grouped", "padded", "loop", "ops")


def grouped_supported(x_ND: torch.Tensor, gate_up_EDF: torch.Tensor, down_EID: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x_ND.device.type != "cpu":
        return False
    if x_ND.dtype not in (torch.float32, torch.bfloat16) or not x_ND.dtype == gate_up_EDF.dtype == down_EID.dtype:
        return False
    align = 16 // x_ND.element_size()  # grouped_mm wants 16-byte aligned rows
    return all(t.is_contiguous() and t.shape[-1] % align == 0 and t.shape[-2] % align == 0
               for t in (gate_up_EDF, down_EID))


def _sort_by_expert(ids_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (slot order grouped by expert (stable, token order inside), token of each sorted slot, flat ids)."""
    flat_ids = ids_NK.reshape(-1)
    order_n = torch.argsort(flat_ids, stable=True)
    return order_n, order_n // ids_NK.shape[1], flat_ids


def grouped_moe_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                        gate_up_EDF: torch.Tensor, down_EID: torch.Tensor) -> torch.Tensor:
    order_n, token_n, flat_ids = _sort_by_expert(ids_NK)
    offsets_E = torch.bincount(flat_ids, minlength=gate_up_EDF.shape[0]).cumsum(0).to(torch.int32)
    x_nD = x_ND.index_select(0, token_n)
    gate_nI, up_nI = torch._grouped_mm(x_nD, gate_up_EDF, offs=offsets_E).chunk(2, dim=-1)
    y_nD = torch._grouped_mm(F.silu(gate_nI) * up_nI, down_EID, offs=offsets_E)
    y_nD = y_nD * weights_NK.reshape(-1)[order_n].to(x_ND.dtype)[:, None]
    return torch.zeros_like(x_ND).index_add_(0, token_n, y_nD)


def loop_moe_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                     gate_up_EDF: torch.Tensor, down_EID: torch.Tensor) -> torch.Tensor:
    order_n, token_n, flat_ids = _sort_by_expert(ids_NK)
    counts = torch.bincount(flat_ids, minlength=gate_up_EDF.shape[0]).tolist()
    x_nD = x_ND.index_select(0, token_n)
    y_nD = torch.empty_like(x_nD)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            gate_cI, up_cI = torch.mm(x_nD[start:end], gate_up_EDF[expert]).chunk(2, dim=-1)
            torch.mm(F.silu(gate_cI) * up_cI, down_EID[expert], out=y_nD[start:end])
            start = end
    y_nD = y_nD * weights_NK.reshape(-1)[order_n].to(x_ND.dtype)[:, None]
    return torch.zeros_like(x_ND).index_add_(0, token_n, y_nD)


def padded_moe_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                       gate_up_EDF: torch.Tensor, down_EID: torch.Tensor) -> torch.Tensor:
    """Token slots gathered into an [E, C, D] block (C = the busiest expert's count) so each projection
    is one `torch.bmm`, which torch splits over experts across threads."""
    N, K = ids_NK.shape
    E, D = gate_up_EDF.shape[0], x_ND.shape[1]
    order_n, token_n, flat_ids = _sort_by_expert(ids_NK)
    counts_E = torch.bincount(flat_ids, minlength=E)
    capacity = int(counts_E.max())
    first_E = counts_E.cumsum(0) - counts_E
    # Row e * C + j holds expert e's j-th sorted slot; padding rows repeat token 0 (finite values,
    # computed and never read back), so the block is one gather with no zero fill.
    j_C = torch.arange(capacity, device=x_ND.device)
    sorted_EC = (first_E[:, None] + j_C).clamp_(max=order_n.shape[0] - 1)
    src_EC = torch.where(j_C < counts_E[:, None], token_n[sorted_EC], 0)
    x_ECD = x_ND.index_select(0, src_EC.view(-1)).view(E, capacity, D)
    sorted_ids_n = flat_ids[order_n]
    dest_sorted_n = sorted_ids_n * capacity + torch.arange(order_n.shape[0], device=x_ND.device) - first_E[sorted_ids_n]
    gate_ECI, up_ECI = torch.bmm(x_ECD, gate_up_EDF).chunk(2, dim=-1)
    y_ECD = torch.bmm(F.silu(gate_ECI) * up_ECI, down_EID).view(E * capacity, D)
    # Back in slot order (token n, choice k), then the K choices of a token summed in order.
    dest_n = torch.empty_like(dest_sorted_n).index_copy_(0, order_n, dest_sorted_n)
    y_NKD = y_ECD.index_select(0, dest_n).view(N, K, D)
    return (y_NKD * weights_NK.to(x_ND.dtype)[:, :, None]).sum(1)


def moe_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                gate_up_EDF: torch.Tensor, down_EID: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y [N, D] = sum_k weights[n, k] * expert_{ids[n, k]}(x[n]) through the chosen implementation."""
    if impl == "auto":
        few = ids_NK.numel() < gate_up_EDF.shape[0]
        impl = "grouped" if not few and grouped_supported(x_ND, gate_up_EDF, down_EID) else "loop"
    if impl == "padded":
        return padded_moe_experts(x_ND, ids_NK, weights_NK, gate_up_EDF, down_EID)
    if impl == "grouped":
        return grouped_moe_experts(x_ND, ids_NK, weights_NK, gate_up_EDF, down_EID)
    if impl == "loop":
        return loop_moe_experts(x_ND, ids_NK, weights_NK, gate_up_EDF, down_EID)
    if impl == "ops":
        return ops.moe_experts(x_ND, ids_NK, weights_NK, gate_up_EDF.transpose(1, 2), down_EID.transpose(1, 2))
    raise ValueError(f"moe impl must be one of {list(MOE_IMPLS)}, got {impl!r}")

"""The MoE experts of the torch engine's forward, in the engine's weight layout.

Where it sits: `PackedForward` calls `moe_experts(..., impl)` for every MoE layer of a step. The
engine keeps expert weights transposed and contiguous (`[E, D, 2I]` and `[E, I, D]`, see
`versions.LayerWeights`), which is the layout `torch._grouped_mm` and `torch.mm` read directly.

Implementations (same function as `dora.models.ops.moe_experts`, the trainer's; parity is tested in
tests/engines/test_torch_experts.py):
- "fused": the C++ kernel `dora_kernels.cpu_moe` (CPU): counting sort, gather, both matmuls, SwiGLU
  and the weighted combine in one call, with each expert's rows cut into blocks dealt to the intra-op
  threads longest-first (a hot expert is split between threads; each matmul runs single-threaded).
- "grouped": tokens sorted by expert, one `torch._grouped_mm` per projection (CPU, fp32/bf16).
- "loop": tokens sorted by expert, one matmul pair per expert that has tokens; used automatically
  for a handful of tokens (fewer token slots than experts), where only the weights of the experts
  actually used should be read, and where grouped_mm is unsupported.
- "padded": slots gathered into an [E, C, D] block (C = the busiest expert's count), one `torch.bmm`
  per projection. torch splits a bmm over experts across threads, while grouped_mm on CPU runs its
  groups one after another, each a matmul too small to split well.
- "ops": `dora.models.ops.moe_experts` itself (the reference), through transposed views.
- "auto" (default): on CPU "fused" when the kernel is built (`make setup` builds it), else "loop" for a
  handful of tokens, else "grouped" where supported, else "loop". The fused kernel is what makes the
  batch-64 decode step faster than grouped here (see `tools/bench_engine.py --moe-impl`).
Measured on the bench model (top-2 of 8; its random router sends about half of all slots to one
expert, e.g. counts [72, 8, 9, 11, 3, 9, 8, 8] at 64 tokens): at 64 tokens grouped's two matmuls
take ~650 us per layer at 1 thread and ~540 us at 2 (they read ~6 MB of expert weights per layer; a
small-M matmul gains ~1.5x from a 2nd thread, the hot expert's ~1.2x). Padded pays for the hot
expert's count in every expert (E x 72 rows for 128 slots). A capacity-blocked variant (each expert's
first C slots in one bmm, the rest of busy experts in their own matmul) and splitting the experts
between the calling thread and a helper thread (each single-threaded) were both slower in the engine
at 2 threads, so "auto" keeps grouped. In the engine, the small ops around the matmuls (sort, gather,
SwiGLU, combine) cost ~150 us per layer: hence the sort + searchsorted bookkeeping, the in-place
SwiGLU and the one-copy + bmm combine below.
Expert weights are indexed by their first dim: several versions' experts may be stacked with ids
offset by version * E, and one call serves every version.

Shape legend: N tokens, K top-k, n = N * K token slots, E experts, C rows per expert (padded), D hidden,
I expert width, F = 2I.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dora.models import ops
from dora_kernels import cpu_moe

MOE_IMPLS = ("auto", "fused", "grouped", "padded", "loop", "ops")


def fused_kernel():
    """The compiled `dora_kernels.cpu_moe` module, or None where it cannot be built."""
    return cpu_moe.load()


def fused_supported(x_ND: torch.Tensor, gate_up_EDF: torch.Tensor) -> bool:
    return (x_ND.device.type == "cpu" and x_ND.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and gate_up_EDF.is_contiguous() and cpu_moe.load() is not None)


def grouped_supported(x_ND: torch.Tensor, gate_up_EDF: torch.Tensor, down_EID: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x_ND.device.type != "cpu":
        return False
    if x_ND.dtype not in (torch.float32, torch.bfloat16) or not x_ND.dtype == gate_up_EDF.dtype == down_EID.dtype:
        return False
    align = 16 // x_ND.element_size()  # grouped_mm wants 16-byte aligned rows
    return all(t.is_contiguous() and t.shape[-1] % align == 0 and t.shape[-2] % align == 0
               for t in (gate_up_EDF, down_EID))


@functools.cache
def _expert_ids(num_experts: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_experts, device=device)


class _SlotOrder:
    """Token slots (token n, choice k; flat index n * K + k) grouped by expert: a stable sort of the
    ids, so slots keep token order inside an expert."""

    __slots__ = ("order_n", "token_n", "ends_E")

    def __init__(self, ids_NK: torch.Tensor, num_experts: int) -> None:
        sorted_ids_n, self.order_n = torch.sort(ids_NK.reshape(-1), stable=True)
        self.token_n = self.order_n // ids_NK.shape[1]
        self.ends_E = torch.searchsorted(sorted_ids_n, _expert_ids(num_experts, ids_NK.device), right=True,
                                         out_int32=True)
        """int32: end of each expert's slots in the sorted order (grouped_mm's offsets)."""

    def counts(self) -> torch.Tensor:
        return torch.diff(self.ends_E, prepend=self.ends_E.new_zeros(1)).long()

    def combine(self, y_nD: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Expert outputs in sorted slot order -> y [N, D] = sum_k weights[n, k] * output of slot (n, k):
        one gather back to slot order (by the inverse permutation: a parallel gather, ~2-3x faster on
        CPU than index_copy_ to the slots), then each token's weighted sum as a [1, K] x [K, D] product
        (one batched matmul instead of a zero fill, a scale and a scatter-add; equal to the reference
        up to float rounding)."""
        N, K = weights_NK.shape
        y_NKD = y_nD.index_select(0, torch.argsort(self.order_n)).view(N, K, -1)
        return torch.bmm(weights_NK.to(y_nD.dtype).unsqueeze(1), y_NKD).squeeze(1)


def _swiglu_(gate_up_nF: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up computed in place in the gate half of the [n, 2I] matmul output (no new buffer;
    the strided result feeds the next matmul directly)."""
    gate_nI, up_nI = gate_up_nF.chunk(2, dim=-1)
    return F.silu(gate_nI, inplace=True).mul_(up_nI)


def grouped_moe_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                        gate_up_EDF: torch.Tensor, down_EID: torch.Tensor) -> torch.Tensor:
    slots = _SlotOrder(ids_NK, gate_up_EDF.shape[0])
    x_nD = x_ND.index_select(0, slots.token_n)
    h_nI = _swiglu_(torch._grouped_mm(x_nD, gate_up_EDF, offs=slots.ends_E))
    return slots.combine(torch._grouped_mm(h_nI, down_EID, offs=slots.ends_E), weights_NK)


def loop_moe_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                     gate_up_EDF: torch.Tensor, down_EID: torch.Tensor) -> torch.Tensor:
    slots = _SlotOrder(ids_NK, gate_up_EDF.shape[0])
    x_nD = x_ND.index_select(0, slots.token_n)
    y_nD = torch.empty_like(x_nD)
    start = 0
    for expert, end in enumerate(slots.ends_E.tolist()):
        if end > start:
            h_cI = _swiglu_(torch.mm(x_nD[start:end], gate_up_EDF[expert]))
            torch.mm(h_cI, down_EID[expert], out=y_nD[start:end])
            start = end
    return slots.combine(y_nD, weights_NK)


def padded_moe_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                       gate_up_EDF: torch.Tensor, down_EID: torch.Tensor) -> torch.Tensor:
    """Token slots gathered into an [E, C, D] block (C = the busiest expert's count) so each projection
    is one `torch.bmm`, which torch splits over experts across threads."""
    E, D = gate_up_EDF.shape[0], x_ND.shape[1]
    slots = _SlotOrder(ids_NK, E)
    counts_E = slots.counts()
    num_slots = slots.order_n.shape[0]
    capacity = int(counts_E.max())
    first_E = counts_E.cumsum(0) - counts_E
    # Row e * C + j holds expert e's j-th sorted slot; padding rows repeat another slot's token
    # (finite values, computed and never read back), so the block is one gather with no zero fill.
    j_C = torch.arange(capacity, device=x_ND.device)
    sorted_EC = (first_E[:, None] + j_C).clamp_(max=num_slots - 1)
    x_ECD = x_ND.index_select(0, slots.token_n[sorted_EC].view(-1)).view(E, capacity, D)
    y_ECD = torch.bmm(_swiglu_(torch.bmm(x_ECD, gate_up_EDF)), down_EID)
    # Sorted slot i of expert e (its j-th) is block row e * C + j.
    expert_n = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=num_slots)
    block_row_n = expert_n * capacity + torch.arange(num_slots, device=x_ND.device) - first_E[expert_n]
    return slots.combine(y_ECD.view(E * capacity, D).index_select(0, block_row_n), weights_NK)


def moe_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                gate_up_EDF: torch.Tensor, down_EID: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y [N, D] = sum_k weights[n, k] * expert_{ids[n, k]}(x[n]) through the chosen implementation."""
    if impl == "auto":
        if fused_supported(x_ND, gate_up_EDF):
            impl = "fused"
        else:
            few = ids_NK.numel() < gate_up_EDF.shape[0]
            impl = "grouped" if not few and grouped_supported(x_ND, gate_up_EDF, down_EID) else "loop"
    if impl == "fused":
        kernel = cpu_moe.load()
        if kernel is None:
            raise RuntimeError(f"moe impl 'fused' needs the dora_kernels.cpu_moe kernel, which could not be "
                               f"built here: {cpu_moe.load_error()}")
        return kernel.moe_experts(x_ND, ids_NK, weights_NK.to(x_ND.dtype), gate_up_EDF, down_EID)
    if impl == "padded":
        return padded_moe_experts(x_ND, ids_NK, weights_NK, gate_up_EDF, down_EID)
    if impl == "grouped":
        return grouped_moe_experts(x_ND, ids_NK, weights_NK, gate_up_EDF, down_EID)
    if impl == "loop":
        return loop_moe_experts(x_ND, ids_NK, weights_NK, gate_up_EDF, down_EID)
    if impl == "ops":
        return ops.moe_experts(x_ND, ids_NK, weights_NK, gate_up_EDF.transpose(1, 2), down_EID.transpose(1, 2))
    raise ValueError(f"moe impl must be one of {list(MOE_IMPLS)}, got {impl!r}")

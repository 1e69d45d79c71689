"""Expert parallelism that follows a balancer `Plan`: dispatch, compute, combine over all-to-all.

Every rank holds a shard of the tokens (data parallel) and owns the parameters of some experts
(`owner[e]`, the rank keeping their optimizer state). For one MoE layer and micro-batch:
1. each token slot (token, k) is assigned a physical replica of its expert by the plan's quotas, in
   global token order (rank 0's tokens of expert e first, then rank 1's, ...), so the ranks agree
   without talking beyond one all-gather of per-expert counts;
2. the weights of every slot's expert travel from its owner to the slot's rank (all-to-all); in
   backward the same all-to-all runs in reverse, so every replica's gradient is summed back into
   the owner's parameter: replica gradients are reduced to the owning rank by autograd itself;
3. token rows go to their replica's rank (all-to-all), the experts run there with
   `dora.models.ops.moe_experts` (one slot = one local "expert"), and the outputs come back
   (all-to-all) to be weighted by the router and summed per token.
All-to-alls use `torch.distributed.all_to_all_single` (gloo on CPU, NCCL on GPU), wrapped in a small
autograd function whose backward is the reverse exchange.

Shape legend: N local tokens, K experts per token, D hidden, I expert width, F = 2 I, E experts,
W ranks (world size), S slots per rank, C token slots (rows) in flight.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dora.models import ops
from dora.models.model import MoEBlock
from dora.moe.plan import Plan, replica_of


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable `all_to_all_single` along dim 0 (backward = the reverse exchange)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _exchange_counts(send_W: list[int], group, device: torch.device) -> list[int]:
    send = torch.tensor(send_W, dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()


def ep_moe_experts(
    x_ND: torch.Tensor,
    ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
    owned_gate_up_OFD: torch.Tensor,
    owned_down_ODI: torch.Tensor,
    owner_E: np.ndarray,
    plan: Plan,
    group=None,
) -> torch.Tensor:
    """Expert-parallel `ops.moe_experts` on this rank's tokens -> y [N, D].

    `owned_*` hold the experts this rank owns, in ascending expert id (`owner_E == rank`). The plan's
    quotas must cover the token slots of all ranks together.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    S = plan.slots_per_rank
    num_experts = len(plan.home)
    if len(plan.quota) != world * S:
        raise ValueError(f"plan has {len(plan.quota)} slots but the group has {world} ranks x {S} slots")
    owner_E = np.asarray(owner_E, dtype=np.int64)
    mine = np.flatnonzero(owner_E == rank)
    if owned_gate_up_OFD.shape[0] != len(mine):
        raise ValueError(f"rank {rank} owns {len(mine)} experts but was given {owned_gate_up_OFD.shape[0]}")

    # Collectives run on the activations' device (NCCL needs CUDA tensors); plans and index
    # arithmetic stay in numpy on the host.
    device = x_ND.device

    def on_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    # 1. Token slots -> replicas, in global token order.
    flat = ids_NK.reshape(-1).cpu().numpy().astype(np.int64)
    local_counts_E = np.bincount(flat, minlength=num_experts)
    all_counts = [torch.empty(num_experts, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(all_counts, on_device(local_counts_E), group=group)
    offset_E = (torch.stack(all_counts[:rank]).sum(0).cpu().numpy() if rank
                else np.zeros(num_experts, dtype=np.int64))
    order = np.argsort(flat, kind="stable")
    starts = np.concatenate(([0], np.cumsum(local_counts_E)[:-1]))
    index_in_expert = np.empty_like(flat)
    index_in_expert[order] = np.arange(len(flat)) - starts[flat[order]] + offset_E[flat[order]]
    phys = replica_of(plan, flat, index_in_expert)
    dest = phys // S
    send_order = np.lexsort((np.arange(len(flat)), dest))
    send_counts = np.bincount(dest, minlength=world).tolist()
    recv_counts = _exchange_counts(send_counts, group, device)

    # 2. Slot weights from their owners (reverse exchange carries replica gradients home).
    my_slots = np.arange(rank * S, (rank + 1) * S)
    used_here = my_slots[plan.phys_to_log[my_slots] >= 0]
    w_send_idx, w_send_counts = [], []
    for d in range(world):
        slots_d = np.arange(d * S, (d + 1) * S)
        experts_d = plan.phys_to_log[slots_d]
        experts_d = experts_d[(experts_d >= 0) & (owner_E[np.maximum(experts_d, 0)] == rank)]
        w_send_idx.append(np.searchsorted(mine, experts_d))
        w_send_counts.append(len(experts_d))
    here_experts = plan.phys_to_log[used_here]
    w_recv_counts = np.bincount(owner_E[here_experts], minlength=world).tolist()
    send_idx = on_device(np.concatenate(w_send_idx).astype(np.int64))
    gate_up_rows = all_to_all(owned_gate_up_OFD[send_idx].flatten(1), w_recv_counts, w_send_counts, group)
    down_rows = all_to_all(owned_down_ODI[send_idx].flatten(1), w_recv_counts, w_send_counts, group)
    # Received rows come by owner rank, each owner's in slot order: put them back in slot order.
    by_owner = np.lexsort((used_here, owner_E[here_experts]))
    slot_of_row = np.empty(len(used_here), dtype=np.int64)
    slot_of_row[by_owner] = np.arange(len(used_here))
    gate_up_SFD = gate_up_rows[on_device(slot_of_row)].view(-1, *owned_gate_up_OFD.shape[1:])
    down_SDI = down_rows[on_device(slot_of_row)].view(-1, *owned_down_ODI.shape[1:])

    # 3. Tokens to replicas, experts, and back.
    K = ids_NK.shape[1]
    token_of_slot = on_device(send_order // K)
    x_send = x_ND[token_of_slot]
    x_recv = all_to_all(x_send, recv_counts, send_counts, group)
    slot_send = on_device(phys[send_order])
    slot_recv = torch.empty(sum(recv_counts), dtype=torch.int64, device=device)
    dist.all_to_all_single(slot_recv, slot_send, recv_counts, send_counts, group=group)
    compact = np.full(world * S, -1, dtype=np.int64)
    compact[used_here] = np.arange(len(used_here))
    local_ids = on_device(compact[slot_recv.cpu().numpy()]).unsqueeze(1)
    ones = torch.ones(local_ids.shape, dtype=x_ND.dtype, device=device)
    y_recv = ops.moe_experts(x_recv, local_ids, ones, gate_up_SFD, down_SDI) if len(used_here) else x_recv * 0
    y_back = all_to_all(y_recv, send_counts, recv_counts, group)
    w_flat = weights_NK.reshape(-1)[on_device(send_order)].to(x_ND.dtype)
    return torch.zeros_like(x_ND).index_add(0, token_of_slot, y_back * w_flat[:, None])


class ExpertParallelMoE(nn.Module):
    """A `MoEBlock` whose experts are sharded by owner and run where a plan puts them."""

    def __init__(self, block: MoEBlock, owner_E: np.ndarray, group=None) -> None:
        super().__init__()
        self.group = group
        rank = dist.get_rank(group)
        self.owner_E = np.asarray(owner_E, dtype=np.int64)
        mine = torch.from_numpy(np.flatnonzero(self.owner_E == rank))
        self.top_k, self.norm_topk_prob = block.top_k, block.norm_topk_prob
        self.gate = nn.Linear(block.gate.in_features, block.gate.out_features, bias=False,
                              dtype=block.gate.weight.dtype)
        with torch.no_grad():
            self.gate.weight.copy_(block.gate.weight)
        self.gate_up = nn.Parameter(block.experts.gate_up_proj.detach()[mine].clone())
        self.down = nn.Parameter(block.experts.down_proj.detach()[mine].clone())

    def forward(self, x_BSD: torch.Tensor, plan: Plan, replay_NK: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (y [B, S, D], expert ids used [N, K]); `plan` covers all ranks' tokens of this layer."""
        x_ND = x_BSD.reshape(-1, x_BSD.shape[-1])
        weights_NK, ids_NK = ops.route(self.gate(x_ND), self.top_k, self.norm_topk_prob, replay_NK)
        y_ND = ep_moe_experts(x_ND, ids_NK, weights_NK, self.gate_up, self.down, self.owner_E, plan, self.group)
        return y_ND.view_as(x_BSD), ids_NK

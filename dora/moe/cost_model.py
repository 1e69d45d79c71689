"""Simulated MoE layer time for a plan: what the bench compares policies on.

Per layer and micro-batch (forward + backward):
  time = slowest rank's expert compute
       + slowest rank's all-to-all (dispatch + combine, forward and backward) plus the weight copies
         and replica gradients that cross the inter-node link into/out of that rank (they share its NIC)
       + exposed intra-node movement: NVLink weight copies and gradient reductions beyond what hides
         behind the layer's compute (they are issued a layer ahead).
A step is the sum over layers and micro-batches. Tokens come from every rank (data parallel), so a
rank receives its token slots mostly from other nodes: (R - G) / R of them cross the inter-node link.

Hardware and model constants (published specs):
- NVIDIA H100 SXM: 989 TFLOP/s dense BF16 (H100 datasheet); we assume 50% of it for grouped expert
  GEMMs. NVLink 4: 900 GB/s per GPU, both directions together -> 450 GB/s one way.
- Inter-node: one 400 Gb/s NDR InfiniBand NIC per GPU (ConnectX-7) -> 50 GB/s one way.
- Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B): hidden 2048, moe_intermediate_size 768,
  128 experts, top-8.
- DeepSeek-V3 (config.json of deepseek-ai/DeepSeek-V3): hidden 7168, moe_intermediate_size 2048,
  256 routed experts, top-8.
Weights, activations and gradients in BF16 (2 bytes).

Shape legend: R ranks, P physical slots, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dora.moe.plan import Plan, Topology


@dataclass(slots=True, frozen=True)
class ExpertShape:
    hidden: int
    intermediate: int
    bytes_per_value: int = 2

    @property
    def params(self) -> int:
        return 3 * self.hidden * self.intermediate  # gate, up, down

    @property
    def weight_bytes(self) -> int:
        return self.params * self.bytes_per_value

    @property
    def flops_per_token(self) -> int:
        return 2 * self.params  # one multiply-add per weight, forward


@dataclass(slots=True, frozen=True)
class Hardware:
    flops: float = 989e12 * 0.5
    nvlink_bytes_s: float = 450e9
    internode_bytes_s: float = 50e9


QWEN3_30B_A3B = ExpertShape(hidden=2048, intermediate=768)
DEEPSEEK_V3 = ExpertShape(hidden=7168, intermediate=2048)
H100 = Hardware()
PRESETS = {"qwen3_30b_a3b": QWEN3_30B_A3B, "deepseek_v3": DEEPSEEK_V3}


@dataclass(slots=True)
class Movement:
    """Bytes one layer's plan moves for one micro-batch, per rank."""

    intra_bytes_R: np.ndarray
    """[R] weight copies received plus replica gradients sent over NVLink."""
    inter_bytes_R: np.ndarray
    """[R] the same over the inter-node link."""
    weight_bytes: int
    """Expert weights copied into new slots (both links)."""
    grad_bytes: int
    """Replica gradients reduced back towards their expert's home (both links)."""

    @property
    def total(self) -> int:
        return self.weight_bytes + self.grad_bytes


def movement(prev: Plan | None, cur: Plan, nxt: Plan | None, topo: Topology, expert: ExpertShape) -> Movement:
    """Weights copied into `cur`'s slots that `prev` did not hold (from the same node when it had a
    copy there, else from another node), and gradients of `cur`'s non-home copies that `nxt` does not
    keep (a replica that stays accumulates locally and is reduced when it ends; `nxt=None` = step
    end). With `prev=None` (nothing resident yet) every non-home copy is fetched from its home."""
    G, S, R = topo.ranks_per_node, topo.slots_per_rank, topo.num_ranks
    intra = np.zeros(R)
    inter = np.zeros(R)
    used = np.flatnonzero(cur.phys_to_log >= 0)
    experts = cur.phys_to_log[used]
    node = used // S // G
    if prev is None:
        new = used != cur.home[experts]
        source_node = cur.home[experts] // S // G
        same = source_node == node
    else:
        new = prev.phys_to_log[used] != experts
        held = np.zeros((topo.num_experts, topo.num_nodes), dtype=bool)
        prev_used = np.flatnonzero(prev.phys_to_log >= 0)
        held[prev.phys_to_log[prev_used], prev_used // S // G] = True
        same = held[experts, node]
    # Several new copies of one expert in one node cross the inter-node link once; the rest are
    # fanned out over NVLink.
    far = new & ~same
    far_first = far & _first_per_group(experts * topo.num_nodes + node, far)
    np.add.at(intra, used[new & ~far_first] // S, expert.weight_bytes)
    np.add.at(inter, used[far_first] // S, expert.weight_bytes)
    weight_bytes = int(new.sum()) * expert.weight_bytes
    replica = used != cur.home[experts]
    ends = replica if nxt is None else replica & (nxt.phys_to_log[used] != experts)
    # An ending replica hands its gradient to a copy of the expert that the next plan keeps in the
    # same node (NVLink), else to the home (NVLink or the inter-node link).
    near = (cur.home[experts] // S // G) == node
    if nxt is not None:
        kept = np.zeros((topo.num_experts, topo.num_nodes), dtype=bool)
        nxt_used = np.flatnonzero(nxt.phys_to_log >= 0)
        kept[nxt.phys_to_log[nxt_used], nxt_used // S // G] = True
        near |= kept[experts, node]
    # Replicas of one expert ending in one foreign node are summed over NVLink first, then sent once.
    far = ends & ~near
    far_first = far & _first_per_group(experts * topo.num_nodes + node, far)
    np.add.at(intra, used[ends & ~far_first] // S, expert.weight_bytes)
    np.add.at(inter, used[far_first] // S, expert.weight_bytes)
    return Movement(intra_bytes_R=intra, inter_bytes_R=inter, weight_bytes=weight_bytes,
                    grad_bytes=int(ends.sum()) * expert.weight_bytes)


def _first_per_group(key: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Boolean [len(key)]: True at the first masked position of each key value."""
    first = np.zeros(len(key), dtype=bool)
    idx = np.flatnonzero(mask)
    _, pos = np.unique(key[idx], return_index=True)
    first[idx[pos]] = True
    return first


def layer_time(rank_load_R: np.ndarray, move: Movement | None, topo: Topology, expert: ExpertShape,
               hw: Hardware = H100) -> float:
    """Seconds for one layer and micro-batch, forward + backward (backward = 2x forward compute)."""
    load = np.asarray(rank_load_R, dtype=np.float64)
    compute_R = 3 * load * expert.flops_per_token / hw.flops
    R, G = topo.num_ranks, topo.ranks_per_node
    token_bytes = expert.hidden * expert.bytes_per_value
    per_slot_s = token_bytes * ((R - G) / R / hw.internode_bytes_s + G / R / hw.nvlink_bytes_s)
    a2a_R = 4 * load * per_slot_s  # dispatch + combine, forward and backward
    exposed = 0.0
    if move is not None:
        a2a_R = a2a_R + move.inter_bytes_R / hw.internode_bytes_s
        exposed = max(0.0, float(move.intra_bytes_R.max()) / hw.nvlink_bytes_s - float(compute_R.mean()))
    return float(compute_R.max() + a2a_R.max() + exposed)


def move_cost_tokens(topo: Topology, expert: ExpertShape, hw: Hardware = H100) -> float:
    """Token slots of expert work (compute + all-to-all) that take as long as one NVLink weight copy:
    below this, moving an expert to even out a rank costs more than it saves."""
    R, G = topo.num_ranks, topo.ranks_per_node
    token_bytes = expert.hidden * expert.bytes_per_value
    per_slot_s = (3 * expert.flops_per_token / hw.flops
                  + 4 * token_bytes * ((R - G) / R / hw.internode_bytes_s + G / R / hw.nvlink_bytes_s))
    return expert.weight_bytes / hw.nvlink_bytes_s / per_slot_s

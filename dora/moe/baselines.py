"""Baselines the balancer is measured against: no balancing and EPLB-style planning.

EPLB-style (after the policy DeepSeek's EPLB README describes; this is an independent
implementation): from one load vector per step it
1. adds replicas one at a time to the expert with the largest load per replica,
2. packs the copies onto ranks heaviest first into the lightest rank with a free slot,
3. hierarchically when the expert groups divide the nodes: groups are packed onto nodes first, then
   replicas are made and packed inside each node; globally otherwise.
Every copy of an expert then receives an even share of its tokens, whatever the micro-batch's real
counts are. The load vector is either a moving average of past steps (`EplbHistory`, what a
deployment without replay can know) or the step's own total (oracle step loads). The ideal is
every rank at the mean (the bench computes it from the counts alone).

Shape legend: E experts, R ranks, P physical slots, M micro-batches.
"""

from __future__ import annotations

import heapq

import numpy as np

from dora.moe.plan import Plan, Topology


def _replica_counts(load_E: np.ndarray, num_copies: int) -> np.ndarray:
    copies = np.ones(len(load_E), dtype=np.int64)
    heap = [(-float(w), e) for e, w in enumerate(load_E)]
    heapq.heapify(heap)
    for _ in range(num_copies - len(load_E)):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        heapq.heappush(heap, (-float(load_E[e]) / copies[e], e))
    return copies


def _pack(weights: list[tuple[float, int]], ranks: list[int], S: int, phys_to_log: np.ndarray) -> None:
    """Balanced packing: items (weight, expert), heaviest first, into the lightest non-full rank."""
    heap = [(0.0, r) for r in ranks]
    used = dict.fromkeys(ranks, 0)
    for w, e in sorted(weights, key=lambda t: (-t[0], t[1])):
        load, r = heapq.heappop(heap)
        phys_to_log[r * S + used[r]] = e
        used[r] += 1
        if used[r] < S:
            heapq.heappush(heap, (load + w, r))


def eplb_placement(load_E: np.ndarray, topo: Topology, num_groups: int | None = None) -> np.ndarray:
    """Slot-to-expert map [P] from one load vector (hierarchical if `num_groups` divides by the nodes)."""
    load = np.asarray(load_E, dtype=np.float64)
    E, N, G, S = topo.num_experts, topo.num_nodes, topo.ranks_per_node, topo.slots_per_rank
    num_groups = num_groups or N
    phys_to_log = np.full(topo.num_slots, -1, dtype=np.int64)
    if E % num_groups == 0 and num_groups % N == 0 and E // N <= G * S:
        per_group = E // num_groups
        group_load = load.reshape(num_groups, per_group).sum(1)
        node_of_group = np.empty(num_groups, dtype=np.int64)
        heap = [(0.0, n) for n in range(N)]
        used = [0] * N
        for g in sorted(range(num_groups), key=lambda g: (-group_load[g], g)):
            node_load, n = heapq.heappop(heap)
            node_of_group[g] = n
            used[n] += 1
            if used[n] < num_groups // N:
                heapq.heappush(heap, (node_load + group_load[g], n))
        for n in range(N):
            experts = np.concatenate([np.arange(g * per_group, (g + 1) * per_group)
                                      for g in np.flatnonzero(node_of_group == n)])
            copies = _replica_counts(load[experts], G * S)
            items = [(load[e] / c, int(e)) for e, c in zip(experts, copies) for _ in range(c)]
            _pack(items, list(range(n * G, (n + 1) * G)), S, phys_to_log)
    else:
        copies = _replica_counts(load, topo.num_slots)
        items = [(load[e] / c, e) for e, c in enumerate(copies) for _ in range(c)]
        _pack(items, list(range(topo.num_ranks)), S, phys_to_log)
    return phys_to_log


def even_split_plan(counts_E: np.ndarray, phys_to_log: np.ndarray, topo: Topology) -> Plan:
    """A micro-batch on a fixed placement, each expert's tokens split evenly over its copies."""
    counts = topo.check_counts(counts_E, "micro-batch counts")
    used = np.flatnonzero(phys_to_log >= 0)
    experts = phys_to_log[used]
    copies = np.bincount(experts, minlength=topo.num_experts)
    order = np.lexsort((used, experts))
    rank_in_expert = np.empty(len(used), dtype=np.int64)
    starts = np.searchsorted(experts[order], np.arange(topo.num_experts))
    rank_in_expert[order] = np.arange(len(used)) - starts[experts[order]]
    base, extra = np.divmod(counts[experts], copies[experts])
    quota = np.zeros(topo.num_slots, dtype=np.int64)
    quota[used] = base + (rank_in_expert < extra)
    home = used[order][starts]
    return Plan(phys_to_log=phys_to_log.copy(), quota=quota, home=home, slots_per_rank=topo.slots_per_rank)


class EplbHistory:
    """EPLB planned from an exponential moving average of past steps' loads (per layer)."""

    def __init__(self, topo: Topology, num_layers: int, *, decay: float = 0.5) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"eplb decay must be in [0, 1), got {decay}")
        self.topo = topo
        self.decay = decay
        self.avg_LE: np.ndarray | None = None
        self.num_layers = num_layers

    def placement(self, layer: int) -> np.ndarray:
        """Placement for the coming step (uniform loads before any history)."""
        if self.avg_LE is None:
            return eplb_placement(np.ones(self.topo.num_experts), self.topo)
        return eplb_placement(self.avg_LE[layer], self.topo)

    def observe(self, counts_MLE: np.ndarray) -> None:
        """Fold a finished step's loads into the average."""
        step = self.topo.check_counts(counts_MLE, "step counts").sum(0).astype(np.float64)
        self.avg_LE = step if self.avg_LE is None else self.decay * self.avg_LE + (1 - self.decay) * step

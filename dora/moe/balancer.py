"""dora's replay-guided expert balancer: nodes per step, replicas and token quotas per micro-batch.

With routing replay (DESIGN.md, "MoE, routing replay, balancing") the trainer knows, before a step
runs, how many token slots every expert receives in every micro-batch and layer. The balancer turns
those counts into `Plan`s (`dora.moe.plan`) at two levels:

1. **Per step, across nodes** (`place_nodes`, inter-batch). Every expert gets a node (and an owner
   rank in it, which keeps its optimizer state). A vector greedy places experts heaviest first on
   the node whose *peak over the step's micro-batches* grows least (loads as shares of each
   micro-batch's mean, so every micro-batch counts alike), then a few exchanges between the peak
   node and the lightest node of the peak micro-batch lower that peak further. Experts hot in the
   same micro-batches thus land on different nodes and every node stays near the mean in every
   micro-batch. An expert heavier than a rank fills whole ranks of its node, so node budgets count
   such experts as several slots. Moving an expert between nodes crosses the slow link: once a step.
2. **Per micro-batch, inside each node** (`plan_microbatch`, intra-batch). Each node's experts
   are packed onto its ranks so that every rank holds the node's mean load, give or take a token
   slot: `dora.moe.packing.pack_windows`, vectorised over all nodes, lays the node's experts on a
   line in an order that keeps every rank within its slots and cuts the line into G equal windows
   (McNaughton's rule), so an expert cut at a window edge becomes replicas with uneven token quotas
   on neighbouring ranks. Replicas and quotas are thus planned together with the placement; an even
   split over a fixed placement is what EPLB does. A node whose slots the windows would overflow
   (too many experts for the cuts a perfect balance needs) is packed by `LptPack` instead: longest
   processing time first with splitting, a repair pass and water-filled quotas, preferring the rank
   an expert held in the previous micro-batch (`sticky`, `move_cost_tokens`). Either way a copy
   that stays on a rank keeps its slot, and a plan that does not pay for its weight copies gives
   way to the previous layout. Copies move over NVLink, and the cost model charges what compute
   does not hide.
   `cross_node=True` first hands the excess of nodes above the global mean to replicas in nodes
   below it, preferring experts that already have a copy there (weights cross the inter-node link,
   priced by the cost model).

Per-expert work is numpy; loops in Python run over the experts of a step's placement, over nodes
when they shed load, and inside `LptPack` for the few nodes it packs. Deterministic: ties break
on the lowest index.

Shape legend: M micro-batches of a step, E experts, R ranks, G ranks per node, N nodes, P slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dora.moe.packing import LptPack, index_in_run, pack_windows, whole_pieces
from dora.moe.plan import Plan, Topology


@dataclass(slots=True)
class BalancerConfig:
    cross_node: bool = True
    """Move the excess of a node more than `min_shed` above the mean to replicas in other nodes
    (inter-node copies); False keeps every copy in its expert's node."""
    sweeps: int = 2
    """Water-filling passes over the replicated experts' quotas in nodes packed by `LptPack`."""
    min_shed: float = 0.05
    """With `cross_node`, a node's excess is shed only when above this fraction of the mean node load:
    smaller excesses cost more in inter-node copies than they save (see the bench's cost model)."""
    sticky: float = 0.01
    """In nodes packed by `LptPack`: keep an expert on the rank it held in the previous micro-batch
    when that rank is within this fraction of the node's mean rank load of the lightest choice (0 =
    always the lightest)."""
    move_cost_tokens: float = 0.0
    """What one weight copy costs, in token slots of expert work (`cost_model.move_cost_tokens`): the
    previous layout is kept when the fresh plan's lower peak does not pay for the copies its busiest
    rank receives, and `LptPack`'s stickiness tolerance is at least this."""

    def __post_init__(self) -> None:
        if not isinstance(self.cross_node, bool):
            raise TypeError(f"balancer.cross_node must be a bool, got {self.cross_node!r}")
        if self.min_shed < 0:
            raise ValueError(f"balancer.min_shed must be >= 0, got {self.min_shed}")
        if self.move_cost_tokens < 0:
            raise ValueError(f"balancer.move_cost_tokens must be >= 0, got {self.move_cost_tokens}")
        if self.sticky < 0:
            raise ValueError(f"balancer.sticky must be >= 0, got {self.sticky}")
        if self.sweeps < 0:
            raise ValueError(f"balancer.sweeps must be >= 0, got {self.sweeps}")


@dataclass(slots=True)
class StepPlacement:
    """One layer's inter-batch decision for a step."""

    node: np.ndarray
    """[E] int64 node of every expert."""
    owner: np.ndarray
    """[E] int64 rank that owns each expert (optimizer state; gradients are reduced to it)."""


def place_nodes(counts_ME: np.ndarray, topo: Topology, *, swaps: int = 16) -> StepPlacement:
    """Nodes and owner ranks of one layer's experts for a step, from the step's counts [M, E].

    A vector greedy (heaviest first, onto the node whose peak over micro-batches grows least) and
    then up to `swaps` improving exchanges between the peak node and the lightest node of the peak
    micro-batch. Deterministic: ties go to the lowest index.
    """
    counts = topo.check_counts(counts_ME, "step counts")
    if counts.ndim != 2:
        raise ValueError(f"step counts must be [micro-batches, experts], got shape {list(counts.shape)}")
    if counts.shape[0] == 0:
        raise ValueError("step counts must hold at least one micro-batch")
    E, G, N, S = topo.num_experts, topo.ranks_per_node, topo.num_nodes, topo.slots_per_rank
    w_ME = counts.astype(np.float64)
    # Slot demand of an expert inside its node: an expert heavier than a rank's mean load fills
    # whole ranks alone (S slots each) plus one more piece; splits at rank boundaries take up to
    # G - 1 more slots per node. Node budgets in slots keep every micro-batch's packing feasible.
    rank_mean_M1 = np.maximum(w_ME.sum(1, keepdims=True) / topo.num_ranks, 1e-9)
    demand_E = (S * np.floor((w_ME / rank_mean_M1).max(0, initial=0)) + 1).astype(np.int64)
    slot_room_N = np.full(N, G * S - G // 2, dtype=np.int64)
    item_room_N = topo.homes_per_rank_E.reshape(N, G).sum(1) + (G * S - topo.homes_per_rank_E.reshape(N, G).sum(1)) // 2
    # Loads as shares of each micro-batch's mean node load, so every micro-batch counts alike.
    share_EM = np.ascontiguousarray((w_ME * (N / np.maximum(w_ME.sum(1, keepdims=True), 1e-9))).T)
    order = np.lexsort((np.arange(E), -share_EM.max(1, initial=0), -share_EM.sum(1)))
    node_of = [0] * E
    load_NM = np.zeros((N, w_ME.shape[0]))
    penalty_N = np.zeros(N)  # +inf where a node has no item room left
    full = False  # any node without item room (penalty_N all zero until then)
    demand, slot_room, item_room = demand_E.tolist(), slot_room_N.tolist(), item_room_N.tolist()
    for expert in order.tolist():
        share_M = share_EM[expert]
        peak_N = (load_NM + share_M).max(1)
        if full:
            peak_N += penalty_N
        need = demand[expert]
        if need > 1:  # a heavy expert avoids nodes without slot room, if any has room
            fits = np.asarray(slot_room) >= need
            if fits[penalty_N == 0].any():
                peak_N[~fits] = np.inf
        node = int(peak_N.argmin())
        node_of[expert] = node
        load_NM[node] += share_M
        slot_room[node] -= need
        item_room[node] -= 1
        if item_room[node] == 0:
            penalty_N[node] = np.inf
            full = True
    node_of = np.asarray(node_of, dtype=np.int64)
    _swap_nodes(np.ascontiguousarray(share_EM.T), node_of, load_NM, demand_E, swaps)
    return StepPlacement(node=node_of, owner=_owners(node_of, topo))


def _swap_nodes(share_ME: np.ndarray, node_of: np.ndarray, load_NM: np.ndarray, demand_E: np.ndarray,
                max_swaps: int) -> None:
    """Local search in place: exchange one expert of the node holding the peak (node, micro-batch)
    load with one of the lightest node in that micro-batch, the exchange that lowers the larger of
    the two nodes' peaks most, while that lowers the overall peak. Only experts of equal slot demand
    are exchanged, so node slot budgets hold."""
    N, M = load_NM.shape
    if N < 2:
        return
    for _ in range(max_swaps):
        hi, m_star = divmod(int(load_NM.argmax()), M)
        lo = int(load_NM[:, m_star].argmin())
        A, B = np.flatnonzero(node_of == hi), np.flatnonzero(node_of == lo)
        if not len(A) or not len(B):
            return
        # peak_AB[a, b]: the larger of the two nodes' peaks after exchanging A[a] and B[b]. A loop
        # over micro-batches of [A, B] maxima (numpy reduces short axes slowly).
        share_A, share_B = share_ME[:, A], share_ME[:, B]
        load_hi, load_lo = load_NM[hi].tolist(), load_NM[lo].tolist()
        peak_AB = h_AB = None
        for m in range(M):
            out_AB = np.subtract.outer(share_A[m], share_B[m])  # load leaving `hi`
            h_AB = np.subtract(load_hi[m], out_AB, out=h_AB)
            out_AB += load_lo[m]
            if peak_AB is None:
                peak_AB = np.maximum(h_AB, out_AB)
            else:
                np.maximum(peak_AB, h_AB, out=peak_AB)
                np.maximum(peak_AB, out_AB, out=peak_AB)
        peak_AB[demand_E[A][:, None] != demand_E[B][None, :]] = np.inf
        a, b = divmod(int(peak_AB.argmin()), len(B))
        peaks_N = load_NM.max(1)
        peaks_N[[hi, lo]] = -np.inf
        others = peaks_N.max()
        if max(peak_AB[a, b], others) >= load_NM[hi, m_star] - 1e-12:
            return
        ea, eb = A[a], B[b]
        delta = share_ME[:, eb] - share_ME[:, ea]
        load_NM[hi] += delta
        load_NM[lo] -= delta
        node_of[ea], node_of[eb] = lo, hi


def _owners(node_of: np.ndarray, topo: Topology) -> np.ndarray:
    """Deal each node's experts (in id order) round-robin to its ranks. Owning holds optimizer state
    only, no slot, so a node with more experts than home slots is fine."""
    E, G = topo.num_experts, topo.ranks_per_node
    by_node = np.lexsort((np.arange(E), node_of))
    starts = np.searchsorted(node_of[by_node], np.arange(topo.num_nodes))
    index_in_node = np.empty(E, dtype=np.int64)
    index_in_node[by_node] = np.arange(E) - starts[node_of[by_node]]
    return node_of * G + index_in_node % G


def contiguous_placement(topo: Topology) -> StepPlacement:
    """Experts dealt to ranks in id order, no balancing (the baseline placement)."""
    owner = np.repeat(np.arange(topo.num_ranks), topo.homes_per_rank_E)
    return StepPlacement(node=owner // topo.ranks_per_node, owner=owner)


def contiguous_plan(counts_E: np.ndarray, topo: Topology) -> Plan:
    """No balancing: every expert once, on its contiguous rank, with all its tokens."""
    counts = topo.check_counts(counts_E, "micro-batch counts")
    owner = contiguous_placement(topo).owner
    starts = np.concatenate(([0], np.cumsum(topo.homes_per_rank_E)[:-1]))
    home = owner * topo.slots_per_rank + np.arange(topo.num_experts) - starts[owner]
    phys_to_log = np.full(topo.num_slots, -1, dtype=np.int64)
    phys_to_log[home] = np.arange(topo.num_experts)
    quota = np.zeros(topo.num_slots, dtype=np.int64)
    quota[home] = counts
    return Plan(phys_to_log=phys_to_log, quota=quota, home=home, slots_per_rank=topo.slots_per_rank)


def plan_microbatch(counts_E: np.ndarray, placement: StepPlacement, topo: Topology, *,
                    config: BalancerConfig | None = None, prev: Plan | None = None) -> Plan:
    """Replicas and token quotas of one layer for one micro-batch, inside the step's nodes.

    `prev` (the layer's previous plan) keeps copies in place: a piece on a rank that held its
    expert keeps that slot, and nodes packed by `LptPack` prefer the ranks experts held.
    """
    config = config or BalancerConfig()
    counts = topo.check_counts(counts_E, "micro-batch counts")
    if counts.ndim != 1:
        raise ValueError(f"micro-batch counts must be [experts], got shape {list(counts.shape)}")
    E, S, N = topo.num_experts, topo.slots_per_rank, topo.num_nodes
    node_of = placement.node
    if node_of.shape != (E,) or node_of.min() < 0 or node_of.max() >= N:
        raise ValueError(f"placement.node must give each of {E} experts a node in [0, {N})")
    # Items k: an expert's token slots inside one node (each expert in its node, plus shed pieces).
    node_k, expert_k, amount_k = node_of, np.arange(E), counts
    if config.cross_node and N > 1:
        total = int(counts.sum())
        if np.bincount(node_of, weights=counts, minlength=N).max() - total / N > config.min_shed * total / N:
            node_k, expert_k, amount_k = _shed_across_nodes(node_of, counts, topo, prev, config.min_shed)
    rank_q, expert_q, amount_q, fits_N = pack_windows(node_k, expert_k, amount_k, topo)
    if not fits_N.all():
        rank_q, expert_q, amount_q = _pack_lpt(rank_q, expert_q, amount_q, fits_N, node_k, expert_k, amount_k,
                                               topo, config, prev)
    slot_q = _slots(rank_q, expert_q, prev, topo)
    phys_to_log = np.full(topo.num_slots, -1, dtype=np.int64)
    phys_to_log[slot_q] = expert_q
    quota = np.zeros(topo.num_slots, dtype=np.int64)
    quota[slot_q] = amount_q
    fresh = Plan(phys_to_log=phys_to_log, quota=quota, home=_homes(phys_to_log, quota, placement.owner, topo),
                 slots_per_rank=S)
    if prev is None or config.move_cost_tokens <= 0:
        return fresh
    # Keeping the previous layout (no weight moves, each copy keeps its share of its expert) wins
    # when the fresh plan's lower peak does not pay for the copies its busiest receiver must take.
    kept_quota = _rescale(prev, counts)
    new_copies = np.bincount(np.flatnonzero((phys_to_log >= 0) & (phys_to_log != prev.phys_to_log)) // S,
                             minlength=topo.num_ranks)
    penalty = config.move_cost_tokens * float(new_copies.max(initial=0))
    if kept_quota.reshape(-1, S).sum(1).max() > fresh.rank_load().max() + penalty:
        return fresh
    return Plan(phys_to_log=prev.phys_to_log.copy(), quota=kept_quota, home=prev.home.copy(), slots_per_rank=S)


def _pack_lpt(rank_q: np.ndarray, expert_q: np.ndarray, amount_q: np.ndarray, fits_N: np.ndarray,
              node_k: np.ndarray, expert_k: np.ndarray, amount_k: np.ndarray, topo: Topology,
              config: BalancerConfig, prev: Plan | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The window pieces of the nodes that fit, and `LptPack`'s (rounded to whole token slots) for
    the others."""
    G, S = topo.ranks_per_node, topo.slots_per_rank
    keep = fits_N[rank_q // G]
    # The other nodes' items, per node heaviest first (ties by expert).
    mine = np.flatnonzero(~fits_N[node_k])
    mine = mine[np.lexsort((expert_k[mine], -amount_k[mine], node_k[mine]))]
    prefer = np.full(len(mine), G)
    if prev is not None:  # the local rank of the expert's previous home, G when outside its node
        local = prev.home[expert_k[mine]] // S - node_k[mine] * G
        prefer = np.where((local >= 0) & (local < G), local, G)
    items = list(zip(amount_k[mine].astype(np.float64).tolist(), expert_k[mine].tolist(), prefer.tolist()))
    bounds = np.searchsorted(node_k[mine], np.flatnonzero(~fits_N), side="right").tolist()
    ranks: list[int] = []
    item_of: list[int] = []
    amounts: list[float] = []
    start = 0
    for n, end in zip(np.flatnonzero(~fits_N).tolist(), bounds):
        pack = LptPack(items[start:end], n * G, G, S)
        pack.fill(max(config.sticky * pack.level, config.move_cost_tokens))
        pack.repair()
        pack.level_replicas(config.sweeps)
        first = len(item_of)
        pack.pieces(ranks, item_of, amounts)
        item_of[first:] = [start + i for i in item_of[first:]]
        start = end
    lpt_experts = expert_k[mine][np.asarray(item_of, dtype=np.int64)]
    total_E = np.bincount(expert_k[mine], weights=amount_k[mine], minlength=topo.num_experts).astype(np.int64)
    lpt_amounts = whole_pieces(lpt_experts, np.asarray(amounts), total_E)
    return (np.concatenate((rank_q[keep], np.asarray(ranks, dtype=np.int64))),
            np.concatenate((expert_q[keep], lpt_experts)), np.concatenate((amount_q[keep], lpt_amounts)))


def _slots(rank_q: np.ndarray, expert_q: np.ndarray, prev: Plan | None, topo: Topology) -> np.ndarray:
    """Physical slot of every piece: the slot that held its expert on its rank in `prev` if there is
    one (no weight copy), else the rank's free slots in order."""
    S = topo.slots_per_rank
    slot_q = np.full(len(rank_q), -1, dtype=np.int64)
    if prev is not None:
        held_QS = prev.phys_to_log.reshape(-1, S)[rank_q] == expert_q[:, None]
        kept = held_QS.any(1)
        slot_q[kept] = rank_q[kept] * S + held_QS[kept].argmax(1)
    rest = np.flatnonzero(slot_q < 0)
    if len(rest):
        free = np.ones(topo.num_slots, dtype=bool)
        free[slot_q[slot_q >= 0]] = False
        free_slots = np.flatnonzero(free)
        rest = rest[np.argsort(rank_q[rest], kind="stable")]
        rank_r = rank_q[rest]
        slot_q[rest] = free_slots[np.searchsorted(free_slots, rank_r * S) + index_in_run(rank_r)]
    return slot_q


def _rescale(prev: Plan, counts: np.ndarray) -> np.ndarray:
    """Quotas [P] for `prev`'s layout with each copy keeping its share of its expert's tokens, for
    new counts (an expert that had no tokens splits evenly); the home takes the rounding remainder."""
    used = np.flatnonzero(prev.phys_to_log >= 0)
    experts = prev.phys_to_log[used]
    E = len(prev.home)
    old_E = np.bincount(experts, weights=prev.quota[used], minlength=E)
    copies_E = np.bincount(experts, minlength=E)
    share = np.where(old_E[experts] > 0, prev.quota[used] / np.maximum(old_E[experts], 1), 1.0 / copies_E[experts])
    quota = np.zeros_like(prev.quota)
    quota[used] = np.floor(share * counts[experts]).astype(np.int64)
    quota[prev.home] += counts - np.bincount(experts, weights=quota[used], minlength=E).astype(np.int64)
    return quota


def _shed_across_nodes(node_of: np.ndarray, counts: np.ndarray, topo: Topology, prev: Plan | None,
                       min_excess: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hand the excess of nodes above the global mean to nodes below it: a piece of an overloaded
    node's expert becomes an item (one replica) of the receiving node. An expert that already had a
    copy in an underloaded node in the previous micro-batch goes first, to that node (the copy is
    already there: no inter-node transfer); otherwise the heaviest expert goes to the lightest node.
    Excess below `min_excess` of the mean node load is left alone (a transfer would cost more).
    Returns the items as (node, expert, token slots) arrays."""
    G, S, N = topo.ranks_per_node, topo.slots_per_rank, topo.num_nodes
    prev_nodes: dict[int, set[int]] = {}  # expert -> the other nodes where `prev` had a copy of it
    if prev is not None:
        used = np.flatnonzero(prev.phys_to_log >= 0)
        for slot, expert in zip(used.tolist(), prev.phys_to_log[used].tolist()):
            if slot // S // G != node_of[expert]:
                prev_nodes.setdefault(expert, set()).add(slot // S // G)
    items_by_node: list[list[list[int]]] = [[] for _ in range(N)]
    for expert, (node, count) in enumerate(zip(node_of.tolist(), counts.tolist())):
        items_by_node[node].append([count, expert])
    total = int(counts.sum())
    target = -(-total // N)
    load = [sum(item[0] for item in items) for items in items_by_node]
    for src in sorted(range(N), key=lambda n: (-load[n], n)):
        items = items_by_node[src]
        while load[src] - target > min_excess * target:
            under = [n for n in range(N) if load[n] < target and len(items_by_node[n]) < G * S - 1]
            if not under:
                break
            resident = [(items[i][0], -items[i][1], i, n) for i in range(len(items)) if items[i][0] > 0
                        for n in sorted(prev_nodes.get(items[i][1], ())) if n in under]
            if resident:
                _, _, heaviest, dst = max(resident)
            else:
                heaviest = max(range(len(items)), key=lambda i: (items[i][0], -items[i][1]))
                dst = min(under, key=lambda n: (load[n], n))
            take = min(load[src] - target, target - load[dst], items[heaviest][0])
            if take <= 0:
                break
            expert = items[heaviest][1]
            items[heaviest][0] -= take
            same = [item for item in items_by_node[dst] if item[1] == expert]
            if same:
                same[0][0] += take
            else:
                items_by_node[dst].append([take, expert])
            load[src] -= take
            load[dst] += take
    node_k = np.repeat(np.arange(N), [len(items) for items in items_by_node])
    amount_k, expert_k = np.array([item for items in items_by_node for item in items], dtype=np.int64).T
    return node_k, expert_k, amount_k


def _homes(phys_to_log: np.ndarray, quota: np.ndarray, owner: np.ndarray, topo: Topology) -> np.ndarray:
    """Per expert, its copy on the owner rank if there is one, else its largest copy (lowest slot on ties)."""
    E, S = topo.num_experts, topo.slots_per_rank
    used = np.flatnonzero(phys_to_log >= 0)
    experts = phys_to_log[used]
    # Sort key: expert, then owner copies first, then larger quota, then slot (the sort is stable).
    score = ((used // S) == owner[experts]) * (int(quota.max(initial=0)) + 1) + quota[used]
    order = np.lexsort((-score, experts))
    first = np.searchsorted(experts[order], np.arange(E))
    return used[order][first]


class Balancer:
    """Plans a step for every layer: nodes from the step's counts, then one plan per micro-batch."""

    def __init__(self, topo: Topology, config: BalancerConfig | None = None) -> None:
        self.topo = topo
        self.config = config or BalancerConfig()

    def plan_layer_step(self, counts_ME: np.ndarray) -> tuple[StepPlacement, list[Plan]]:
        """One layer's step: counts [M, E] -> (placement, M plans)."""
        placement = place_nodes(counts_ME, self.topo)
        plans: list[Plan] = []
        for c in counts_ME:
            plans.append(plan_microbatch(c, placement, self.topo, config=self.config, prev=plans[-1] if plans else None))
        return placement, plans

    def plan_step(self, counts_MLE: np.ndarray) -> list[tuple[StepPlacement, list[Plan]]]:
        """counts [M, L, E] -> per layer, (placement, plans per micro-batch)."""
        counts = self.topo.check_counts(counts_MLE, "step counts")
        if counts.ndim != 3:
            raise ValueError(f"step counts must be [micro-batches, layers, experts], got shape {list(counts.shape)}")
        return [self.plan_layer_step(counts[:, layer]) for layer in range(counts.shape[1])]

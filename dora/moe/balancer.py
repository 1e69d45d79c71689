"""dora's replay-guided expert balancer: nodes per step, replicas and token quotas per micro-batch.

With routing replay (DESIGN.md, "MoE, routing replay, balancing") the trainer knows, before a step
runs, how many token slots every expert receives in every micro-batch and layer. The balancer turns
those counts into `Plan`s (`dora.moe.plan`) at two levels:

1. **Per step, across nodes** (`place_nodes`, inter-batch). Every expert is given a node (and an
   owner rank in it, which keeps its optimizer state and receives its gradients). Experts go
   heaviest first, in rounds of one expert per node; inside a round each expert takes the free node
   whose *peak over the step's micro-batches* grows least. Two experts hot in the same micro-batches
   therefore land on different nodes, and each node's load stays near the mean in every micro-batch.
   Moving an expert to another node crosses the slow link, so this happens once per step.
2. **Per micro-batch, inside each node** (`plan_microbatch`, intra-batch). The node's experts are
   packed onto its ranks with a wrap-around fill at the node's level (its mean load, rounded up):
   a rank takes the heaviest remaining expert, then light ones while they fit, and its last free
   slot takes a piece of the next heaviest expert that tops the rank up to exactly the level; the
   rest of that expert becomes a replica on the next rank. Hot experts thus get as many replicas
   as their load needs, each with its own (uneven) token quota, planned together with the
   placement. Copies move over NVLink, which the cost model shows is hidden behind compute.
   `cross_node=True` first hands the excess of nodes above the global mean to replicas in nodes
   below it (weights cross the inter-node link, priced by the cost model).

If a node's pieces do not fit its slots at the level (few spare slots), the level is raised; as a
last resort its experts are packed whole (longest-processing-time first), which always fits
because a node never owns more experts than slots.

Shape legend: M micro-batches of a step, E experts, R ranks, G ranks per node, P physical slots.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from dora.moe.plan import Plan, Topology


@dataclass(slots=True)
class BalancerConfig:
    cross_node: bool = False
    """Also move excess load of overloaded nodes to replicas in other nodes (inter-node copies)."""
    sweeps: int = 2
    """Water-filling passes over the replicated experts' quotas per micro-batch."""

    def __post_init__(self) -> None:
        if not isinstance(self.cross_node, bool):
            raise TypeError(f"balancer.cross_node must be a bool, got {self.cross_node!r}")
        if self.sweeps < 0:
            raise ValueError(f"balancer.sweeps must be >= 0, got {self.sweeps}")


@dataclass(slots=True)
class StepPlacement:
    """One layer's inter-batch decision for a step."""

    node: np.ndarray
    """[E] int64 node of every expert."""
    owner: np.ndarray
    """[E] int64 rank that owns each expert (optimizer state; gradients are reduced to it)."""


def place_nodes(counts_ME: np.ndarray, topo: Topology) -> StepPlacement:
    """Nodes and owner ranks of one layer's experts for a step, from the step's counts [M, E].

    Deterministic: ties go to the lowest index.
    """
    counts = topo.check_counts(counts_ME, "step counts")
    if counts.ndim != 2:
        raise ValueError(f"step counts must be [micro-batches, experts], got shape {list(counts.shape)}")
    E, G, N, S = topo.num_experts, topo.ranks_per_node, topo.num_nodes, topo.slots_per_rank
    w_ME = counts.astype(np.float64)
    # Slot demand of an expert inside its node: an expert heavier than a rank's mean load fills
    # whole ranks alone (S slots each) plus one more piece; splits at rank boundaries take up to
    # G - 1 more slots per node. Node budgets in slots keep every micro-batch's packing feasible.
    rank_mean_M1 = np.maximum(w_ME.sum(1, keepdims=True) / topo.num_ranks, 1e-9)
    demand_E = (S * np.floor((w_ME / rank_mean_M1).max(0, initial=0)) + 1).astype(np.int64)
    slot_room_N = np.full(N, G * S - (G - 1), dtype=np.int64)
    item_room_N = topo.homes_per_rank_E.reshape(N, G).sum(1) + (G * S - topo.homes_per_rank_E.reshape(N, G).sum(1)) // 2
    order = np.lexsort((np.arange(E), -w_ME.max(0, initial=0), -w_ME.sum(0)))
    node_of = np.empty(E, dtype=np.int64)
    load_MN = np.zeros((w_ME.shape[0], N))
    start = 0
    while start < E:
        open_nodes = np.flatnonzero((item_room_N > 0) & (slot_room_N > 0))
        if not len(open_nodes):  # demand overbooked every node: fill by item room alone
            open_nodes = np.flatnonzero(item_room_N > 0)
        batch = order[start:start + len(open_nodes)]
        # peak[i, j]: the node's peak over micro-batches if expert batch[i] joined open node j.
        peak = (load_MN[:, None, open_nodes] + w_ME[:, batch, None]).max(0)
        peak[demand_E[batch][:, None] > slot_room_N[open_nodes][None, :]] = np.inf
        peak_rows = peak.tolist()
        taken: set[int] = set()
        for i, expert in enumerate(batch.tolist()):
            choices = [(v, j) for j, v in enumerate(peak_rows[i]) if j not in taken]
            value, j = min(choices)
            if value == np.inf:  # fits nowhere by demand: the node with the most slot room left
                j = max((int(slot_room_N[open_nodes[j]]), -j) for _, j in choices)[1] * -1
            taken.add(j)
            node = int(open_nodes[j])
            node_of[expert] = node
            load_MN[:, node] += w_ME[:, expert]
            slot_room_N[node] -= demand_E[expert]
            item_room_N[node] -= 1
        start += len(batch)
    return StepPlacement(node=node_of, owner=_owners(node_of, topo))


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


def _replicate(items: list[list[int]], extra: int, max_copies: int) -> list[int]:
    """Replica counts per item: `extra` copies added one at a time to the item with the most load per
    copy (ties to the earlier item), at most `max_copies` (one per rank) each."""
    copies = [1] * len(items)
    heap = [(-load, i) for i, (load, _) in enumerate(items) if load > 0 and max_copies > 1]
    heapq.heapify(heap)
    for _ in range(extra):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        copies[i] += 1
        if copies[i] < max_copies:
            heapq.heappush(heap, (-(items[i][0] / copies[i]), i))
    return copies


def _pack_node(items: list[list[int]], ranks: range, S: int, phys_to_log: np.ndarray, quota: np.ndarray,
               sweeps: int) -> None:
    """Replicate, pack and level one node's (or the whole cluster's) items ([load, expert]) onto the
    ranks' slots. Needs len(items) <= len(ranks) * S."""
    copies = _replicate(items, len(ranks) * S - len(items), len(ranks))
    pieces = sorted(((load / c, i) for i, ((load, _), c) in enumerate(zip(items, copies)) for _ in range(c)),
                    key=lambda t: (-t[0], t[1]))
    rank_load = {r: 0.0 for r in ranks}
    used = {r: 0 for r in ranks}
    heap = [(0.0, r) for r in ranks]
    slots_of: list[list[int]] = [[] for _ in items]
    amount: dict[int, float] = {}
    for piece, i in pieces:  # longest piece first onto the lightest rank with a free slot
        skipped = []
        rank_l, rank = heapq.heappop(heap)
        # Two copies of one expert on one rank would be one copy: try the next lightest ranks.
        while heap and any(s // S == rank for s in slots_of[i]):
            skipped.append((rank_l, rank))
            rank_l, rank = heapq.heappop(heap)
        held = [s for s in slots_of[i] if s // S == rank]
        if held:  # every rank with a free slot already holds this item: grow that copy instead
            amount[held[0]] += piece
            rank_load[rank] += piece
            heapq.heappush(heap, (rank_load[rank], rank))
        else:
            slot = rank * S + used[rank]
            used[rank] += 1
            slots_of[i].append(slot)
            amount[slot] = piece
            rank_load[rank] += piece
            if used[rank] < S:
                heapq.heappush(heap, (rank_load[rank], rank))
        for entry in skipped:
            heapq.heappush(heap, entry)
    # Uneven quotas: each replicated item's tokens are water-filled over its copies' ranks (the
    # other items held fixed), heaviest first, for a few sweeps.
    multi = [i for i in range(len(items)) if len(slots_of[i]) > 1]
    for _ in range(sweeps if multi else 0):
        for i in multi:
            base = sorted((rank_load[s // S] - amount[s], s) for s in slots_of[i])
            total, acc, level = float(items[i][0]), 0.0, 0.0
            for j, (b, _) in enumerate(base):
                acc += b
                level = (total + acc) / (j + 1)
                if j + 1 == len(base) or level <= base[j + 1][0]:
                    break
            for b, s in base:
                amount[s] = max(0.0, level - b)
                rank_load[s // S] = b + amount[s]
    for i, (item_load, expert) in enumerate(items):
        slots = slots_of[i]
        whole = [int(amount[s]) for s in slots]
        whole[max(range(len(slots)), key=lambda j: amount[slots[j]])] += item_load - sum(whole)
        for s, q in zip(slots, whole):
            phys_to_log[s], quota[s] = expert, q


def plan_microbatch(counts_E: np.ndarray, placement: StepPlacement, topo: Topology, *,
                    config: BalancerConfig | None = None) -> Plan:
    """Replicas and token quotas of one layer for one micro-batch, inside the step's nodes (or
    across all of them with `cross_node`)."""
    config = config or BalancerConfig()
    counts = topo.check_counts(counts_E, "micro-batch counts")
    if counts.ndim != 1:
        raise ValueError(f"micro-batch counts must be [experts], got shape {list(counts.shape)}")
    G, S, N = topo.ranks_per_node, topo.slots_per_rank, topo.num_nodes
    node_of = placement.node
    if node_of.shape != (topo.num_experts,) or node_of.min() < 0 or node_of.max() >= N:
        raise ValueError(f"placement.node must give each of {topo.num_experts} experts a node in [0, {N})")
    # Per node, its items as [load, expert], heaviest first (ties by expert id).
    order = np.lexsort((np.arange(topo.num_experts), -counts, node_of))
    bounds = np.searchsorted(node_of[order], np.arange(N + 1))
    items_by_node = [[[int(counts[e]), int(e)] for e in order[bounds[n]:bounds[n + 1]]] for n in range(N)]
    if config.cross_node and N > 1:
        # One pool: replicas may land on any node (their weights cross the inter-node link).
        items_by_node = [sorted((it for items in items_by_node for it in items), key=lambda t: (-t[0], t[1]))]
        G = topo.num_ranks
    phys_to_log = np.full(topo.num_slots, -1, dtype=np.int64)
    quota = np.zeros(topo.num_slots, dtype=np.int64)
    for n, items in enumerate(items_by_node):
        if len(items) > G * S:
            raise ValueError(f"node {n} holds {len(items)} experts but has only {G * S} slots")
        _pack_node(items, range(n * G, (n + 1) * G), S, phys_to_log, quota, config.sweeps)
    return Plan(phys_to_log=phys_to_log, quota=quota, home=_homes(phys_to_log, quota, placement.owner, topo),
                slots_per_rank=S)


def _homes(phys_to_log: np.ndarray, quota: np.ndarray, owner: np.ndarray, topo: Topology) -> np.ndarray:
    """Per expert, its copy on the owner rank if there is one, else its largest copy (lowest slot on ties)."""
    E, S = topo.num_experts, topo.slots_per_rank
    used = np.flatnonzero(phys_to_log >= 0)
    experts = phys_to_log[used]
    on_owner = (used // S) == owner[experts]
    # Sort key: expert, then owner copies first, then larger quota, then slot.
    order = np.lexsort((used, -quota[used], ~on_owner, experts))
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
        return placement, [plan_microbatch(c, placement, self.topo, config=self.config) for c in counts_ME]

    def plan_step(self, counts_MLE: np.ndarray) -> list[tuple[StepPlacement, list[Plan]]]:
        """counts [M, L, E] -> per layer, (placement, plans per micro-batch)."""
        counts = self.topo.check_counts(counts_MLE, "step counts")
        if counts.ndim != 3:
            raise ValueError(f"step counts must be [micro-batches, layers, experts], got shape {list(counts.shape)}")
        return [self.plan_layer_step(counts[:, layer]) for layer in range(counts.shape[1])]

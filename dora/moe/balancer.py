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
2. **Per micro-batch, inside each node** (`plan_microbatch`, intra-batch). The node's experts are
   packed onto its ranks by longest-processing-time first with splitting: the heaviest remaining
   piece goes to the lightest rank; if it would lift that rank above the node's level (its mean,
   rounded up) and a slot is left for the rest, the rank takes exactly up to the level and the rest
   is queued as another replica. A repair pass then moves load off ranks still above the level into
   free slots (directly, or by swapping a small piece out of a full rank), and every replicated
   expert's tokens are water-filled over its copies' ranks. So replicas and their (uneven) token
   quotas are planned together with the placement; an even split over a fixed placement is what
   EPLB does. Experts prefer the rank they held in the previous micro-batch when that costs less
   than a weight copy (`sticky`, `move_cost_tokens`). Copies move over NVLink, and the cost model
   charges what compute does not hide.
   `cross_node=True` first hands the excess of nodes above the global mean to replicas in nodes
   below it, preferring experts that already have a copy there (weights cross the inter-node link,
   priced by the cost model).

Loops in Python run over ranks, nodes and the pieces of one node (a few dozen); per-expert work is
numpy. Deterministic: ties break on the lowest index.

Shape legend: M micro-batches of a step, E experts, R ranks, G ranks per node, N nodes, P slots.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from itertools import chain, compress
from operator import itemgetter

import numpy as np

from dora.moe.plan import Plan, Topology


@dataclass(slots=True)
class BalancerConfig:
    cross_node: bool = True
    """Move the excess of a node more than `min_shed` above the mean to replicas in other nodes
    (inter-node copies); False keeps every copy in its expert's node."""
    sweeps: int = 2
    """Water-filling passes over the replicated experts' quotas per micro-batch."""
    min_shed: float = 0.05
    """With `cross_node`, a node's excess is shed only when above this fraction of the mean node load:
    smaller excesses cost more in inter-node copies than they save (see the bench's cost model)."""
    sticky: float = 0.01
    """Keep an expert on the rank it held in the previous micro-batch when that rank is within this
    fraction of the node's mean rank load of the lightest choice (0 = always the lightest)."""
    move_cost_tokens: float = 0.0
    """What one weight copy costs, in token slots of expert work (`cost_model.move_cost_tokens`); the
    stickiness tolerance is at least this, so small micro-batches do not move experts for nothing."""

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


class _NodePack:
    """One node's packing for one micro-batch: pieces of its items (load, expert, preferred local
    rank or G) on its ranks' slots. Loads are float token slots until `_whole_quotas` rounds them.

    State lives in flat lists indexed by the node's local rank (0..G-1) and local slot (rank * S +
    k): this runs once per node, micro-batch and layer, so per-piece Python overhead is the cost."""

    __slots__ = ("G", "S", "amount", "avail", "item_at", "items", "level", "load", "r0", "slots_of", "used")

    def __init__(self, items: list[tuple[float, int, int]], r0: int, G: int, S: int) -> None:
        self.items, self.r0, self.G, self.S = items, r0, G, S
        self.level = -(-sum(item[0] for item in items) // G)
        self.load = [0.0] * G
        self.used = [0] * G
        # A rank's load while it has a free slot, inf once full; one more entry (inf) for "no rank".
        self.avail = [0.0] * G + [float("inf")]
        self.amount = [0.0] * (G * S)
        self.item_at = [-1] * (G * S)
        self.slots_of: list[list[int]] = [[] for _ in items]

    def _new_slot(self, rank: int, i: int, amount: float) -> int:
        slot = rank * self.S + self.used[rank]
        self.used[rank] += 1
        self.slots_of[i].append(slot)
        self.amount[slot] = amount
        self.item_at[slot] = i
        return slot

    def fill(self, tolerance: float) -> None:
        """LPT with splitting: the heaviest remaining piece goes to the lightest rank (not holding
        that expert yet); if it would lift the rank above the level and a slot stays free for the
        rest, the rank takes exactly up to the level and the rest is queued as another replica. A
        piece goes to its item's preferred rank (G = none) when that rank is within `tolerance`
        token slots of the lightest.

        Items arrive sorted; split-off rests wait in a heap and go before any lighter item. A fresh
        item has no copy yet, so its rank is simply the lightest with a free slot (`avail`)."""
        items, G, S, level = self.items, self.G, self.S, self.level
        load, used, amount, avail = self.load, self.used, self.amount, self.avail
        item_at, slots_of = self.item_at, self.slots_of
        inf = float("inf")
        # A split is allowed while a slot stays free for every item and rest still queued: `spare`
        # counts the slots beyond one per item that are still free after the pieces placed so far.
        spare = [G * S - len(items) - 1]
        rests: list[tuple[float, int]] = []  # (-load, item) of split-off rests
        for i, (x, _, p) in enumerate(items):
            if rests and -rests[0][0] > x:
                self._place_rests(rests, x, tolerance, spare)
            best = min(avail)
            rank = avail.index(best)
            if p != rank and avail[p] <= best + tolerance:  # avail[G] is inf: no preference
                rank, best = p, avail[p]
            room = level - best
            if x > room > 0 and spare[0] >= len(rests):
                heapq.heappush(rests, (room - x, i))
                x = room
            k = used[rank]
            assert k < S, "node packing ran out of slots"  # node budgets leave a slot per item
            slot = rank * S + k
            used[rank] = k + 1
            slots_of[i].append(slot)
            amount[slot] = x
            item_at[slot] = i
            load[rank] = best = best + x
            avail[rank] = best if k + 1 < S else inf
        if rests:
            self._place_rests(rests, -inf, tolerance, spare)

    def _place_rests(self, rests: list[tuple[float, int]], above: float, tolerance: float, spare: list[int]) -> None:
        """`fill` for the queued rests heavier than `above` (`spare` as in `fill`, updated). A rest
        avoids the ranks that already hold its item."""
        G, S, level, items = self.G, self.S, self.level, self.items
        load, used, amount, avail = self.load, self.used, self.amount, self.avail
        item_at, slots_of = self.item_at, self.slots_of
        inf = float("inf")
        while rests and -rests[0][0] > above:
            neg_x, i = heapq.heappop(rests)
            x = -neg_x
            mine = slots_of[i]
            holds = {s // S for s in mine}
            rank, best = -1, inf
            for r in range(G):
                if avail[r] < best and r not in holds:
                    rank, best = r, avail[r]
            p = items[i][2]
            if p != rank and p < G and used[p] < S and p not in holds and load[p] <= best + tolerance:
                rank, best = p, load[p]
            if rank < 0:  # every rank with a free slot already holds this item: grow its largest copy
                slot = max(mine, key=amount.__getitem__)
                rank = slot // S
                amount[slot] += x
            else:
                room = level - best
                if x > room > 0 and spare[0] > len(rests):
                    heapq.heappush(rests, (room - x, i))
                    x = room
                slot = rank * S + used[rank]
                used[rank] += 1
                mine.append(slot)
                amount[slot] = x
                item_at[slot] = i
                spare[0] -= 1
            load[rank] += x
            avail[rank] = load[rank] if used[rank] < S else inf

    def repair(self) -> None:
        """Take load off ranks still above the level: into a free slot of a lighter rank (a new copy
        of the loaded rank's largest piece), or, when only the loaded rank has free slots, by a swap:
        a light rank's smallest piece moves to the loaded rank and its slot takes the new copy."""
        G, S, level = self.G, self.S, self.level
        load, used, amount, slots_of, item_at = self.load, self.used, self.amount, self.slots_of, self.item_at
        for _ in range(G):
            peak = max(load)
            top = load.index(peak)  # the lowest rank on ties
            excess = peak - level
            if excess <= 0.5:
                return
            moved, top_full = False, used[top] >= S
            # The top rank's pieces, largest first (lowest slot on ties), with the ranks holding a copy
            # of their item: the first without a copy on `low` is the one to take from.
            candidates: list[tuple[int, set[int]]] | None = None
            for low in sorted((r for r in range(G) if load[r] < level), key=lambda r: (load[r], r)):
                if top_full and used[low] >= S:  # neither a new copy nor a swap has a slot
                    continue
                if candidates is None:
                    candidates = [(s, {t // S for t in slots_of[item_at[s]]})
                                  for s in sorted(range(top * S, top * S + used[top]), key=lambda s: (-amount[s], s))]
                src = next((s for s, ranks in candidates if low not in ranks), -1)
                if src < 0:
                    continue
                i, move = item_at[src], min(excess, level - load[low])
                if used[low] < S and amount[src] > 0:
                    move = min(move, amount[src])
                    self._new_slot(low, i, move)
                    amount[src] -= move
                elif used[top] < S:
                    swappable = [t for t in range(low * S, low * S + used[low])
                                 if item_at[t] != i and all(u // S != top for u in slots_of[item_at[t]])]
                    if not swappable:
                        continue
                    slot = min(swappable, key=lambda t: (amount[t], t))
                    j, small = item_at[slot], amount[slot]
                    if amount[src] < small + move:
                        continue
                    new = top * S + used[top]  # j's piece moves to top ...
                    used[top] += 1
                    slots_of[j][slots_of[j].index(slot)] = new
                    item_at[new], amount[new] = j, small
                    slots_of[i].append(slot)  # ... and its slot on `low` takes i's new copy
                    item_at[slot], amount[slot] = i, small + move
                    amount[src] -= small + move
                else:
                    continue
                load[top] -= move
                load[low] += move
                moved = True
                break
            if not moved:
                return

    def level_replicas(self, sweeps: int) -> None:
        """Water-fill each replicated item's tokens over its copies' ranks (the other items held
        fixed), heaviest first, for `sweeps` passes: the uneven quotas."""
        S, load, amount, items = self.S, self.load, self.amount, self.items
        multi = list(compress(zip(items, self.slots_of), map((1).__lt__, map(len, self.slots_of))))
        for _ in range(sweeps if multi else 0):
            for (total, _, _), slots in multi:
                if len(slots) == 2:  # the common case, unrolled: the same arithmetic as below
                    s0, s1 = slots
                    b0, b1 = load[s0 // S] - amount[s0], load[s1 // S] - amount[s1]
                    if b1 < b0 or (b1 == b0 and s1 < s0):
                        s0, s1, b0, b1 = s1, s0, b1, b0
                    fill = total + b0
                    if fill > b1:
                        fill = (total + (b0 + b1)) / 2
                    amount[s0] = a0 = max(0.0, fill - b0)
                    load[s0 // S] = b0 + a0
                    amount[s1] = a1 = max(0.0, fill - b1)
                    load[s1 // S] = b1 + a1
                    continue
                base = sorted((load[s // S] - amount[s], s) for s in slots)
                acc, fill = 0.0, 0.0
                for j, (b, _) in enumerate(base):
                    acc += b
                    fill = (total + acc) / (j + 1)
                    if j + 1 == len(base) or fill <= base[j + 1][0]:
                        break
                for b, s in base:
                    amount[s] = max(0.0, fill - b)
                    load[s // S] = b + amount[s]

    def pieces(self, local: list[int], amount_P: list[float], item_P: list[int]) -> int:
        """Append the node's used local slots item by item (each item's copies in the order they
        were made) to `local`, and every slot's token share and item (-1 = empty) to `amount_P` and
        `item_P`; returns the number of pieces."""
        before = len(local)
        local.extend(chain.from_iterable(self.slots_of))
        amount_P.extend(self.amount)
        item_P.extend(self.item_at)
        return len(local) - before


def _whole_quotas(slot_k: np.ndarray, expert_k: np.ndarray, amount_k: np.ndarray, counts: np.ndarray,
                  num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Pieces -> (phys_to_log [P], quota [P]) in whole tokens: every copy gets the floor of its share
    and each expert's largest copy the rest (the first listed on ties), so an expert's quotas sum
    exactly to its count."""
    whole_k = np.floor(amount_k + 1e-9).astype(np.int64)
    rest_E = counts - np.bincount(expert_k, weights=whole_k, minlength=len(counts)).astype(np.int64)
    order = np.lexsort((-amount_k, expert_k))
    largest = order[np.searchsorted(expert_k[order], np.arange(len(counts)))]
    whole_k[largest] += rest_E
    phys_to_log = np.full(num_slots, -1, dtype=np.int64)
    quota = np.zeros(num_slots, dtype=np.int64)
    phys_to_log[slot_k] = expert_k
    quota[slot_k] = whole_k
    return phys_to_log, quota


def plan_microbatch(counts_E: np.ndarray, placement: StepPlacement, topo: Topology, *,
                    config: BalancerConfig | None = None, prev: Plan | None = None) -> Plan:
    """Replicas and token quotas of one layer for one micro-batch, inside the step's nodes.

    `prev` (the layer's previous plan) makes the packing sticky: an expert stays on a rank it held
    when that costs at most `config.sticky` of the node's mean rank load, which saves weight copies.
    """
    config = config or BalancerConfig()
    counts = topo.check_counts(counts_E, "micro-batch counts")
    if counts.ndim != 1:
        raise ValueError(f"micro-batch counts must be [experts], got shape {list(counts.shape)}")
    G, S, N = topo.ranks_per_node, topo.slots_per_rank, topo.num_nodes
    node_of = placement.node
    if node_of.shape != (topo.num_experts,) or node_of.min() < 0 or node_of.max() >= N:
        raise ValueError(f"placement.node must give each of {topo.num_experts} experts a node in [0, {N})")
    # Per node, its items as (load, expert, preferred local rank), heaviest first (ties by expert
    # id). The preferred rank is the one of the expert's home copy in the previous micro-batch, G
    # when that is outside the node or there is none (sticky packing).
    # One stable sort on (node, -count) keeps ties in expert order (counts <= total < 2**62 / N).
    total = int(counts.sum())
    order = np.argsort(node_of * (total + 1) - counts, kind="stable")
    bounds = [0, *np.cumsum(np.bincount(node_of, minlength=N)).tolist()]
    order_list = order.tolist()
    if prev is None:
        prefer, pref_sorted = None, [G] * len(order_list)
    else:
        prefer = (prev.home // S).tolist()
        local_E = prev.home[order] // S - node_of[order] * G
        pref_sorted = np.where((local_E >= 0) & (local_E < G), local_E, G).tolist()
    sorted_items = list(zip(counts[order].astype(np.float64).tolist(), order_list, pref_sorted))
    items_by_node = [sorted_items[bounds[n]:bounds[n + 1]] for n in range(N)]
    node_load_N = np.bincount(node_of, weights=counts, minlength=N)
    if config.cross_node and N > 1 and node_load_N.max() - total / N > config.min_shed * total / N:
        prev_nodes: dict[int, set[int]] = {}
        if prev is not None:
            used = np.flatnonzero(prev.phys_to_log >= 0)
            for slot, expert in zip(used.tolist(), prev.phys_to_log[used].tolist()):
                if slot // S // G != node_of[expert]:
                    prev_nodes.setdefault(expert, set()).add(slot // S // G)
        shed = [[[int(load), expert] for load, expert, _ in items] for items in items_by_node]
        _shed_across_nodes(shed, total, topo, prev_nodes, config.min_shed)
        items_by_node = [[(float(load), expert, G if prefer is None or not 0 <= prefer[expert] - n * G < G
                           else prefer[expert] - n * G) for load, expert in items] for n, items in enumerate(shed)]
    local: list[int] = []
    amount_P: list[float] = []
    item_P: list[int] = []
    expert_of_item: list[int] = []
    pieces_N: list[int] = []
    item_base_N: list[int] = []
    for n, items in enumerate(items_by_node):
        pack = _NodePack(items, n * G, G, S)
        pack.fill(max(config.sticky * pack.level, config.move_cost_tokens))
        pack.repair()
        pack.level_replicas(config.sweeps)
        pieces_N.append(pack.pieces(local, amount_P, item_P))
        item_base_N.append(len(expert_of_item))
        expert_of_item.extend(map(itemgetter(1), items))
    # Pieces k in node order, item by item: global slot, expert and float share.
    slot_k = np.asarray(local, dtype=np.int64) + np.repeat(np.arange(N) * (G * S), pieces_N)
    item_of_slot_P = np.asarray(item_P, dtype=np.int64) + np.repeat(item_base_N, G * S)
    expert_k = np.asarray(expert_of_item, dtype=np.int64)[item_of_slot_P[slot_k]]
    phys_to_log, quota = _whole_quotas(slot_k, expert_k, np.asarray(amount_P)[slot_k], counts, topo.num_slots)
    fresh = Plan(phys_to_log=phys_to_log, quota=quota, home=_homes(phys_to_log, quota, placement.owner, topo),
                 slots_per_rank=S)
    if prev is None or config.move_cost_tokens <= 0:
        return fresh
    # Keeping the previous layout (no weight moves, each copy keeps its share of its expert) wins
    # when the fresh plan's lower peak does not pay for the copies its busiest receiver must take.
    kept = _rescale(prev, counts)
    new_copies = np.bincount(np.flatnonzero((phys_to_log >= 0) & (phys_to_log != prev.phys_to_log)) // S,
                             minlength=topo.num_ranks)
    penalty = config.move_cost_tokens * float(new_copies.max(initial=0))
    return kept if kept.rank_load().max() <= fresh.rank_load().max() + penalty else fresh


def _rescale(prev: Plan, counts: np.ndarray) -> Plan:
    """`prev`'s layout with each copy keeping its share of its expert's tokens, for new counts (an
    expert that had no tokens splits evenly); the home takes the rounding remainder."""
    used = np.flatnonzero(prev.phys_to_log >= 0)
    experts = prev.phys_to_log[used]
    E = len(prev.home)
    old_E = np.bincount(experts, weights=prev.quota[used], minlength=E)
    copies_E = np.bincount(experts, minlength=E)
    share = np.where(old_E[experts] > 0, prev.quota[used] / np.maximum(old_E[experts], 1), 1.0 / copies_E[experts])
    quota = np.zeros_like(prev.quota)
    quota[used] = np.floor(share * counts[experts]).astype(np.int64)
    quota[prev.home] += counts - np.bincount(experts, weights=quota[used], minlength=E).astype(np.int64)
    return Plan(phys_to_log=prev.phys_to_log.copy(), quota=quota, home=prev.home.copy(),
                slots_per_rank=prev.slots_per_rank)


def _shed_across_nodes(items_by_node: list[list[list[int]]], total: int, topo: Topology,
                       prev_nodes: dict[int, set[int]], min_excess: float) -> None:
    """Hand the excess of nodes above the global mean to nodes below it: a piece of an overloaded
    node's expert becomes an item (one replica) of the receiving node. An expert that already had a
    copy in an underloaded node in the previous micro-batch goes first, to that node (the copy is
    already there: no inter-node transfer); otherwise the heaviest expert goes to the lightest node.
    Excess below `min_excess` of the mean node load is left alone (a transfer would cost more)."""
    G, S, N = topo.ranks_per_node, topo.slots_per_rank, topo.num_nodes
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
    for items in items_by_node:
        items.sort(key=lambda item: (-item[0], item[1]))


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

"""Packing one micro-batch's items onto the slots of each node's ranks (the balancer's inner step).

An item is an expert's token slots inside one node (`dora.moe.balancer` picks the nodes). A node's
items go onto its G ranks of S slots each, every rank as close to the node's mean load as the
slots allow; an item may be cut into pieces on distinct ranks (replicas with uneven quotas).

`pack_windows`, vectorised over all nodes at once, is the packer that normally runs. McNaughton's
wrap-around rule: lay the node's items end to end on a line and cut it into G windows of equal
length (to the token slot); window j is rank j. Every rank then holds the mean, give or take a
token slot, and at most G - 1 items are cut. The slots suffice when the order on the line is right:
- the G heaviest units are "crossers", one heading each of G bins, and the other units ("inners")
  are dealt to the bins round by round, each round's heaviest to the bin with the lightest crosser,
  S - 2 per bin; a bin lays out its inners, then its crosser. Window j then holds the piece of a
  crosser carried in from the previous bin, the inners of bin j and the start of its crosser: at
  most S pieces, as long as the carry fits inside one crosser and is never negative;
- so the bins are ordered by their excess over the mean: bins above it (largest first), each at
  the running excess before it, merged with bins below it (largest deficit first), each at the
  running deficit through it. The carry never drops below zero and stays about one bin's excess;
- an item heavier than 1.1 x the mean rank load is cut into equal chunks below that first (each a
  unit), unless that makes more units than the node's slots take with G - 1 cuts; one inner more
  than S - 2 fits into the first bin on the line, which has no carry.
A node whose windows still overflow a rank's slots (mostly: more items than G * (S - 1) + 1, so a
perfect balance has no room for its cuts) is reported, and the balancer packs it with `LptPack`.

`LptPack` packs one node in plain Python: longest processing time first with splitting, a repair
pass and water-filling of the replicas' quotas. Slower, but it degrades gracefully when a node has
too few free slots for a perfect balance, and it prefers the rank an expert held before.

Shape legend: K items, U units (items, or their chunks), L the units in line order, B = N * G bins,
W = N * G windows (one per rank, plus the line's end), Q pieces, N nodes, G ranks per node, S slots
per rank, P slots.
"""

from __future__ import annotations

import heapq
from itertools import compress

import numpy as np

from dora.moe.plan import Topology


def index_in_run(group: np.ndarray) -> np.ndarray:
    """Position of each entry inside its run of equal values of the sorted `group`."""
    return np.arange(len(group)) - np.searchsorted(group, group)


def _cumsum_in_run(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Inclusive running sum of `values` inside each run of equal values of the sorted `group`."""
    total = np.cumsum(values)
    before = total - values
    return total - before[np.searchsorted(group, group)]


def pack_windows(node_k: np.ndarray, expert_k: np.ndarray, amount_k: np.ndarray,
                 topo: Topology) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of every node's items in McNaughton windows (see the module docstring).

    Items k are (node, expert, int64 token slots), one per (node, expert). Returns the pieces as
    (rank, expert, token slots) int64 arrays, and per node whether its pieces fit its ranks' slots;
    a node that does not fit has to be packed another way (drop its pieces). In a node that fits,
    every rank holds floor or ceil of the node's load / G, and one expert's pieces are on distinct
    ranks.
    """
    G, S, N, E = topo.ranks_per_node, topo.slots_per_rank, topo.num_nodes, topo.num_experts
    total_N = np.bincount(node_k, weights=amount_k, minlength=N).astype(np.int64)
    # Units: an item heavier than 1.1 x its node's mean rank load is cut into equal chunks below it,
    # unless the chunks would make more units than the node's slots take with G - 1 cuts.
    chunks_k = np.maximum(np.ceil(amount_k * (G / 1.1) / np.maximum(total_N[node_k], 1)), 1).astype(np.int64)
    chunks_k[(np.bincount(node_k, weights=chunks_k, minlength=N) > G * (S - 1) + 1)[node_k]] = 1
    chunked = bool(chunks_k.max() > 1)
    if chunked:
        item_u = np.repeat(np.arange(len(amount_k)), chunks_k)
        chunk_u = index_in_run(item_u)
        amount_u = amount_k[item_u] // chunks_k[item_u]
        amount_u += chunk_u < amount_k[item_u] - amount_u * chunks_k[item_u]
    else:
        item_u = chunk_u = np.arange(len(amount_k))
        amount_u = amount_k
    node_u = node_k[item_u]
    order = np.lexsort((chunk_u, expert_k[item_u], -amount_u, node_u))  # per node heaviest first
    item_u, amount_u, node_u = item_u[order], amount_u[order], node_u[order]
    index_u = index_in_run(node_u)
    crosser_u = index_u < G
    # Crosser i heads bin i; inners go round by round, each round's heaviest to the bin with the
    # lightest crosser. Beyond S - 2 per bin, they wait for the first bin on the line (no carry in).
    bin_u = node_u * G + np.where(crosser_u, index_u, G - 1 - (index_u - G) % G)
    late_u = index_u - G >= G * max(S - 2, 0)
    load_B = np.bincount(bin_u[~late_u], weights=amount_u[~late_u], minlength=N * G).astype(np.int64)
    # The line: bins above the mean (largest excess first), each where the running excess before it
    # is, merged with bins below it (largest deficit first), each where the running deficit through
    # it is. The carry from one window into the next then never goes below zero and stays about one
    # bin's excess. Excess and deficit are scaled by G to stay integers.
    dev_B = G * load_B - np.repeat(total_N, G)
    node_B, bins = np.arange(N * G) // G, np.arange(N * G)
    over_B = dev_B > 0
    by_size = np.lexsort((bins, np.where(over_B, -dev_B, dev_B), ~over_B, node_B))
    size = np.abs(dev_B[by_size])
    running = _cumsum_in_run(size, node_B[by_size] * 2 + ~over_B[by_size])
    key_B = np.empty(N * G, dtype=np.int64)
    key_B[by_size] = np.where(over_B[by_size], running - size, running)
    line_B = np.lexsort((bins, ~over_B, key_B, node_B))
    position_B = np.empty(N * G, dtype=np.int64)
    position_B[line_B] = bins
    if late_u.any():
        bin_u[late_u] = line_B[node_u[late_u] * G]
    # Lay the units out (each bin its inners, then its crosser) and cut every node's stretch of the
    # line at ceil(j * load / G): window j of node n is rank n * G + j.
    line = np.lexsort((-amount_u, crosser_u, position_B[bin_u]))
    amount_l, node_l = amount_u[line], node_u[line]
    end_l = np.cumsum(amount_l)
    start_l = end_l - amount_l
    node_start_N = np.cumsum(total_N) - total_N
    window_W = np.append((node_start_N[:, None] - (-np.arange(G) * total_N[:, None] // G)).ravel(), end_l[-1:])
    first_l = np.minimum(np.searchsorted(window_W, start_l, side="right") - 1, node_l * G + G - 1)
    last_l = np.maximum(np.searchsorted(window_W, end_l - 1, side="right") - 1, first_l)
    unit_q = np.repeat(np.arange(len(line)), last_l - first_l + 1)
    rank_q = first_l[unit_q] + index_in_run(unit_q)
    amount_q = (np.minimum(end_l[unit_q], window_W[rank_q + 1])
                - np.maximum(start_l[unit_q], window_W[rank_q]))
    expert_q = expert_k[item_u[line]][unit_q]
    if total_N.min() < G:  # a node with fewer token slots than ranks has empty windows
        keep = (amount_q > 0) | (amount_l[unit_q] == 0)
        rank_q, amount_q, expert_q = rank_q[keep], amount_q[keep], expert_q[keep]
    if chunked:  # chunks of one item in one window are one piece
        key_q = rank_q * E + expert_q
        order = np.argsort(key_q, kind="stable")
        key_q = key_q[order]
        first = np.flatnonzero(np.concatenate(([True], key_q[1:] != key_q[:-1])))
        amount_q = np.add.reduceat(amount_q[order], first)
        rank_q, expert_q = key_q[first] // E, key_q[first] % E
    fits_N = np.bincount(rank_q, minlength=topo.num_ranks).reshape(N, G).max(1) <= S
    return rank_q, expert_q, amount_q, fits_N


class LptPack:
    """One node's packing for one micro-batch: pieces of its items (load, expert, preferred local
    rank or G) on its ranks' slots. Loads are float token slots until `whole_pieces` rounds them.

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

    def pieces(self, ranks: list[int], items: list[int], amounts: list[float]) -> None:
        """Append the pieces (rank r0 + local rank, item, float token slots), item by item."""
        S, r0, amount = self.S, self.r0, self.amount
        for i, slots in enumerate(self.slots_of):
            for slot in slots:
                ranks.append(r0 + slot // S)
                items.append(i)
                amounts.append(amount[slot])


def whole_pieces(expert_q: np.ndarray, amount_q: np.ndarray, total_E: np.ndarray) -> np.ndarray:
    """Float token slots of pieces -> int64, each expert's pieces summing exactly to `total_E`: every
    piece gets the floor of its share and each expert's largest piece the rest (the first listed on
    ties)."""
    whole_q = np.floor(amount_q + 1e-9).astype(np.int64)
    order = np.lexsort((-amount_q, expert_q))
    sorted_experts = expert_q[order]
    largest = order[np.flatnonzero(np.concatenate(([True], sorted_experts[1:] != sorted_experts[:-1])))]
    floors_E = np.bincount(expert_q, weights=whole_q, minlength=len(total_E)).astype(np.int64)
    whole_q[largest] += total_E[expert_q[largest]] - floors_E[expert_q[largest]]
    return whole_q

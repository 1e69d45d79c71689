"""Expert-parallel topology and the plan every balancer produces for one layer and micro-batch.

A layer's E logical experts run on R ranks with S physical slots each (P = R * S slots, slot p on
rank p // S). A plan says which expert each slot holds (`phys_to_log`, -1 = empty) and how many of
the expert's token slots it takes (`quota`); the quotas of an expert's replicas sum to its count
in the micro-batch, so no token is lost or duplicated. `assign_tokens` turns quotas into the
token-to-replica assignment the expert-parallel layer dispatches with: the i-th token slot of
expert e (in global token order) goes to the replica whose quota range covers i.

The balancer (`dora.moe.balancer`), the baselines (`dora.moe.baselines`), the cost model and the
expert-parallel layer (`dora.moe.expert_parallel`) all speak this record.

Shape legend: E experts, R ranks, P = R * S physical slots, X max replicas of one expert,
N tokens, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True, frozen=True)
class Topology:
    num_experts: int
    num_ranks: int
    ranks_per_node: int
    slots_per_rank: int
    """Physical expert slots per rank: home experts plus spare slots for replicas."""

    def __post_init__(self) -> None:
        for key in ("num_experts", "num_ranks", "ranks_per_node", "slots_per_rank"):
            if not isinstance(getattr(self, key), (int, np.integer)) or getattr(self, key) < 1:
                raise ValueError(f"topology.{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if self.num_ranks % self.ranks_per_node:
            raise ValueError(f"topology.num_ranks ({self.num_ranks}) must be a multiple of "
                             f"ranks_per_node ({self.ranks_per_node})")
        if self.num_experts > self.num_slots:
            raise ValueError(f"more experts ({self.num_experts}) than physical slots "
                             f"({self.num_ranks} ranks x {self.slots_per_rank} slots = {self.num_slots})")

    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.slots_per_rank

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    @property
    def homes_per_rank_E(self) -> np.ndarray:
        """[R] home experts per rank when E experts are spread evenly (the first E % R ranks get one more)."""
        base, extra = divmod(self.num_experts, self.num_ranks)
        return base + (np.arange(self.num_ranks) < extra).astype(np.int64)

    def check_counts(self, counts: np.ndarray, name: str = "counts") -> np.ndarray:
        """Validated int64 copy of per-expert token-slot counts [..., E]."""
        arr = np.asarray(counts)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer token counts, got dtype {arr.dtype}")
        if arr.ndim < 1 or arr.shape[-1] != self.num_experts:
            raise ValueError(f"{name} must have shape [..., num_experts={self.num_experts}], got {list(arr.shape)}")
        if arr.size and arr.min() < 0:
            where = np.unravel_index(int(np.argmin(arr)), arr.shape)
            raise ValueError(f"{name} has a negative count {int(arr.min())} at index {tuple(int(i) for i in where)}")
        return arr.astype(np.int64, copy=False)


@dataclass(slots=True)
class Plan:
    """One layer's expert placement and token split for one micro-batch."""

    phys_to_log: np.ndarray
    """[P] int64 logical expert held by each physical slot, -1 if empty."""
    quota: np.ndarray
    """[P] int64 token slots each physical slot computes (0 for empty slots)."""
    home: np.ndarray
    """[E] int64 the physical slot of each expert's home copy (its owner for gradients); every other
    slot holding the expert is a replica whose gradient is reduced back to the home."""
    slots_per_rank: int

    @property
    def num_replicas(self) -> np.ndarray:
        """[E] physical copies of each expert (home included)."""
        used = self.phys_to_log >= 0
        return np.bincount(self.phys_to_log[used], minlength=len(self.home))

    @property
    def log_to_phys(self) -> np.ndarray:
        """[E, X] physical slots of each expert, home first then ascending, padded with -1."""
        E = len(self.home)
        counts = self.num_replicas
        out = np.full((E, max(int(counts.max(initial=1)), 1)), -1, dtype=np.int64)
        out[:, 0] = self.home
        replica = np.flatnonzero(self.phys_to_log >= 0)
        replica = replica[replica != self.home[self.phys_to_log[replica]]]
        experts = self.phys_to_log[replica]
        order = np.lexsort((replica, experts))
        experts, replica = experts[order], replica[order]
        starts = np.searchsorted(experts, np.arange(E))
        rank_in_expert = np.arange(len(experts)) - starts[experts]
        out[experts, 1 + rank_in_expert] = replica
        return out

    def rank_load(self) -> np.ndarray:
        """[R] token slots computed by each rank."""
        num_ranks = len(self.quota) // self.slots_per_rank
        return self.quota.reshape(num_ranks, self.slots_per_rank).sum(1)

    def expert_load(self) -> np.ndarray:
        """[E] token slots per expert summed over its copies (equals the micro-batch counts)."""
        used = self.phys_to_log >= 0
        return np.bincount(self.phys_to_log[used], weights=self.quota[used], minlength=len(self.home)).astype(np.int64)


def imbalance(rank_load_R: np.ndarray) -> float:
    """max / mean rank load (1.0 = perfectly balanced; 1.0 for an idle layer)."""
    mean = float(np.mean(rank_load_R))
    return float(np.max(rank_load_R)) / mean if mean > 0 else 1.0


def assign_tokens(plan: Plan, ids_NK: np.ndarray) -> np.ndarray:
    """Token-to-replica assignment -> phys [N, K] int64, the physical slot computing each (token, k).

    Token slots of expert e are taken in (token, k) order; the first `quota` of its home-first
    replica list go to the first copy, the next ones to the second, and so on. Raises if the
    quotas do not cover exactly the ids' counts (a plan made for another micro-batch).
    """
    ids = np.asarray(ids_NK, dtype=np.int64)
    E = len(plan.home)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [tokens, top_k], got shape {list(ids.shape)}")
    if ids.size and (ids.min() < 0 or ids.max() >= E):
        raise ValueError(f"ids must be in [0, {E}), found [{ids.min()}, {ids.max()}]")
    flat = ids.reshape(-1)
    counts = np.bincount(flat, minlength=E)
    if not np.array_equal(counts, plan.expert_load()):
        bad = int(np.flatnonzero(counts != plan.expert_load())[0])
        raise ValueError(f"plan quotas do not match the routing: expert {bad} has {counts[bad]} token slots, "
                         f"the plan covers {plan.expert_load()[bad]}")
    order = np.argsort(flat, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    index_in_expert = np.empty_like(flat)
    index_in_expert[order] = np.arange(len(flat)) - starts[flat[order]]
    return replica_of(plan, flat, index_in_expert).reshape(ids.shape)


def replica_of(plan: Plan, experts: np.ndarray, index_in_expert: np.ndarray) -> np.ndarray:
    """Physical slot of the `index_in_expert`-th token slot of each given expert (vectorised)."""
    l2p = plan.log_to_phys
    quota_EX = np.where(l2p >= 0, plan.quota[np.maximum(l2p, 0)], 0)
    bounds_EX = np.cumsum(quota_EX, axis=1)
    # Replica j covers [bounds[j-1], bounds[j]): count the bounds <= index.
    which = (bounds_EX[experts] <= index_in_expert[:, None]).sum(1)
    return l2p[experts, which]

"""Node packing: McNaughton windows balance every rank to the token slot within its slots, report
the nodes they cannot fit, and the balancer packs those with LptPack; copies keep their slots."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dora.moe.balancer import BalancerConfig, place_nodes, plan_microbatch
from dora.moe.packing import pack_windows
from dora.moe.plan import Topology


def check_windows(node_k, expert_k, amount_k, topo):
    """Pieces of the nodes that fit: loads within one token slot of the node's mean, slots
    respected, every item's pieces on distinct ranks of its node and summing to it."""
    rank_q, expert_q, amount_q, fits_N = pack_windows(node_k, expert_k, amount_k, topo)
    G, S = topo.ranks_per_node, topo.slots_per_rank
    assert (amount_q >= 0).all()
    for n in np.flatnonzero(fits_N):
        mine = rank_q // G == n
        load_G = np.bincount(rank_q[mine] - n * G, weights=amount_q[mine], minlength=G)
        total = amount_k[node_k == n].sum()
        assert load_G.sum() == total and load_G.max() - load_G.min() <= 1 and load_G.max() == -(-total // G)
        assert np.bincount(rank_q[mine], minlength=topo.num_ranks).max() <= S
        for e, a in zip(expert_k[node_k == n], amount_k[node_k == n]):
            ranks = rank_q[mine & (expert_q == e)]
            assert len(ranks) >= 1 and len(set(ranks.tolist())) == len(ranks)
            assert amount_q[mine & (expert_q == e)].sum() == a
    return fits_N


@given(st.integers(0, 2**31 - 1), st.sampled_from([(1, 4), (2, 3), (4, 5), (8, 5)]), st.booleans())
@settings(max_examples=60, deadline=None)
def test_windows_balance_every_rank_they_fit(seed, shape, hot):
    rng = np.random.default_rng(seed)
    G, S = shape
    N = int(rng.integers(1, 4))
    topo = Topology(num_experts=N * G * (S - 1), num_ranks=N * G, ranks_per_node=G, slots_per_rank=S)
    node_k = np.repeat(np.arange(N), G * (S - 1))
    amount_k = rng.integers(0, 3000, size=len(node_k))
    if hot:  # an item heavier than several ranks' worth
        amount_k[rng.integers(0, len(amount_k))] += int(rng.integers(0, 40_000))
    check_windows(node_k, np.arange(len(node_k)), amount_k, topo)


def test_windows_fit_the_reference_shape_and_cut_heavy_items():
    # 8 nodes of 8 ranks with 5 slots; node 0 has 31 experts, one of them worth ~2.9 ranks: cut into
    # 3 chunks it makes 33 units, as many as fit with 7 cuts (on these draws; not on every draw).
    topo = Topology(num_experts=255, num_ranks=64, ranks_per_node=8, slots_per_rank=5)
    rng = np.random.default_rng(4)
    node_k = np.concatenate(([0] * 31, np.repeat(np.arange(1, 8), 32)))
    amount_k = rng.integers(500, 4000, size=255)
    amount_k[0] = 40_000
    fits_N = check_windows(node_k, np.arange(255), amount_k, topo)
    assert fits_N.all()
    rank_q, expert_q, _, _ = pack_windows(node_k, np.arange(255), amount_k, topo)
    assert len(np.unique(rank_q[expert_q == 0])) >= 3


def test_crowded_nodes_are_reported_and_still_planned():
    # 10 experts on 2 ranks of 5 slots: an even split cuts one of them, 11 pieces for 10 slots. The
    # windows report the node; LptPack packs it (whole experts, the best split it can find).
    topo = Topology(num_experts=10, num_ranks=2, ranks_per_node=2, slots_per_rank=5)
    counts = np.array([100] * 9 + [150])
    fits_N = pack_windows(np.zeros(10, dtype=np.int64), np.arange(10), counts, topo)[3]
    assert not fits_N.any()
    plan = plan_microbatch(counts, place_nodes(counts[None], topo), topo)
    np.testing.assert_array_equal(plan.expert_load(), counts)
    assert sorted(plan.rank_load().tolist()) == [500, 550]


def test_copies_that_stay_on_their_rank_keep_their_slot():
    topo = Topology(num_experts=256, num_ranks=64, ranks_per_node=8, slots_per_rank=5)
    rng = np.random.default_rng(1)
    counts = rng.integers(500, 4000, size=(2, 256))
    placement = place_nodes(counts, topo)
    first = plan_microbatch(counts[0], placement, topo)
    again = plan_microbatch(counts[0], placement, topo, config=BalancerConfig(move_cost_tokens=0.0), prev=first)
    np.testing.assert_array_equal(again.phys_to_log, first.phys_to_log)
    nudged = plan_microbatch(counts[1], placement, topo, config=BalancerConfig(move_cost_tokens=0.0), prev=first)
    # A copy on a rank that held its expert sits in the same slot as before.
    used = np.flatnonzero(nudged.phys_to_log >= 0)
    S = topo.slots_per_rank
    before = first.phys_to_log.reshape(-1, S)[used // S]
    held = (before == nudged.phys_to_log[used][:, None]).any(1)
    assert held.any()
    assert (first.phys_to_log[used[held]] == nudged.phys_to_log[used[held]]).all()

"""RolloutPool: version switching without weight swaps under running sequences, DORA's proportional
rebalancing, capacity, and split placement."""

import pytest

from dora.rollout.events import DropVersion, LoadVersion
from dora.rollout.pool import RolloutPool, _largest_remainder


def live_pool(num_engines, max_seqs, max_versions, **kwargs):
    pool = RolloutPool(num_engines, max_seqs, max_versions, **kwargs)
    for action in pool.start(0, 0.0):
        pool.loaded(action.engine_id, action.version)
    return pool


def test_largest_remainder_is_doras_round_and_sums_to_n():
    assert _largest_remainder(8, {0: 3, 1: 1}) == {0: 6, 1: 2}
    assert _largest_remainder(4, {0: 1, 1: 1, 2: 1}) in ({0: 1, 1: 1, 2: 2}, {0: 2, 1: 1, 2: 1}, {0: 1, 1: 2, 2: 1})
    assert sum(_largest_remainder(7, {0: 5, 3: 2, 4: 9}).values()) == 7


def test_single_version_engines_move_in_proportion_and_switch_when_drained():
    pool = live_pool(4, 4, 1)
    for engine_id, running in enumerate([4, 2, 0, 0]):
        if running:
            pool.occupy(engine_id, 0, running, 1.0)
    assert pool.publish(1) == []
    # R_0 = 6 running sequences, R_1 = 2 admissible: Round(4 * 2 / 8) = 1 engine for version 1.
    actions = pool.rebalance({1: 2}, can_admit=lambda v: True)
    assert actions == [DropVersion(2, 0), LoadVersion(2, 1)]
    assert pool.engines[3].accepting == 0  # still serves version 0 (older versions fill idle slots)
    # Demand moves to version 1: the engine with running sequences stops taking groups, switches when drained.
    actions = pool.rebalance({1: 30}, can_admit=lambda v: True)
    assert DropVersion(3, 0) in actions and pool.engines[1].accepting is None and pool.engines[1].target == 1
    assert not any(getattr(a, "engine_id", None) == 1 for a in actions)
    assert pool.release(1, 0, 1, 2.0) == []
    assert pool.release(1, 0, 1, 3.0) == [DropVersion(1, 0), LoadVersion(1, 1)]


def test_idle_engine_on_a_dead_version_moves_at_once():
    pool = live_pool(2, 4, 1)
    pool.occupy(0, 0, 4, 0.0)
    pool.publish(1)
    # Nothing can be admitted on version 0 any more: engine 1 (idle) moves, whatever the shares.
    assert pool.rebalance({}, can_admit=lambda v: v == 1) == [DropVersion(1, 0), LoadVersion(1, 1)]


def test_multi_version_engines_load_beside_and_drop_drained():
    pool = live_pool(1, 4, 2)
    pool.occupy(0, 0, 2, 0.0)
    assert pool.publish(1) == [LoadVersion(0, 1)]
    assert pool.engines[0].accepting == 0  # until version 1 is live
    assert pool.loaded(0, 1) == []  # version 0 still has running sequences
    assert pool.engines[0].accepting == 1 and pool.engines[0].live == [0, 1]
    pool.occupy(0, 1, 2, 1.0)
    assert pool.publish(2) == []  # no room for a third version
    assert pool.release(0, 0, 2, 2.0) == [DropVersion(0, 0), LoadVersion(0, 2)]


def test_placement_respects_capacity_and_split():
    whole = live_pool(2, 3, 1)
    assert whole.place(0, 3) == [(0, 3)]
    whole.occupy(0, 0, 2, 0.0)
    assert whole.place(0, 3) == [(1, 3)]
    whole.occupy(1, 0, 1, 0.0)
    assert whole.place(0, 3) is None
    split = live_pool(2, 3, 1, split_groups=True)
    split.occupy(0, 0, 2, 0.0)
    split.occupy(1, 0, 1, 0.0)
    assert split.place(0, 3) == [(1, 2), (0, 1)]
    assert split.place(0, 4) is None


def test_idle_and_utilisation_accounting():
    pool = live_pool(2, 2, 1)
    pool.occupy(0, 0, 2, 1.0)
    pool.release(0, 0, 2, 3.0)
    assert pool.idle_s(4.0) == [2.0, 4.0]
    assert pool.utilisation(4.0) == pytest.approx(4.0 / (2 * 2 * 4.0))

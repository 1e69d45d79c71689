"""RolloutPool: version switching without weight swaps under running sequences, rebalancing (an
engine switches when it is free to or has nothing left to do on its version), capacity, and split
placement."""

import pytest

from dora.rollout.events import DropVersion, LoadVersion
from dora.rollout.pool import RolloutPool


def live_pool(num_engines, max_seqs, max_versions, **kwargs):
    pool = RolloutPool(num_engines, max_seqs, max_versions, **kwargs)
    for action in pool.start(0, 0.0):
        pool.loaded(action.engine_id, action.version)
    return pool


def test_single_version_engines_keep_their_version_while_it_admits_and_switch_when_drained():
    pool = live_pool(3, 4, 1)
    for engine_id, running in enumerate([4, 2, 0]):
        if running:
            pool.occupy(engine_id, 0, running, 1.0)
    assert pool.publish(1) == []
    # Version 0 still admits: the busy engines keep filling their free slots on it; the idle one moves.
    assert pool.rebalance({}, can_admit=lambda v: True) == [DropVersion(2, 0), LoadVersion(2, 1)]
    assert [e.accepting for e in pool.engines] == [0, 0, None] and pool.engines[1].free == 2
    # Version 0 closes (deadline invariant): the busy engines stop taking groups and switch once drained.
    assert pool.rebalance({}, can_admit=lambda v: v == 1) == []
    assert [e.target for e in pool.engines[:2]] == [1, 1] and pool.engines[1].accepting is None
    assert pool.release(1, 0, 1, 2.0) == []
    assert pool.release(1, 0, 1, 3.0) == [DropVersion(1, 0), LoadVersion(1, 1)]


def test_engines_stay_while_no_version_admits():
    pool = live_pool(2, 4, 1)
    pool.occupy(0, 0, 4, 0.0)
    pool.occupy(1, 0, 1, 0.0)
    pool.publish(1)
    # The in-flight bound stops every version: switching would only turn free slots into a drain.
    assert pool.rebalance({}, can_admit=lambda v: False) == []
    assert [e.accepting for e in pool.engines] == [0, 0]


def test_work_only_the_newest_may_take_moves_the_least_busy_engine():
    pool = live_pool(2, 4, 1)
    pool.occupy(0, 0, 4, 0.0)
    pool.occupy(1, 0, 1, 0.0)
    pool.publish(1)
    # A requeued prompt must run on version 1 and no engine holds it: the engine with fewest running moves.
    assert pool.rebalance({1: 1}, can_admit=lambda v: True) == []
    assert pool.engines[1].target == 1 and pool.engines[0].accepting == 0
    assert pool.rebalance({1: 1}, can_admit=lambda v: True) == []  # one engine is on its way: enough
    assert pool.engines[0].target is None


def test_a_draining_engine_lands_on_the_newest_version():
    pool = live_pool(1, 4, 1)
    pool.occupy(0, 0, 2, 0.0)
    pool.publish(1)
    pool.rebalance({}, can_admit=lambda v: v == 1)
    assert pool.engines[0].target == 1
    pool.publish(2)
    assert pool.rebalance({}, can_admit=lambda v: v == 2) == []
    assert pool.engines[0].target == 2
    assert pool.release(0, 0, 2, 1.0) == [DropVersion(0, 0), LoadVersion(0, 2)]


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

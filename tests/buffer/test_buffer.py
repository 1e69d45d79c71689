"""TrajectoryBuffer: loud rejection of inconsistent trajectories, exactly-once hand-off, discard of
aborted groups, and the checkpoint round trip (JSON + safetensors)."""

import json

import pytest
import torch
from safetensors.torch import load, save

from dora.buffer.buffer import TrajectoryBuffer
from dora.types import FinishReason, Trajectory


def traj(gid, idx, version=0, lo=None, hi=None, prompt_id=7, reason=FinishReason.STOP, routing=False):
    lo = version if lo is None else lo
    hi = version if hi is None else hi
    return Trajectory(gid, idx, prompt_id, [1, 2], [3, 4, 5], torch.tensor([-0.1, -0.2, -0.3]), version, lo, hi, reason,
                      reward=1.0, routing=torch.zeros(4, 2, 2, dtype=torch.uint8) if routing else None)


def test_assembles_and_hands_out_once():
    buf = TrajectoryBuffer(2)
    buf.open(0, 7, 3)
    assert not buf.add(traj(0, 1, 3))
    assert buf.add(traj(0, 0, 3))
    assert buf.counts().finished == 1
    (group,) = buf.pop([0])
    assert [t.sample_idx for t in group] == [0, 1]
    with pytest.raises(ValueError, match="already handed"):
        buf.pop([0])
    with pytest.raises(ValueError, match="already complete"):
        buf.add(traj(0, 1, 3))
    assert buf.counts().consumed == 1


@pytest.mark.parametrize("bad, match", [
    (traj(0, 0, 1, lo=1, hi=2), "mixes policy versions 1..2"),
    (traj(0, 0, 2), "admitted on version 1"),
    (traj(0, 5, 1), "sample_idx outside"),
    (traj(0, 0, 1, prompt_id=8), "prompt_id 8"),
    (traj(9, 0, 1), "never admitted"),
    (traj(0, 0, 1, reason=FinishReason.ABORT), "not aborted by the pool"),
])
def test_rejects_loudly(bad, match):
    buf = TrajectoryBuffer(2)
    buf.open(0, 7, 1)
    with pytest.raises(ValueError, match=match):
        buf.add(bad)


def test_duplicate_sample_is_an_error():
    buf = TrajectoryBuffer(2)
    buf.open(0, 7, 1)
    buf.add(traj(0, 0, 1))
    with pytest.raises(ValueError, match="arrived twice"):
        buf.add(traj(0, 0, 1))


def test_partial_rollout_is_labelled_and_counts_the_oldest_version():
    buf = TrajectoryBuffer(1, partial_rollout=True)
    buf.open(0, 7, 1)
    with pytest.raises(ValueError, match="min_version"):
        buf.add(traj(0, 0, 2, lo=1, hi=2))
    assert buf.add(traj(0, 0, 1, lo=1, hi=3))


def test_discarded_group_drops_late_trajectories():
    buf = TrajectoryBuffer(2)
    buf.open(0, 7, 1)
    buf.add(traj(0, 0, 1))
    buf.discard(0)
    assert not buf.add(traj(0, 1, 1, reason=FinishReason.ABORT))
    assert not buf.add(traj(0, 1, 1))  # finished just before the abort reached the engine
    counts = buf.counts()
    assert (counts.running, counts.finished, counts.regenerated, counts.discarded_trajectories) == (0, 0, 1, 3)
    with pytest.raises(ValueError, match="not running"):
        buf.discard(0)


def test_state_round_trip_through_json_and_safetensors():
    buf = TrajectoryBuffer(2)
    for gid in (0, 1):
        buf.open(gid, 7, 1)
        buf.add(traj(gid, 0, 1, routing=True))
        buf.add(traj(gid, 1, 1))
    buf.open(2, 7, 1)  # open groups are the scheduler's to regenerate, not saved
    buf.pop([1])
    state, tensors = buf.state_dict()
    restored = TrajectoryBuffer(2)
    restored.load_state_dict(json.loads(json.dumps(state)), load(save(tensors)))
    assert restored.counts().finished == 1 and restored.counts().consumed == 1
    (group,) = restored.pop([0])
    assert torch.equal(group[0].behavior_logprobs, torch.tensor([-0.1, -0.2, -0.3]))
    assert group[0].routing.dtype == torch.uint8 and group[1].routing is None
    assert group[0].finish_reason is FinishReason.STOP and group[0].reward == 1.0
    with pytest.raises(ValueError, match="already handed"):
        restored.pop([1])

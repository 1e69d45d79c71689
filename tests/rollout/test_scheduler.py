"""The Scheduler core driven event by event: the naive-gate deadlock schedule (wait and regenerate),
wait diagnostics, regeneration on a long-tail workload, engine resets and bad events."""

import pytest
import torch

from dora.rollout.config import RolloutConfig
from dora.rollout.events import (Abort, EngineLoaded, EnginesReset, LoadVersion, SampleFinished, StartStep,
                                 StepRequested, Submit, VersionPublished)
from dora.rollout.scheduler import Scheduler
from dora.rollout.sim import RangePromptSource, SimWorkload, simulate
from dora.types import FinishReason, Trajectory


def done(group, version, t=0.0, reason=FinishReason.STOP):
    return SampleFinished(t, 0, Trajectory(group.group_id, 0, group.prompt_id, group.prompt_ids, [5, 6],
                                           torch.zeros(2), version, version, version, reason))


def kinds(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def naive_gate_setup(on_stale):
    """k = 2, B = 1: groups a, b, c admitted on version 0, then d on version 1 finishing first."""
    config = RolloutConfig(max_staleness=2, batch_groups=1, group_size=1, max_seqs_per_engine=8, on_stale=on_stale)
    sched = Scheduler(config, RangePromptSource(5, 1), 1)
    assert sched.start(0.0) == [LoadVersion(0, 0)]
    submits = kinds(sched.handle(EngineLoaded(0.0, 0, 0)), Submit)
    assert [s.version for s in submits] == [0, 0, 0]  # (k + 1) * B groups on version 0
    a, b, c = (s.group for s in submits)
    sched.handle(StepRequested(1.0, 0))
    (start,) = kinds(sched.handle(done(a, 0, 2.0)), StartStep)
    assert start.batch.step == 0
    assert kinds(sched.handle(VersionPublished(3.0, 1)), LoadVersion) == [LoadVersion(0, 1)]
    (d,) = [s.group for s in kinds(sched.handle(EngineLoaded(3.0, 0, 1)), Submit)]
    assert sched.active_versions() == [0, 1]  # version 0 stays live beside 1 until b and c drain
    sched.handle(StepRequested(3.0, 1))
    return sched, a, b, c, d


def test_naive_gate_schedule_waits_for_the_due_group():
    sched, a, b, c, d = naive_gate_setup("wait")
    assert kinds(sched.handle(done(d, 1, 4.0)), StartStep) == []  # d would strand b and c
    status = sched.wait_status(124.0)
    assert status.group_id == b.group_id and status.version == 0
    assert f"group {b.group_id} (prompt {b.prompt_id}, version 0) running for 124 s on engine 0" in status.describe()
    (start,) = kinds(sched.handle(done(c, 0, 5.0)), StartStep)
    assert [g[0].group_id for g in start.batch.groups] == [c.group_id]
    steps = {1: [c.prompt_id]}
    sched.handle(VersionPublished(6.0, 2))
    sched.handle(StepRequested(6.0, 2))
    (start,) = kinds(sched.handle(done(b, 0, 7.0)), StartStep)
    assert start.batch.groups[0][0].group_id == b.group_id and start.batch.max_staleness == 2
    steps[2] = [b.prompt_id]
    sched.handle(VersionPublished(8.0, 3))
    (start,) = kinds(sched.handle(StepRequested(8.0, 3)), StartStep)
    assert start.batch.groups[0][0].group_id == d.group_id
    waits = sched.metrics.waits
    assert waits[1].group_id == b.group_id and waits[1].wait_s == pytest.approx(2.0)


def test_naive_gate_schedule_regenerates_the_blocking_group():
    sched, a, b, c, d = naive_gate_setup("regenerate")
    actions = sched.handle(done(d, 1, 4.0))
    assert Abort(b.group_id, (0,)) in actions
    (resubmit,) = kinds(actions, Submit)
    assert resubmit.group.prompt_id == b.prompt_id and resubmit.version == 1  # first in line, newest version
    (start,) = kinds(actions, StartStep)
    assert start.batch.groups[0][0].group_id == d.group_id
    assert actions.index(Abort(b.group_id, (0,))) < actions.index(resubmit)
    # The aborted sample comes back as ABORT and is discarded; a repeat abort of the prompt is not allowed.
    sched.handle(done(b, 0, 4.5, FinishReason.ABORT))
    assert sched.buffer.counts().regenerated == 1 and sched.metrics.num_regenerations == 1


def test_long_tail_regeneration_keeps_every_prompt():
    config = RolloutConfig(max_staleness=1, batch_groups=2, group_size=2, max_seqs_per_engine=8, on_stale="regenerate",
                           max_regenerations=2)
    workload = SimWorkload(num_prompts=60, num_engines=3, engine_speeds=(100.0, 25.0), tail_alpha=0.7,
                           max_tokens=4096, step_time_s=0.5, seed=11)
    result = simulate(config, workload)
    assert result.metrics.num_regenerations > 0
    assert sorted(p for s in result.steps for p in s.prompt_ids) == list(range(60))
    assert all(s.step - v <= 1 for s in result.steps for v in s.versions)


def test_engine_reset_requeues_its_groups_first():
    config = RolloutConfig(max_staleness=1, batch_groups=4, group_size=1, max_seqs_per_engine=3)
    sched = Scheduler(config, RangePromptSource(20, 1), 2)
    sched.start(0.0)
    first = kinds(sched.handle(EngineLoaded(0.0, 0, 0)), Submit)
    lost = kinds(sched.handle(EngineLoaded(0.0, 1, 0)), Submit)
    assert len(first) == len(lost) == 3 and {s.engine_id for s in lost} == {1}
    actions = sched.handle(EnginesReset(1.0, (1,)))
    assert actions == [LoadVersion(1, 0)]  # nothing to abort on a dead engine, engine 0 is full
    assert sched.num_in_flight == 3
    again = kinds(sched.handle(EngineLoaded(1.5, 1, 0)), Submit)
    assert [s.group.prompt_id for s in again] == [s.group.prompt_id for s in lost]
    assert all(s.group.group_id not in {x.group.group_id for x in lost} for s in again)
    assert sched.metrics.num_restarts == 3 and sched.buffer.counts().regenerated == 3
    # A reset engine lost the group: a sample of it streaming back afterwards is an error.
    with pytest.raises(ValueError, match="never admitted"):
        sched.handle(done(lost[0].group, 0, 2.0))


def test_bad_events_fail_loudly():
    config = RolloutConfig(max_staleness=1, batch_groups=1, group_size=1)
    sched = Scheduler(config, RangePromptSource(4, 1), 1)
    sched.start(0.0)
    sched.handle(EngineLoaded(0.0, 0, 0))
    with pytest.raises(ValueError, match="next step is 0"):
        sched.handle(StepRequested(0.0, 3))
    with pytest.raises(ValueError, match="published one per train step"):
        sched.handle(VersionPublished(0.0, 2))
    with pytest.raises(ValueError, match="never admitted"):
        sched.handle(SampleFinished(0.0, 0, Trajectory(99, 0, 0, [1], [1], torch.zeros(1), 0, 0, 0,
                                                       FinishReason.STOP)))
    with pytest.raises(ValueError, match="was not loading"):
        sched.handle(EngineLoaded(0.0, 0, 0))


def test_group_size_mismatch_names_the_key():
    sched = Scheduler(RolloutConfig(group_size=2), RangePromptSource(4, 3), 1)
    sched.start(0.0)
    with pytest.raises(ValueError, match="rollout.group_size"):
        sched.handle(EngineLoaded(0.0, 0, 0))


def finished_on(engine_id, group, version, t):
    return SampleFinished(t, engine_id, Trajectory(group.group_id, 0, group.prompt_id, group.prompt_ids, [5, 6],
                                                   torch.zeros(2), version, version, version, FinishReason.STOP))


def test_single_version_engine_refills_on_its_version_after_a_publish():
    """k = 2, B = 4, two one-version engines of 2 slots, groups of 1. After version 1 is published
    both engines still run version-0 groups and version 0 may still be admitted on: a freed slot is
    refilled on version 0 at once (switching now would leave it empty until the engine drained), and
    the engine switches only once version 0 closes and it has drained."""
    config = RolloutConfig(max_staleness=2, max_live_versions=1, batch_groups=4, group_size=1, max_seqs_per_engine=2)
    sched = Scheduler(config, RangePromptSource(40, 1), 2)
    sched.start(0.0)
    running = {0: [], 1: []}
    for e in (0, 1):
        running[e] += [s.group for s in kinds(sched.handle(EngineLoaded(0.0, e, 0)), Submit)]
    assert [len(running[e]) for e in (0, 1)] == [2, 2]
    sched.handle(StepRequested(0.0, 0))
    for t, e in enumerate((0, 0, 1, 1), 1):
        actions = sched.handle(finished_on(e, running[e].pop(0), 0, float(t)))
        running[e] += [s.group for s in kinds(actions, Submit)]
    assert kinds(actions, StartStep) and [len(running[e]) for e in (0, 1)] == [2, 2]
    # Version 1 is published while both engines are full of version-0 groups.
    assert kinds(sched.handle(VersionPublished(5.0, 1)), LoadVersion) == []
    actions = sched.handle(finished_on(0, running[0].pop(0), 0, 6.0))
    (refill,) = kinds(actions, Submit)
    assert (refill.engine_id, refill.version) == (0, 0)
    running[0].append(refill.group)
    # Fill version 0's window: finished samples keep being replaced on version 0 until it closes.
    t = 7.0
    while sched.controller.can_admit(0):
        e = 0 if running[0] else 1
        actions = sched.handle(finished_on(e, running[e].pop(0), 0, t))
        running[e] += [s.group for s in kinds(actions, Submit)]
        assert all(s.version == 0 for s in kinds(actions, Submit))
        t += 1.0
    # Version 0 closed: an engine that drains switches to version 1 and takes the new groups there.
    while not any(isinstance(a, LoadVersion) for a in actions):
        e = 0 if running[0] else 1
        actions = sched.handle(finished_on(e, running[e].pop(0), 0, t))
        assert kinds(actions, Submit) == []
        t += 1.0
    (load,) = kinds(actions, LoadVersion)
    assert load.version == 1 and not running[load.engine_id]
    submits = kinds(sched.handle(EngineLoaded(t, load.engine_id, 1)), Submit)
    assert submits and all(s.version == 1 and s.engine_id == load.engine_id for s in submits)

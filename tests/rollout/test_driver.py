"""RolloutDriver with a tiny deterministic asyncio engine implementing the Engine protocol: a whole
run (start, next_batch, publish) with a reward hook, split groups, and the named timeout. Loads run
on the event loop (`load_in_thread=False`) so the event order, and thus every schedule, is fixed."""

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping

import pytest
import torch

from dora.engines.base import Engine, EngineStats, GroupHandle
from dora.rollout.config import RolloutConfig
from dora.rollout.driver import RolloutDriver
from dora.rollout.scheduler import Scheduler
from dora.rollout.sim import RangePromptSource
from dora.types import FinishReason, PromptGroup, SamplingParams, Trajectory


class FakeEngine:
    """Each sample takes `1 + (prompt_id * 7 + sample_idx) % 5` event-loop turns (times `slowdown`);
    no wall clock, no randomness."""

    def __init__(self, engine_id: int, max_live_versions: int, slowdown: int = 1) -> None:
        self.engine_id = engine_id
        self.max_live_versions = max_live_versions
        self.slowdown = slowdown
        self.live: dict[int, float] = {}
        self.running: dict[tuple[int, int], tuple[asyncio.Task, int]] = {}
        self.out: asyncio.Queue[Trajectory] = asyncio.Queue()
        self.seeds: list[int | None] = []

    def add_version(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        assert len(self.live) < self.max_live_versions, f"engine {self.engine_id} is full: {sorted(self.live)}"
        self.live[version] = float(weights["w"])

    def drop_version(self, version: int) -> None:
        assert not any(v == version for _, v in self.running.values()), "dropped under running sequences"
        del self.live[version]

    def submit(self, group: PromptGroup, version: int, sampling: SamplingParams) -> GroupHandle:
        assert version in self.live, f"version {version} not live on engine {self.engine_id}"
        self.seeds.append(sampling.seed)
        for i in range(group.num_samples):
            task = asyncio.ensure_future(self._run(group, i, version))
            self.running[(group.group_id, i)] = (task, version)
        return GroupHandle(group.group_id, version, self.engine_id)

    async def _run(self, group: PromptGroup, i: int, version: int) -> None:
        for _ in range(self.slowdown * (1 + (group.prompt_id * 7 + i) % 5)):
            await asyncio.sleep(0)
        del self.running[(group.group_id, i)]
        self.out.put_nowait(self._traj(group, i, version, FinishReason.STOP))

    def _traj(self, group, i, version, reason):
        return Trajectory(group.group_id, i, group.prompt_id, group.prompt_ids, [1, 2, 3],
                          torch.full((3,), -self.live.get(version, 0.0)), version, version, version, reason,
                          engine_id=self.engine_id)

    async def finished(self) -> AsyncIterator[Trajectory]:
        while True:
            yield await self.out.get()

    def abort(self, group_id: int) -> None:
        for key in [key for key in self.running if key[0] == group_id]:
            task, version = self.running.pop(key)
            task.cancel()
            group = PromptGroup(group_id, -1, [1])
            traj = self._traj(group, key[1], version, FinishReason.ABORT)
            self.out.put_nowait(traj)

    def stats(self) -> EngineStats:
        return EngineStats(live_versions=sorted(self.live))


@dataclasses.dataclass
class Moving:
    group: PromptGroup
    version: int
    samples: list[tuple[int, int]]
    """(sample_idx, turns left)."""

    @property
    def num_samples(self) -> int:
        return len(self.samples)


class MovableFakeEngine(FakeEngine):
    """A FakeEngine that can hand running samples to another one (`export_group` / `import_group`):
    a moved sample keeps the turns it already ran."""

    def __init__(self, engine_id: int, max_live_versions: int, slowdown: int = 1) -> None:
        super().__init__(engine_id, max_live_versions, slowdown)
        self.left: dict[tuple[int, int], int] = {}
        self.groups: dict[int, PromptGroup] = {}
        self.moved_in = 0

    def submit(self, group: PromptGroup, version: int, sampling: SamplingParams) -> GroupHandle:
        self.groups[group.group_id] = group
        for i in range(group.num_samples):
            self.left[(group.group_id, i)] = self.slowdown * (1 + (group.prompt_id * 7 + i) % 5)
        return super().submit(group, version, sampling)

    async def _run(self, group: PromptGroup, i: int, version: int) -> None:
        while self.left[(group.group_id, i)] > 0:
            self.left[(group.group_id, i)] -= 1
            await asyncio.sleep(0)
        del self.left[(group.group_id, i)]
        del self.running[(group.group_id, i)]
        self.out.put_nowait(self._traj(group, i, version, FinishReason.STOP))

    def export_group(self, group_id: int):
        keys = [key for key in self.running if key[0] == group_id]
        if not keys:
            return None
        samples = []
        for key in keys:
            task, version = self.running.pop(key)
            task.cancel()
            samples.append((key[1], self.left.pop(key)))
        return Moving(self.groups[group_id], version, samples)

    def import_group(self, moving: "Moving") -> None:
        group, version, samples = moving.group, moving.version, moving.samples
        assert version in self.live, f"version {version} not live on engine {self.engine_id}"
        self.groups[group.group_id] = group
        for i, left in samples:
            self.left[(group.group_id, i)] = left
            self.running[(group.group_id, i)] = (asyncio.ensure_future(self._run(group, i, version)), version)
            self.moved_in += 1


async def train(config: RolloutConfig, num_prompts: int, engines: list[FakeEngine]) -> tuple[list, list]:
    scheduler = Scheduler(config, RangePromptSource(num_prompts, config.group_size), len(engines))

    async def reward(traj: Trajectory) -> None:
        await asyncio.sleep(0)
        traj.reward = float(traj.prompt_id)

    driver = RolloutDriver(scheduler, engines, SamplingParams(seed=100), reward=reward, load_in_thread=False)
    await driver.start({"w": torch.tensor(0.0)})
    train.migrations = scheduler.metrics.num_migrations if scheduler.migrate else None  # type: ignore[attr-defined]
    batches = []
    try:
        step = 0
        while not driver.done:
            batch = await driver.next_batch(step, timeout=30)
            batches.append(batch)
            step += 1
            driver.publish(step, {"w": torch.tensor(float(step))})
    finally:
        await driver.close()
    train.migrations = scheduler.metrics.num_migrations if scheduler.migrate else None  # type: ignore[attr-defined]
    return batches, [e.seeds for e in engines]


@pytest.mark.parametrize("mode, live, placement", [("multi_version", 2, "whole"), ("multi_version", 1, "split"),
                                                   ("synchronous", 1, "whole"), ("one_step_off", 1, "whole")])
def test_driver_runs_every_prompt_once(mode, live, placement):
    config = RolloutConfig(mode=mode, batch_groups=3, group_size=2, max_seqs_per_engine=3, group_placement=placement,
                           max_live_versions=live if mode == "multi_version" else None)
    engines = [FakeEngine(e, live) for e in range(2)]
    batches, seeds = asyncio.run(train(config, 13, engines))
    prompts = [g[0].prompt_id for b in batches for g in b.groups]
    assert sorted(prompts) == list(range(13))
    for b in batches:
        assert b.max_staleness <= config.k
        for t in b.trajectories:
            assert t.reward == float(t.prompt_id)  # the reward hook ran before the buffer
            assert t.behavior_logprobs[0].item() == -float(t.version)  # sampled by that version's weights
        assert all(sorted(t.sample_idx for t in g) == [0, 1] for g in b.groups)
    if placement == "split":
        assert 101 in {s for engine_seeds in seeds for s in engine_seeds}  # second half of a split group


@pytest.mark.parametrize("placement", ["whole", "split"])
def test_driver_migrates_groups_off_draining_engines(placement):
    """Single-version engines: a draining engine hands its running samples to another engine of its
    version. Every prompt is still trained once, each sample once, on the version that started it."""
    config = RolloutConfig(mode="multi_version", max_staleness=2, batch_groups=3, group_size=2, max_seqs_per_engine=4,
                           group_placement=placement, max_live_versions=1)
    engines = [MovableFakeEngine(e, 1, slowdown=3) for e in range(3)]
    batches, _ = asyncio.run(train(config, 24, engines))
    assert train.migrations > 0 and sum(e.moved_in for e in engines) > 0
    prompts = [g[0].prompt_id for b in batches for g in b.groups]
    assert sorted(prompts) == list(range(24))
    for b in batches:
        assert b.max_staleness <= config.k
        for t in b.trajectories:
            assert t.reward == float(t.prompt_id)
            assert t.behavior_logprobs[0].item() == -float(t.version)
        assert all(sorted(t.sample_idx for t in g) == [0, 1] for g in b.groups)
    # The same engines with migration off: nothing moves, same prompts trained.
    off = dataclasses.replace(config, migrate=False)
    engines = [MovableFakeEngine(e, 1, slowdown=3) for e in range(3)]
    batches, _ = asyncio.run(train(off, 24, engines))
    assert train.migrations is None and sum(e.moved_in for e in engines) == 0
    assert sorted(g[0].prompt_id for b in batches for g in b.groups) == list(range(24))


def test_migration_needs_engines_that_can_migrate():
    config = RolloutConfig(mode="multi_version", batch_groups=1, group_size=1, max_live_versions=1, migrate=True)
    with pytest.raises(ValueError, match=r"rollout.migrate=true but engine 0 \(FakeEngine\) cannot migrate"):
        RolloutDriver(Scheduler(config, RangePromptSource(2, 1), 1), [FakeEngine(0, 1)], SamplingParams())
    auto = Scheduler(dataclasses.replace(config, migrate=None), RangePromptSource(2, 1), 1)
    RolloutDriver(auto, [FakeEngine(0, 1)], SamplingParams())
    assert auto.migrate is False
    with pytest.raises(ValueError, match="rollout.migrate=true is dora's request migration"):
        RolloutConfig(mode="one_step_off", migrate=True)


def test_timeout_names_the_group_version_and_engine():
    async def run():
        config = RolloutConfig(max_staleness=1, batch_groups=1, group_size=1, max_seqs_per_engine=1)
        scheduler = Scheduler(config, RangePromptSource(4, 1), 1)
        engine = FakeEngine(0, 2, slowdown=10**6)
        driver = RolloutDriver(scheduler, [engine], SamplingParams())
        await driver.start({"w": torch.tensor(0.0)})
        try:
            while not engine.running:  # version 0 loads in a worker thread; then group 0 starts
                await asyncio.sleep(0.001)
            with pytest.raises(TimeoutError, match=r"group 0 \(prompt 0, version 0\) running for \d+ s on engine 0"):
                await driver.next_batch(0, timeout=0.05)
        finally:
            await driver.close()

    asyncio.run(run())


def test_fake_engine_follows_the_protocol():
    assert isinstance(FakeEngine(0, 1), Engine)

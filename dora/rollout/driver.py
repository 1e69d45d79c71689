"""`RolloutDriver`: the thin asyncio adapter that runs the scheduler core against real engines.

Where it sits: between the trainer loop (which calls `next_batch` and `publish`) and the `Engine`
objects (dora/engines/base.py). All decisions are the `Scheduler`'s; this module only turns its
actions into engine calls and engine output into events, stamped with `time.monotonic()`:

- `Submit` -> `engine.submit`; `Abort` -> `engine.abort`; `DropVersion` -> `engine.drop_version`;
- `LoadVersion` -> `engine.add_version` in a worker thread (it copies tensors; torch work never
  runs on the event loop thread), then an `EngineLoaded` event;
- each engine's `finished()` stream -> (optional async reward hook) -> `SampleFinished`;
- `Migrate` -> `src.export_group` then `dst.import_group`, at once (the export waits for the
  source engine's step in progress to end): no other action or event comes between the core's
  decision and the move. A sample of the group that finished on the source before the move is
  already streaming back from there; it is reported as finished on the destination, where the
  core counts it. Engines without `export_group`/`import_group` (vLLM) turn migration off;
- `StartStep` resolves the trainer's pending `next_batch`.

Everything runs on one event loop, so the synchronous core needs no locks. Every wait has a timeout
whose error names what it waited for (the core's `WaitStatus.describe()`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import torch

from dora.engines.base import Engine
from dora.rollout.events import (Abort, Action, DropVersion, EngineLoaded, Event, LoadVersion, Migrate, SampleFinished,
                                 StartStep, StepRequested, Submit, Tick, VersionPublished, counted_on)
from dora.rollout.scheduler import Scheduler
from dora.types import Batch, FinishReason, SamplingParams, Trajectory

RewardHook = Callable[[Trajectory], Awaitable[None]]
"""Fills `trajectory.reward` (and `reward_info`) in place; runs before the buffer sees it."""


class RolloutDriver:
    def __init__(self, scheduler: Scheduler, engines: Sequence[Engine], sampling: SamplingParams, *,
                 reward: RewardHook | None = None, tick_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, load_in_thread: bool = True) -> None:
        """`load_in_thread=False` calls `add_version` on the event loop (for engines whose loading is
        trivial, and for tests that need a deterministic event order)."""
        if len(engines) != len(scheduler.pool.engines):
            raise ValueError(f"the scheduler was built for {len(scheduler.pool.engines)} engines, got {len(engines)}")
        for i, engine in enumerate(engines):
            if engine.engine_id != i:
                raise ValueError(f"engines[{i}].engine_id is {engine.engine_id}: engine ids must be 0..N-1 in order")
            if engine.max_live_versions < (scheduler.config.max_live_versions or 1):
                raise ValueError(f"rollout.max_live_versions={scheduler.config.max_live_versions} but engine {i} holds at"
                                 f" most {engine.max_live_versions}")
        if scheduler.config.partial:
            raise ValueError("rollout.mode=partial_rollout swaps weights under running sequences, which the Engine"
                             " protocol forbids (drop_version refuses running sequences): it runs in the simulator only")
        movable = [callable(getattr(e, "export_group", None)) and callable(getattr(e, "import_group", None))
                   for e in engines]
        if scheduler.migrate and not all(movable):
            if scheduler.config.migrate:
                raise ValueError(f"rollout.migrate=true but engine {movable.index(False)}"
                                 f" ({type(engines[movable.index(False)]).__name__}) cannot migrate running groups"
                                 " (no export_group/import_group); set rollout.migrate=null or false")
            scheduler.migrate = False
        self.scheduler = scheduler
        self.engines = list(engines)
        self.sampling = sampling
        self.reward = reward
        self.tick_s = tick_s
        self.clock = clock
        self.load_in_thread = load_in_thread
        self.timeout_s = scheduler.config.wait_timeout_s
        self._weights: dict[int, Mapping[str, torch.Tensor]] = {}
        self._offsets: dict[tuple[int, int], tuple[int, int]] = {}
        """(group_id, engine_id) of a split group's chunk -> (first sample_idx, samples not back yet)."""
        self._reported_as: dict[tuple[int, int], tuple[int, int]] = {}
        """(group_id, source engine) of a migration -> (destination, samples that finished on the
        source before the move and are reported as finished on the destination, when fed: after
        the reward hook, since the core may move a group while one of its samples is scored)."""
        self._tasks: set[asyncio.Task] = set()
        self._batch: asyncio.Future[Batch] | None = None
        self._error: BaseException | None = None

    # ---- trainer-facing API ------------------------------------------------------------------

    async def start(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Serve `weights` as the newest version (0, or the restored one) and start streaming."""
        self._weights[self.scheduler.controller.newest_version] = weights
        for engine in self.engines:
            self._spawn(self._read(engine))
        self._spawn(self._tick())
        self._apply(self.scheduler.start(self.clock()))

    async def next_batch(self, step: int, timeout: float | None = None) -> Batch:
        """The batch of train step `step` (waits while the core says so)."""
        self._raise_if_failed()
        if self.scheduler.done:
            raise ValueError(f"next_batch({step}): every prompt was consumed (the prompt source is exhausted)")
        loop = asyncio.get_running_loop()
        self._batch = loop.create_future()
        self._feed(StepRequested(self.clock(), step))
        timeout = self.timeout_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(self._batch), timeout)
        except asyncio.TimeoutError:
            status = self.scheduler.wait_status(self.clock())
            what = status.describe() if status else f"step {step}"
            raise TimeoutError(f"rollout: {what} (timeout {timeout:.0f} s, rollout.wait_timeout_s)") from None

    def publish(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Train step `version - 1` is done: engines start loading `version` as the core decides."""
        self._raise_if_failed()
        self._weights[version] = weights
        self._feed(VersionPublished(self.clock(), version))

    @property
    def done(self) -> bool:
        return self.scheduler.done

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # ---- events in, actions out --------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        try:
            self._apply(self.scheduler.handle(event))
        except BaseException as e:
            self._fail(e)
            raise

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Submit):
                group, offset = action.group, action.sample_offset
                sampling = self.sampling
                if offset and sampling.seed is not None:
                    sampling = dataclasses.replace(sampling, seed=sampling.seed + offset)
                if offset:
                    self._offsets[(group.group_id, action.engine_id)] = (offset, group.num_samples)
                self.engines[action.engine_id].submit(group, action.version, sampling)
            elif isinstance(action, Abort):
                for engine_id in action.engine_ids:
                    self.engines[engine_id].abort(action.group_id)
            elif isinstance(action, LoadVersion):
                self._spawn(self._load(action.engine_id, action.version))
            elif isinstance(action, DropVersion):
                self.engines[action.engine_id].drop_version(action.version)
                self._forget_unused_weights()
            elif isinstance(action, Migrate):
                self._migrate(action)
            elif isinstance(action, StartStep):
                assert self._batch is not None and not self._batch.done(), "a batch nobody asked for"
                self._batch.set_result(action.batch)

    def _migrate(self, action: Migrate) -> None:
        key = (action.group_id, action.src)
        moving = self.engines[action.src].export_group(action.group_id)  # type: ignore[attr-defined]
        moved = 0 if moving is None else moving.num_samples
        if moving is not None:
            self.engines[action.dst].import_group(moving)  # type: ignore[attr-defined]
        if key in self._offsets:
            offset, left = self._offsets.pop(key)
            if moved:
                self._offsets[(action.group_id, action.dst)] = (offset, moved)
            if left > moved:
                self._offsets[key] = (offset, left - moved)
        if action.num_samples > moved:
            self._reported_as[key] = (action.dst, action.num_samples - moved)

    async def _load(self, engine_id: int, version: int) -> None:
        engine = self.engines[engine_id]
        started = self.clock()
        weights = self._weights[version]
        if not self.load_in_thread:
            await asyncio.sleep(0)  # after the actions being applied now, as a threaded load would be
            engine.add_version(version, weights)
            self._feed(EngineLoaded(self.clock(), engine_id, version))
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(engine.add_version, version, weights), self.timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"rollout: engine {engine_id} loading version {version} for"
                               f" {self.clock() - started:.0f} s (rollout.wait_timeout_s)") from None
        self._feed(EngineLoaded(self.clock(), engine_id, version))

    async def _read(self, engine: Engine) -> None:
        async for traj in engine.finished():
            key = (traj.group_id, engine.engine_id)
            if key in self._offsets:
                offset, left = self._offsets[key]
                traj.sample_idx += offset
                if left > 1:
                    self._offsets[key] = (offset, left - 1)
                else:
                    del self._offsets[key]
            if self.reward is not None and traj.finish_reason is not FinishReason.ABORT:
                self._spawn(self._score_then_feed(engine.engine_id, traj))
            else:
                engine_id = counted_on(self._reported_as, traj.group_id, engine.engine_id)
                self._feed(SampleFinished(self.clock(), engine_id, traj))

    async def _score_then_feed(self, engine_id: int, traj: Trajectory) -> None:
        assert self.reward is not None
        await self.reward(traj)
        self._feed(SampleFinished(self.clock(), counted_on(self._reported_as, traj.group_id, engine_id), traj))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._feed(Tick(self.clock()))

    def _forget_unused_weights(self) -> None:
        needed = {v for slot in self.scheduler.pool.engines for v in (*slot.live, *slot.loading)}
        needed.add(self.scheduler.controller.newest_version)
        for version in [v for v in self._weights if v not in needed]:
            del self._weights[version]

    # ---- task and error plumbing -------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._batch is not None and not self._batch.done():
            self._batch.set_exception(error)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the rollout driver failed earlier: {self._error!r}") from self._error

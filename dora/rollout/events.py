"""Events into and actions out of the scheduler core (`dora.rollout.scheduler.Scheduler`).

The core is a synchronous state machine with no clock: every event carries the time at which it
happened (seconds on whatever clock the driver uses: `time.monotonic()` in the asyncio driver, a
simulated clock in `dora.rollout.sim` and the tests). `Scheduler.handle(event)` returns the actions
the driver must carry out, in order.

Events: `SampleFinished`, `StepRequested`, `VersionPublished`, `EngineLoaded`, `EnginesReset`, `Tick`.
Actions: `Submit`, `Abort`, `LoadVersion`, `DropVersion`, `Migrate`, `StartStep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from dora.types import Batch, PromptGroup, Trajectory

# ---- events (driver -> core) ---------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SampleFinished:
    """An engine streamed back one trajectory (finished, length-capped or aborted). `sample_idx`
    must already be the index within the whole group (the driver adds a split chunk's offset)."""

    time: float
    engine_id: int
    trajectory: Trajectory


@dataclass(slots=True, frozen=True)
class StepRequested:
    """The trainer is ready to run `step` and wants its batch (answered by a `StartStep`)."""

    time: float
    step: int


@dataclass(slots=True, frozen=True)
class VersionPublished:
    """Train step `version - 1` finished and published its weights as `version`."""

    time: float
    version: int


@dataclass(slots=True, frozen=True)
class EngineLoaded:
    """Engine `engine_id` made `version` live (after a `LoadVersion`)."""

    time: float
    engine_id: int
    version: int


@dataclass(slots=True, frozen=True)
class EnginesReset:
    """These engines restarted and lost every version and running sequence (crash, preemption).
    Their groups are re-queued first in line; nothing is lost."""

    time: float
    engine_ids: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class Tick:
    """Timer: rebalance engines across versions and refresh wait diagnostics."""

    time: float


Event = Union[SampleFinished, StepRequested, VersionPublished, EngineLoaded, EnginesReset, Tick]

# ---- actions (core -> driver) --------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Submit:
    """Run `group` (its `num_samples` samples) on `version` on engine `engine_id`. With split
    placement `group.num_samples` is this engine's share, and its samples are the group's samples
    `sample_offset .. sample_offset + group.num_samples - 1`."""

    group: PromptGroup
    version: int
    engine_id: int
    sample_offset: int = 0


@dataclass(slots=True, frozen=True)
class Abort:
    """Stop every sample of `group_id` on these engines (they may still stream back ABORT
    trajectories, which the core discards)."""

    group_id: int
    engine_ids: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class LoadVersion:
    """Make `version` live on engine `engine_id` (answered by `EngineLoaded`)."""

    engine_id: int
    version: int


@dataclass(slots=True, frozen=True)
class DropVersion:
    """Forget `version` on engine `engine_id`. No sequence of it runs there any more, except in the
    partial-rollout baseline, where the engine's running sequences continue on its newest version."""

    engine_id: int
    version: int


@dataclass(slots=True, frozen=True)
class Migrate:
    """Move the samples of `group_id` still running on engine `src` to engine `dst`, both serving
    `version`: their generated tokens, KV cache, log-probs and routing record go along, and they
    go on decoding there as if nothing happened. The core counts all `num_samples` on `dst` from
    now on, so the driver reports a sample that finished on `src` before the move (already
    streaming back) as finished on `dst`. The core asks for it so that a single-version engine
    draining before a switch empties sooner (DORA's request migration); each trajectory still has
    one policy version."""

    group_id: int
    version: int
    src: int
    dst: int
    num_samples: int
    """How many samples of the group the core counts on `src` (running, or finished and not yet
    reported)."""


def counted_on(finished_before_move: dict[tuple[int, int], tuple[int, int]], group_id: int, engine_id: int) -> int:
    """The engine to report a finished sample of `group_id` from `engine_id` on: the destination of
    a `Migrate` if the sample finished on its source before the move and the core was not told yet.
    `finished_before_move`: (group_id, src) -> (dst, such samples not reported yet); counted down."""
    moved = finished_before_move.get((group_id, engine_id))
    if moved is None:
        return engine_id
    dst, left = moved
    if left > 1:
        finished_before_move[(group_id, engine_id)] = (dst, left - 1)
    else:
        del finished_before_move[(group_id, engine_id)]
    return dst


@dataclass(slots=True, frozen=True)
class StartStep:
    """Train step `batch.step` on `batch` (B complete groups, earliest deadline first)."""

    batch: Batch


Action = Union[Submit, Abort, LoadVersion, DropVersion, Migrate, StartStep]

"""`Scheduler`: the rollout scheduler core -- controller + pool + buffer as one event-driven state machine.

This is where admission, placement, batching, waiting and regeneration are decided (DESIGN.md,
"Version rules"). It has no clock, threads or asyncio: `handle(event)` takes an event stamped with
the driver's time and returns the actions to carry out (`dora.rollout.events`). The asyncio driver
(`dora.rollout.driver`) runs it against real engines; `dora.rollout.sim` and the tests run it
against simulated engines on a simulated clock.

Prompts come from any object with the `PromptSourceLike` protocol. A prompt whose group is aborted
(regeneration) or lost (engine reset, restore) is handed back with `requeue(prompt_id)`, and the
source must serve it before any new prompt: that is how "first in line" is implemented, and how
the prompt cursor in a checkpoint stays the single source of truth.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dora.buffer.buffer import TrajectoryBuffer
from dora.rollout.config import OnStale, RolloutConfig, RolloutMode
from dora.rollout.controller import VersionController
from dora.rollout.events import (Abort, Action, EngineLoaded, EnginesReset, Event, Migrate, SampleFinished, StartStep,
                                 StepRequested, Submit, Tick, VersionPublished)
from dora.rollout.metrics import RolloutMetrics, TrainerWait, WaitStatus
from dora.rollout.pool import Placement, RolloutPool
from dora.types import Batch, FinishReason, PromptGroup

_STATE_FORMAT = 1


class PromptSourceLike(Protocol):
    def next_group(self) -> PromptGroup | None:
        """The next prompt group (requeued prompts first), or None when the dataset is exhausted."""

    def requeue(self, prompt_id: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class GroupRecord:
    group: PromptGroup
    version: int
    seq: int
    regenerations: int
    """How often this prompt was already aborted by on_stale=regenerate."""
    placement: dict[int, int] = field(default_factory=dict)
    """engine_id -> samples of this group still running there."""
    submitted_at: float | None = None


class Scheduler:
    def __init__(self, config: RolloutConfig, source: PromptSourceLike, num_engines: int) -> None:
        self.config = config
        self.source = source
        self.n = config.group_size
        self.controller = VersionController(config.k, config.batch_groups)
        self.pool = RolloutPool(num_engines, config.max_seqs_per_engine, config.max_live_versions or 1,
                                partial_rollout=config.partial, split_groups=config.group_placement.value == "split")
        self.buffer = TrajectoryBuffer(config.group_size, partial_rollout=config.partial)
        self.metrics = RolloutMetrics()
        self.migrate = config.mode is RolloutMode.multi_version if config.migrate is None else config.migrate
        """Request migration on (the driver turns it off where an engine cannot migrate)."""
        self._records: dict[int, GroupRecord] = {}
        self._unplaced: deque[int] = deque()
        self._requeued: deque[tuple[int, int]] = deque()
        """(prompt_id, regenerations) the source will serve before any new prompt, in order."""
        self._late: dict[int, int] = {}
        """Withdrawn group -> trajectories an engine may still stream back (discarded on arrival)."""
        self._exhausted = False
        self._wave_budget = 0
        self._waiting: tuple[int, float] | None = None
        self._blocker: int | None = None
        self._blocker_version: int | None = None

    # ---- public API --------------------------------------------------------------------------

    def start(self, time: float) -> list[Action]:
        """Load the newest version on every engine and admit the first groups."""
        actions: list[Action] = list(self.pool.start(self.controller.newest_version, time))
        if self.config.waves and self.controller.next_step == 0 and not self._records:
            self._wave_budget = self.controller.slack(0)
        self._progress(time, actions)
        return actions

    def handle(self, event: Event) -> list[Action]:
        actions: list[Action] = []
        if isinstance(event, SampleFinished):
            self._on_sample(event, actions)
        elif isinstance(event, StepRequested):
            if event.step != self.controller.next_step:
                raise ValueError(f"the trainer asked for step {event.step}, but the next step is"
                                 f" {self.controller.next_step}")
            if self._waiting is not None:
                raise ValueError(f"step {event.step} requested while step {self._waiting[0]} is still waiting")
            self._waiting = (event.step, event.time)
        elif isinstance(event, VersionPublished):
            self.controller.publish(event.version)
            actions += self.pool.publish(event.version)
            if self.config.waves:
                self._wave_budget = self.controller.slack(event.version)
        elif isinstance(event, EngineLoaded):
            actions += self.pool.loaded(event.engine_id, event.version)
        elif isinstance(event, EnginesReset):
            self._on_reset(event, actions)
        elif not isinstance(event, Tick):
            raise TypeError(f"unknown event {event!r}")
        self._progress(event.time, actions)
        return actions

    @property
    def done(self) -> bool:
        """The prompt source is exhausted and every group was consumed."""
        return self._exhausted and not self._requeued and not self._records

    @property
    def num_in_flight(self) -> int:
        """Admitted, unconsumed groups (running, queued or finished): at most (k + 1) * B."""
        return self.controller.num_unconsumed

    def active_versions(self) -> list[int]:
        """Policy versions live on at least one engine now, ascending."""
        return list(self.pool.live_versions())

    def unconsumed_versions(self) -> list[int]:
        """Policy versions of the groups admitted and not yet consumed (running, queued or finished
        and waiting in the buffer), ascending: the versions the run still depends on."""
        return sorted({rec.version for rec in self._records.values()})

    def wait_status(self, time: float) -> WaitStatus | None:
        """What the trainer waits for now (None if it does not wait)."""
        if self._waiting is None:
            return None
        step, since = self._waiting
        blocker = self.controller.blocker()
        if blocker is None:
            reason = ("no group is admitted yet (engines loading or prompt source empty)" if not self._exhausted
                      else "the prompt source is exhausted")
            return WaitStatus(step, time - since, None, None, None, (), None, reason)
        rec = self._records[blocker.group_id]
        running = time - rec.submitted_at if rec.submitted_at is not None else None
        engines = tuple(sorted(e for e, c in rec.placement.items() if c > 0))
        reason = (f"{self.controller.num_finished} of {self.config.batch_groups} groups finished;"
                  f" deadline of this group is step {blocker.deadline}")
        return WaitStatus(step, time - since, blocker.group_id, rec.group.prompt_id, rec.version, engines,
                          running, reason)

    # ---- event handlers ----------------------------------------------------------------------

    def _on_sample(self, event: SampleFinished, actions: list[Action]) -> None:
        traj = event.trajectory
        rec = self._records.get(traj.group_id)
        if rec is None:
            left = self._late.get(traj.group_id)
            if left is None:
                raise ValueError(f"engine {event.engine_id} returned group {traj.group_id} sample {traj.sample_idx},"
                                 " which the scheduler never admitted or already consumed")
            self.buffer.add(traj)  # counted as discarded
            if left > 1:
                self._late[traj.group_id] = left - 1
            else:
                del self._late[traj.group_id]
            return
        running_here = rec.placement.get(event.engine_id, 0)
        if running_here == 0:
            raise ValueError(f"engine {event.engine_id} returned group {traj.group_id} sample {traj.sample_idx}, but no"
                             f" sample of that group runs there (placement {rec.placement})")
        rec.placement[event.engine_id] = running_here - 1
        actions += self.pool.release(event.engine_id, rec.version, 1, event.time)
        if traj.finish_reason is FinishReason.ABORT:
            # Not aborted by us: the engine gave up on it. Nothing is lost: the prompt goes again.
            self._withdraw(traj.group_id, event.time, actions, regenerate=False)
        elif self.buffer.add(traj):
            self.controller.finish(traj.group_id)

    def _on_reset(self, event: EnginesReset, actions: list[Action]) -> None:
        reset = set(event.engine_ids)
        lost = sorted((rec for rec in self._records.values() if any(rec.placement.get(e) for e in reset)),
                      key=lambda rec: rec.seq)
        for rec in lost:
            self._withdraw(rec.group.group_id, event.time, actions, regenerate=False, dead_engines=reset)
        for engine_id in sorted(reset):
            actions += self.pool.reset_engine(engine_id, event.time)

    # ---- decisions ---------------------------------------------------------------------------

    def _progress(self, time: float, actions: list[Action]) -> None:
        self._admit(time, actions)
        if self._try_step(time, actions):
            self._admit(time, actions)  # the step freed deadline room
        c = self.controller
        newest = c.newest_version
        # Work only the newest version may take: groups waiting for an engine (they can always run on
        # the newest version, see _place_unplaced) and requeued prompts (first in line, newest only).
        queued = {newest: (len(self._unplaced) + len(self._requeued)) * self.n}
        more = bool(self._requeued) or not self._exhausted
        fill_older = self.config.fill_older_versions and not self.config.waves

        def can_admit(version: int) -> bool:
            return more and (version == newest or fill_older) and c.can_admit(version)

        # One-step-off as published (verl's one-step-off recipe, AReaL's baseline): the engines form one
        # generation service whose weights are updated together once the wave in flight has finished.
        # Moving drained engines to the new version one by one is DORA's rebalancing, not the baseline's.
        if not (self.config.waves and self.pool.runs_older_than(newest)):
            actions += self.pool.rebalance(queued, can_admit)
        if self.migrate and self._migrate(time, actions):
            self._admit(time, actions)  # emptied engines switched; what they load takes groups once live
        self.metrics.note_live(time, self.pool.live_versions())

    def _migrate(self, time: float, actions: list[Action]) -> bool:
        """Empty draining engines by moving their groups where they fit (see `RolloutPool`)."""
        moved = False
        for src in self.pool.draining():
            e = src.engine_id
            recs = [rec for rec in self._records.values() if rec.placement.get(e)]
            shares = [(rec.group.group_id, rec.placement[e], frozenset(i for i, c in rec.placement.items() if c))
                      for rec in recs]
            plan = self.pool.plan_migration(src, shares)
            if plan is None:
                continue
            for group_id, dst in plan:
                rec = self._records[group_id]
                count = rec.placement.pop(e)
                rec.placement[dst] = count
                actions.append(Migrate(group_id, rec.version, e, dst, count))
                actions += self.pool.migrate(e, dst, rec.version, count, time)
                self.metrics.num_migrations += 1
            moved = True
        return moved

    def _admit(self, time: float, actions: list[Action]) -> None:
        c = self.controller
        newest = c.newest_version
        self._place_unplaced(time, actions)
        if self.config.waves:
            while self._requeued and c.can_admit(newest) and self._admit_one(newest, None, time, actions):
                pass
            while (self._wave_budget > 0 and not self._exhausted and c.can_admit(newest)
                   and self._admit_one(newest, None, time, actions)):
                self._wave_budget -= 1
            self._place_unplaced(time, actions)
            return
        while self._requeued or not self._exhausted:
            slot = self._find_slot(newest_only=bool(self._requeued))
            if slot is None or not self._admit_one(slot[0], slot[1], time, actions):
                return

    def _find_slot(self, newest_only: bool) -> tuple[int, Placement] | None:
        newest = self.controller.newest_version
        for version in self.pool.accepting_versions():
            if version != newest and (newest_only or not self.config.fill_older_versions):
                continue
            if self.controller.can_admit(version):
                placement = self.pool.place(version, self.n)
                if placement is not None:
                    return version, placement
        return None

    def _admit_one(self, version: int, placement: Placement | None, time: float, actions: list[Action]) -> bool:
        group = self.source.next_group()
        if group is None:
            if self._requeued:
                raise ValueError(f"the prompt source returned None although prompt {self._requeued[0][0]} was requeued")
            self._exhausted = True
            return False
        regenerations = 0
        if self._requeued:
            prompt_id, regenerations = self._requeued.popleft()
            if group.prompt_id != prompt_id:
                raise ValueError(f"the prompt source served prompt {group.prompt_id}, but prompt {prompt_id} was"
                                 " requeued: requeue() must serve requeued prompts first, in order")
        if group.num_samples != self.n:
            raise ValueError(f"prompt {group.prompt_id}: the source made a group of {group.num_samples} samples but"
                             f" rollout.group_size (n) is {self.n}")
        if group.group_id in self._records or group.group_id in self._late:
            raise ValueError(f"the prompt source reused group_id {group.group_id}")
        cg = self.controller.admit(group.group_id, version)
        rec = GroupRecord(group, version, cg.seq, regenerations)
        self._records[group.group_id] = rec
        self.buffer.open(group.group_id, group.prompt_id, version)
        self.metrics.num_admitted += 1
        self.metrics.max_in_flight = max(self.metrics.max_in_flight, self.controller.num_unconsumed)
        if placement is None:
            self._unplaced.append(group.group_id)
        else:
            self._submit(rec, placement, time, actions)
        return True

    def _submit(self, rec: GroupRecord, placement: Placement, time: float, actions: list[Action]) -> None:
        offset = 0
        for engine_id, count in placement:
            self.pool.occupy(engine_id, rec.version, count, time)
            rec.placement[engine_id] = rec.placement.get(engine_id, 0) + count
            group = rec.group if count == rec.group.num_samples else dataclasses.replace(rec.group, num_samples=count)
            actions.append(Submit(group, rec.version, engine_id, offset))
            offset += count
        rec.submitted_at = time

    def _place_unplaced(self, time: float, actions: list[Action]) -> None:
        """Place admitted groups waiting for an engine (admission waves). A waiting group whose
        version has no free engine moves to the newest version: it has not started, and a later
        deadline never breaks the invariant -- while engines holding one version never move back."""
        if not self._unplaced or not self.pool.has_room(self.n):
            return
        newest = self.controller.newest_version
        full: set[int] = set()  # versions a group did not fit on: placing more only fills engines further
        for _ in range(len(self._unplaced)):
            gid = self._unplaced.popleft()
            rec = self._records[gid]
            placement = None if rec.version in full else self.pool.place(rec.version, self.n)
            if placement is None:
                full.add(rec.version)
            if placement is None and rec.version < newest and newest not in full:
                placement = self.pool.place(newest, self.n)
                if placement is None:
                    full.add(newest)
                else:
                    self.controller.move_to_version(gid, newest)
                    self.buffer.move_to_version(gid, newest)
                    rec.version = newest
            if placement is None:
                self._unplaced.append(gid)
            else:
                self._submit(rec, placement, time, actions)

    def _withdraw(self, group_id: int, time: float, actions: list[Action], *, regenerate: bool,
                  dead_engines: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """Abort a running group and requeue its prompt first in line (nothing is lost)."""
        rec = self._records.pop(group_id)
        self.controller.withdraw(group_id)
        self.buffer.discard(group_id)
        running = {e: c for e, c in rec.placement.items() if c > 0}
        alive = tuple(sorted(e for e in running if e not in dead_engines))
        if alive:
            actions.append(Abort(group_id, alive))
            self._late[group_id] = sum(running[e] for e in alive)
        for engine_id, count in sorted(running.items()):
            released = self.pool.release(engine_id, rec.version, count, time)
            if engine_id not in dead_engines:
                actions += released
        if group_id in self._unplaced:
            self._unplaced.remove(group_id)
        self.source.requeue(rec.group.prompt_id)
        self._requeued.append((rec.group.prompt_id, rec.regenerations + int(regenerate)))
        if regenerate:
            self.metrics.num_regenerations += 1
        else:
            self.metrics.num_restarts += 1

    def _batch_size(self) -> int:
        if self._exhausted and not self._requeued:
            return min(self.config.batch_groups, self.controller.num_unconsumed)
        return self.config.batch_groups

    def _try_step(self, time: float, actions: list[Action]) -> bool:
        """Start the waiting step if its batch is ready (True if it started)."""
        if self._waiting is None:
            return False
        step, since = self._waiting
        c = self.controller
        while True:
            size = self._batch_size()
            plan = c.plan_batch(size)
            if plan is not None:
                break
            blocker = c.blocker()
            if blocker is None:
                return False
            self._blocker, self._blocker_version = blocker.group_id, blocker.version
            rec = self._records[blocker.group_id]
            if (self.config.on_stale is OnStale.regenerate and c.num_finished >= size
                    and blocker.version < c.newest_version and rec.placement
                    and rec.regenerations < self.config.max_regenerations):
                self._withdraw(blocker.group_id, time, actions, regenerate=True)
                self._admit(time, actions)
                continue
            return False
        groups = self.buffer.pop(plan)
        c.consume(plan)
        for gid in plan:
            del self._records[gid]
        for group in groups:
            for traj in group:
                self.metrics.staleness[step - traj.version] += 1
        waited = self._blocker if time > since else None
        self.metrics.waits.append(TrainerWait(step, time - since, waited,
                                              self._blocker_version if waited is not None else None))
        self.metrics.num_steps += 1
        self.metrics.queue_depths.append((time, c.num_running, c.num_finished, len(self._unplaced)))
        self._waiting = None
        self._blocker = self._blocker_version = None
        actions.append(StartStep(Batch(step, groups)))
        return True

    # ---- save / restore ----------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The scheduler's whole state as a JSON-serialisable dict plus named CPU tensors (the
        finished groups' log-probs, rewards and routing, for safetensors). Take it at a step boundary
        (between `VersionPublished` and the next `StepRequested`)."""
        if self._waiting is not None:
            raise ValueError(f"state_dict() while step {self._waiting[0]} waits for its batch: checkpoint at a step"
                             " boundary, before requesting the next step")
        buffer_state, tensors = self.buffer.state_dict()
        groups = []
        for rec in sorted(self._records.values(), key=lambda r: r.seq):
            gid = rec.group.group_id
            status = ("finished" if self.buffer.is_complete(gid) else "queued" if gid in self._unplaced else "running")
            groups.append({"group": _group_to_state(rec.group), "version": rec.version, "seq": rec.seq,
                           "regenerations": rec.regenerations, "status": status})
        state = {
            "format": _STATE_FORMAT,
            "max_staleness": self.config.k, "batch_groups": self.config.batch_groups, "group_size": self.n,
            "controller": self.controller.state_dict(),
            "source": self.source.state_dict(),
            "groups": groups,
            "requeued": [list(r) for r in self._requeued],
            "exhausted": self._exhausted,
            "wave_budget": self._wave_budget,
            "buffer": buffer_state,
            "metrics": self.metrics.state_dict(),
        }
        return state, tensors

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore into a freshly built scheduler (then call `start`). Groups that were running
        are requeued first in line and regenerated: the resumed run loses and repeats nothing."""
        if self._records or self.controller.next_step:
            raise ValueError("Scheduler.load_state_dict needs a fresh scheduler")
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"scheduler checkpoint format {state.get('format')!r}, expected {_STATE_FORMAT}")
        for key, mine in (("max_staleness", self.config.k), ("batch_groups", self.config.batch_groups),
                          ("group_size", self.n)):
            if state[key] != mine:
                raise ValueError(f"checkpoint was written with rollout.{key}={state[key]}, the config says {mine}")
        self.controller.load_state_dict(state["controller"])
        self.source.load_state_dict(state["source"])
        self.buffer.load_state_dict(state["buffer"], tensors)
        self.metrics.load_state_dict(state["metrics"])
        self._requeued = deque((int(p), int(r)) for p, r in state["requeued"])
        self._exhausted = bool(state["exhausted"])
        self._wave_budget = int(state["wave_budget"])
        for g in state["groups"]:
            group = _group_from_state(g["group"])
            if g["status"] == "running":
                self.source.requeue(group.prompt_id)
                self._requeued.append((group.prompt_id, g["regenerations"]))
                self.metrics.num_restarts += 1
                continue
            self.controller.restore_group(group.group_id, g["version"], g["seq"], g["status"] == "finished")
            self._records[group.group_id] = GroupRecord(group, g["version"], g["seq"], g["regenerations"])
            if g["status"] == "queued":
                self.buffer.open(group.group_id, group.prompt_id, g["version"])
                self._unplaced.append(group.group_id)
        if not self.controller.holds():
            raise ValueError("the checkpointed groups break the deadline invariant (corrupt checkpoint?)")


def _group_to_state(group: PromptGroup) -> dict[str, Any]:
    state = {"group_id": group.group_id, "prompt_id": group.prompt_id, "prompt_ids": list(group.prompt_ids),
             "num_samples": group.num_samples, "prompt_text": group.prompt_text, "answer": group.answer,
             "meta": group.meta}
    try:
        json.dumps(state)
    except TypeError as e:
        raise TypeError(f"group {group.group_id} (prompt {group.prompt_id}): answer and meta must be JSON-serialisable"
                        f" to be checkpointed ({e})") from None
    return state


def _group_from_state(state: dict[str, Any]) -> PromptGroup:
    return PromptGroup(**state)

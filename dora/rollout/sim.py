"""Discrete-event simulation of the scheduler core against simulated engines and a simulated trainer.

Used by the property tests (`tests/rollout/`) and by the cluster-scale simulator (`tools/simulate.py`):
the same `Scheduler` that drives real engines runs here on a simulated clock, so schedules are
fast and deterministic. No wall clock is read anywhere.

Model: each engine runs up to `max_seqs_per_engine` sequences at once, each decoding at the engine's
`speed` tokens/s regardless of load (a deliberately simple model: it isolates scheduling effects
from batching effects). Response lengths are long-tailed (Pareto), drawn from a hash of
(seed, prompt_id, group_id, sample_idx) so a restored run draws the same lengths. Loading a version
takes `load_s`; a train step takes `step_time_s` (with seeded jitter).

The simulated engines check what the core promises them: a group is only submitted on a live
version, within capacity; a version is never dropped under running sequences (except in the
partial-rollout baseline, whose sequences then continue on the newest version and report it as
their max_version).
"""

from __future__ import annotations

import heapq
import json
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dora.rollout.config import RolloutConfig
from dora.rollout.events import (Abort, Action, DropVersion, EngineLoaded, EnginesReset, LoadVersion, SampleFinished,
                                 StartStep, StepRequested, Submit, VersionPublished)
from dora.rollout.metrics import RolloutMetrics
from dora.rollout.scheduler import Scheduler
from dora.types import FinishReason, PromptGroup, Trajectory


class RangePromptSource:
    """Prompts 0..num_prompts-1 in order, then exhausted; requeued prompts first. Resumable."""

    def __init__(self, num_prompts: int, group_size: int, prompt_len: int = 4) -> None:
        self.num_prompts = num_prompts
        self.group_size = group_size
        self.prompt_len = prompt_len
        self._cursor = 0
        self._next_group_id = 0
        self._requeued: deque[int] = deque()

    def next_group(self) -> PromptGroup | None:
        if self._requeued:
            prompt_id = self._requeued.popleft()
        elif self._cursor < self.num_prompts:
            prompt_id = self._cursor
            self._cursor += 1
        else:
            return None
        group_id = self._next_group_id
        self._next_group_id += 1
        return PromptGroup(group_id, prompt_id, [1 + prompt_id % 50] * self.prompt_len, self.group_size)

    def requeue(self, prompt_id: int) -> None:
        self._requeued.append(prompt_id)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self._cursor, "next_group_id": self._next_group_id, "requeued": list(self._requeued)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cursor = state["cursor"]
        self._next_group_id = state["next_group_id"]
        self._requeued = deque(state["requeued"])


@dataclass(slots=True)
class SimWorkload:
    num_prompts: int = 32
    num_engines: int = 2
    engine_speeds: tuple[float, ...] = (100.0,)
    """Tokens/s per sequence, per engine (cycled if shorter than num_engines)."""
    min_tokens: int = 16
    tail_alpha: float = 1.2
    """Pareto shape of response lengths: smaller = longer tail."""
    max_tokens: int = 2048
    step_time_s: float = 1.0
    step_jitter: float = 0.0
    load_s: float = 0.05
    seed: int = 0

    def length(self, prompt_id: int, group_id: int, sample_idx: int) -> int:
        rng = random.Random(hash((self.seed, prompt_id, group_id, sample_idx)))
        return min(self.max_tokens, int(self.min_tokens * rng.paretovariate(self.tail_alpha)))

    def step_time(self, step: int) -> float:
        # Ints only: hashing a str would vary with PYTHONHASHSEED and break determinism.
        rng = random.Random(hash((self.seed, -1, step)))
        return self.step_time_s * (1.0 + self.step_jitter * rng.random())


@dataclass(slots=True)
class SimStep:
    step: int
    start: float
    end: float
    prompt_ids: list[int]
    group_ids: list[int]
    versions: list[int]
    """Per group: the version its trajectories report (min_version)."""
    max_versions: list[int]
    """Per group: the highest version that touched any of its trajectories."""


@dataclass(slots=True)
class _Seq:
    group: PromptGroup
    sample_idx: int
    version: int
    max_version: int
    length: int
    started: float


@dataclass(slots=True)
class SimEngine:
    engine_id: int
    speed: float
    max_seqs: int
    max_versions: int
    partial: bool
    live: set[int] = field(default_factory=set)
    running: dict[tuple[int, int], _Seq] = field(default_factory=dict)
    epoch: int = 0
    last_t: float = 0.0
    idle_s: float = 0.0
    seq_s: float = 0.0

    def account(self, t: float) -> None:
        dt = t - self.last_t
        if not self.running:
            self.idle_s += dt
        self.seq_s += len(self.running) * dt
        self.last_t = t

    def reset(self, t: float) -> None:
        self.account(t)
        self.epoch += 1
        self.live.clear()
        self.running.clear()


@dataclass(slots=True)
class SimResult:
    steps: list[SimStep]
    submits: list[tuple[float, int, int, int, int]]
    """(time, group_id, prompt_id, version, engine_id) of every submission."""
    end_time: float
    engine_idle_s: list[float]
    engine_seq_s: list[float]
    pool_idle_s: list[float]
    """Idle time per engine as the scheduler's pool accounted it (should match `engine_idle_s`)."""
    max_seqs_per_engine: int
    metrics: RolloutMetrics
    max_in_flight: int
    num_events: int

    @property
    def idle_fraction(self) -> float:
        """Mean over engines of the fraction of the run with no running sequence."""
        return sum(self.engine_idle_s) / (len(self.engine_idle_s) * self.end_time) if self.end_time else 0.0

    @property
    def utilisation(self) -> float:
        """Running sequence-seconds / (engine capacity * run time)."""
        capacity = len(self.engine_seq_s) * self.max_seqs_per_engine * self.end_time
        return sum(self.engine_seq_s) / capacity if capacity else 0.0

    def consumed(self) -> list[tuple[int, list[int]]]:
        return [(s.step, s.prompt_ids) for s in self.steps]


class SimDeadlock(RuntimeError):
    pass


def simulate(config: RolloutConfig, workload: SimWorkload, *, crash_at_step: int | None = None,
             restore_at_step: int | None = None, max_events: int = 10_000_000) -> SimResult:
    """Run every prompt of `workload` through the scheduler; raise `SimDeadlock` if the run stalls.
    `crash_at_step`: all engines reset right after version s is published. `restore_at_step`: the
    scheduler is saved there (JSON + safetensors round trip), rebuilt and resumed on fresh engines."""
    w = workload
    source = RangePromptSource(w.num_prompts, config.group_size)
    sched = Scheduler(config, source, w.num_engines)
    speeds = [w.engine_speeds[e % len(w.engine_speeds)] for e in range(w.num_engines)]
    engines = [SimEngine(e, speeds[e], config.max_seqs_per_engine, config.max_live_versions or 1, config.partial)
               for e in range(w.num_engines)]
    heap: list[tuple[float, int, str, tuple]] = []
    order = 0
    steps: list[SimStep] = []
    submits: list[tuple[float, int, int, int, int]] = []
    max_in_flight = 0

    def push(t: float, kind: str, payload: tuple) -> None:
        nonlocal order
        heapq.heappush(heap, (t, order, kind, payload))
        order += 1

    def apply(actions: list[Action], t: float) -> None:
        nonlocal max_in_flight
        max_in_flight = max(max_in_flight, sched.num_in_flight)
        for a in actions:
            if isinstance(a, Submit):
                eng = engines[a.engine_id]
                assert a.version in eng.live, f"group {a.group.group_id} submitted on version {a.version}, engine" \
                                              f" {a.engine_id} holds {sorted(eng.live)}"
                eng.account(t)
                for i in range(a.group.num_samples):
                    idx = a.sample_offset + i
                    length = max(1, w.length(a.group.prompt_id, a.group.group_id, idx))
                    eng.running[(a.group.group_id, idx)] = _Seq(a.group, idx, a.version, a.version, length, t)
                    push(t + length / eng.speed, "sample", (a.engine_id, a.group.group_id, idx, eng.epoch))
                assert len(eng.running) <= eng.max_seqs, f"engine {a.engine_id} over capacity"
                submits.append((t, a.group.group_id, a.group.prompt_id, a.version, a.engine_id))
            elif isinstance(a, Abort):
                for e in a.engine_ids:
                    eng = engines[e]
                    eng.account(t)
                    for key in [key for key in eng.running if key[0] == a.group_id]:
                        # Aborting is immediate (the slot is free at once); the ABORT record streams back.
                        push(t, "aborted", (e, eng.running.pop(key), t))
            elif isinstance(a, LoadVersion):
                push(t + w.load_s, "loaded", (a.engine_id, a.version, engines[a.engine_id].epoch))
            elif isinstance(a, DropVersion):
                eng = engines[a.engine_id]
                eng.live.discard(a.version)
                for seq in eng.running.values():
                    if seq.max_version == a.version:
                        assert eng.partial and eng.live, \
                            f"version {a.version} dropped under running sequences on engine {a.engine_id}"
                        seq.max_version = max(eng.live)
            elif isinstance(a, StartStep):
                batch = a.batch
                steps.append(SimStep(batch.step, t, t + w.step_time(batch.step),
                                     [g[0].prompt_id for g in batch.groups], [g[0].group_id for g in batch.groups],
                                     [g[0].version for g in batch.groups],
                                     [max(tr.max_version for tr in g) for g in batch.groups]))
                push(steps[-1].end, "publish", (batch.step + 1,))

    def request_next(t: float, step: int) -> None:
        if not sched.done:
            apply(sched.handle(StepRequested(t, step)), t)

    apply(sched.start(0.0), 0.0)
    request_next(0.0, 0)
    num_events = 0
    t = 0.0
    while heap:
        num_events += 1
        if num_events > max_events:
            raise SimDeadlock(f"more than {max_events} events")
        t, _, kind, payload = heapq.heappop(heap)
        if kind == "sample":
            e, gid, idx, epoch = payload
            eng = engines[e]
            seq = eng.running.get((gid, idx))
            if epoch != eng.epoch or seq is None:
                continue  # aborted or lost with a reset
            eng.account(t)
            del eng.running[(gid, idx)]
            apply(sched.handle(SampleFinished(t, e, _trajectory(seq, seq.length, FinishReason.STOP, e, t))), t)
        elif kind == "aborted":
            e, seq, aborted_at = payload
            length = max(1, int((aborted_at - seq.started) * engines[e].speed))
            apply(sched.handle(SampleFinished(t, e, _trajectory(seq, length, FinishReason.ABORT, e, t))), t)
        elif kind == "loaded":
            e, version, epoch = payload
            eng = engines[e]
            if epoch != eng.epoch:
                continue
            eng.live.add(version)
            assert len(eng.live) <= eng.max_versions or eng.partial, f"engine {e} holds {sorted(eng.live)}"
            apply(sched.handle(EngineLoaded(t, e, version)), t)
        elif kind == "publish":
            (version,) = payload
            apply(sched.handle(VersionPublished(t, version)), t)
            if version == crash_at_step:
                for eng in engines:
                    eng.reset(t)
                apply(sched.handle(EnginesReset(t, tuple(range(w.num_engines)))), t)
            if version == restore_at_step:
                sched = _round_trip(sched, config, w, t)
                for eng in engines:
                    eng.reset(t)
                apply(sched.start(t), t)
            request_next(t, version)
    if not sched.done:
        status = sched.wait_status(t)
        raise SimDeadlock(f"simulation stalled at t={t:.2f}: " + (status.describe() if status else
                                                                 "the trainer is not waiting but prompts remain"))
    for eng in engines:
        eng.account(t)
    return SimResult(steps, submits, t, [e.idle_s for e in engines], [e.seq_s for e in engines],
                     sched.pool.idle_s(t), config.max_seqs_per_engine, sched.metrics, max_in_flight, num_events)


def _trajectory(seq: _Seq, length: int, reason: FinishReason, engine_id: int, t: float) -> Trajectory:
    return Trajectory(seq.group.group_id, seq.sample_idx, seq.group.prompt_id, seq.group.prompt_ids, [0] * length,
                      torch.zeros(length), seq.version, seq.version, seq.max_version, reason, engine_id=engine_id,
                      queued_at=seq.started, finished_at=t)


def _round_trip(sched: Scheduler, config: RolloutConfig, w: SimWorkload, t: float) -> Scheduler:
    """Checkpoint as a real run would (JSON + safetensors bytes) and rebuild from it."""
    state, tensors = sched.state_dict()
    state = json.loads(json.dumps(state))
    tensors = load_safetensors(save_safetensors(tensors)) if tensors else {}
    source = RangePromptSource(w.num_prompts, config.group_size)
    restored = Scheduler(config, source, w.num_engines)
    restored.load_state_dict(state, tensors)
    return restored

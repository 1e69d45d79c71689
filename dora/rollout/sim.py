"""Discrete-event simulation of the scheduler core against simulated engines and a simulated trainer.

Used by the property tests (`tests/rollout/`) and by the cluster-scale simulator (`tools/simulate.py`;
cost models in `dora.rollout.cluster_sim`, scenarios in `dora.rollout.sim_runs`): the same `Scheduler` that drives real engines runs here on
a simulated clock, so schedules are fast and deterministic. No wall clock is read anywhere.

Engine model: an engine decodes all its running sequences together, one token each per decode step
(continuous batching), so every running sequence advances by the same number of tokens. A step
takes `DecodeCost.step_s`: a base that may depend on the batch size and on how many policy versions
the batch spans (each version's weights are read once per step), plus a term linear in the context
tokens held in the KV cache. The context grows by one token per sequence per step, so between two
events the time to decode `d` more tokens is a quadratic in `d`, solved in closed form: the engine
posts one event (its next completion), never one per token. Submitting a group stalls the engine
for its prefill (once per group: its samples share the prompt through the prefix cache). A
migrated group leaves its engine at once and joins the other one `migrate_time` later (its KV
cache in transit), keeping the tokens it generated.

`SimWorkload` is the small model the property tests use: a constant step time of 1/speed (every
sequence decodes at `speed` tokens/s regardless of load, which isolates scheduling effects from
batching effects), Pareto response lengths drawn from a hash of (seed, prompt_id, group_id,
sample_idx) so a restored run draws the same lengths, `load_s` per version load and `step_time_s`
per train step (with seeded jitter). Any object with the same methods (`SimWorkloadLike`) can be
simulated instead.

The simulated engines check what the core promises them: a group is only submitted on a live
version, within capacity; a version is never dropped under running sequences (except in the
partial-rollout baseline, whose sequences then continue on the newest version and report it as
their max_version). Simulated trajectories carry no tokens -- the driver keeps their lengths, since
a 30K-token response would otherwise cost memory for nothing.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dora.rollout.config import RolloutConfig
from dora.rollout.events import (Abort, Action, DropVersion, EngineLoaded, EnginesReset, LoadVersion, Migrate,
                                 SampleFinished, StartStep, StepRequested, Submit, VersionPublished, counted_on)
from dora.rollout.metrics import RolloutMetrics
from dora.rollout.scheduler import Scheduler
from dora.types import FinishReason, PromptGroup, Trajectory

_NO_LOGPROBS = torch.zeros(0)


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


@dataclass(slots=True, frozen=True)
class DecodeCost:
    """Seconds per decode step of one engine with `b` running sequences spanning `v` versions and
    `ctx` context tokens in its KV cache:
    `max(v * weight_read_s, b * flop_s_per_seq) + overhead_s + kv_read_s_per_token * ctx`.
    A group's prefill stalls the engine for `prefill_s_per_token * prompt tokens`."""

    weight_read_s: float = 0.0
    """Reading one version's weights from memory (the memory-bound floor of a step)."""
    flop_s_per_seq: float = 0.0
    """Compute of one token (the compute-bound slope, once the batch is large)."""
    overhead_s: float = 0.0
    """Per-step time independent of batch and versions (launches, collectives, sampling)."""
    kv_read_s_per_token: float = 0.0
    """Reading one context token's K and V (all layers) per step."""
    prefill_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        for name in ("weight_read_s", "flop_s_per_seq", "overhead_s", "kv_read_s_per_token", "prefill_s_per_token"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"DecodeCost.{name} must be >= 0, got {getattr(self, name)}")
        if self.weight_read_s + self.overhead_s + self.flop_s_per_seq <= 0:
            raise ValueError("DecodeCost: a decode step must take time (weight_read_s, overhead_s or flop_s_per_seq > 0)")

    def base_s(self, batch: int, versions: int) -> float:
        return max(versions * self.weight_read_s, batch * self.flop_s_per_seq) + self.overhead_s

    def step_s(self, batch: int, versions: int, ctx: float) -> float:
        return self.base_s(batch, versions) + self.kv_read_s_per_token * ctx


class SimWorkloadLike(Protocol):
    num_prompts: int
    num_engines: int
    prompt_len: int

    def length(self, prompt_id: int, group_id: int, sample_idx: int) -> int: ...

    def decode_cost(self, engine_id: int) -> DecodeCost: ...

    def step_time(self, step: int, tokens: int, tokens_sq: int) -> float:
        """Seconds train step `step` takes on a batch of `tokens` (prompt + response) tokens;
        `tokens_sq` is the sum over the batch's sequences of their length squared (what causal
        attention costs)."""

    def load_time(self, version: int) -> float:
        """Seconds from `LoadVersion` to the version being live on an engine (weight sync)."""

    def migrate_time(self, context_tokens: int) -> float:
        """Seconds to move running sequences holding `context_tokens` of KV cache between engines."""


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
    migrate_s: float = 0.01
    seed: int = 0
    prompt_len: int = 4

    def length(self, prompt_id: int, group_id: int, sample_idx: int) -> int:
        rng = random.Random(hash((self.seed, prompt_id, group_id, sample_idx)))
        return min(self.max_tokens, int(self.min_tokens * rng.paretovariate(self.tail_alpha)))

    def decode_cost(self, engine_id: int) -> DecodeCost:
        return DecodeCost(overhead_s=1.0 / self.engine_speeds[engine_id % len(self.engine_speeds)])

    def step_time(self, step: int, tokens: int = 0, tokens_sq: int = 0) -> float:
        # Ints only: hashing a str would vary with PYTHONHASHSEED and break determinism.
        rng = random.Random(hash((self.seed, -1, step)))
        return self.step_time_s * (1.0 + self.step_jitter * rng.random())

    def load_time(self, version: int) -> float:
        return self.load_s

    def migrate_time(self, context_tokens: int) -> float:
        return self.migrate_s


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
    tokens: int = 0
    """Prompt + response tokens of the batch (what the trainer trains on)."""


@dataclass(slots=True)
class _Seq:
    group: PromptGroup
    sample_idx: int
    version: int
    max_version: int
    length: int
    started: float
    start_progress: float
    """The engine's progress (decode steps) when this sequence joined the batch."""


@dataclass(slots=True)
class SimEngine:
    """One simulated engine: a continuous batch on a progress clock (decode steps since start)."""

    engine_id: int
    cost: DecodeCost
    max_seqs: int
    max_versions: int
    partial: bool
    live: set[int] = field(default_factory=set)
    running: dict[tuple[int, int], _Seq] = field(default_factory=dict)
    executing: dict[int, int] = field(default_factory=dict)
    """Version whose weights run the sequences -> running sequences (their max_version)."""
    targets: list[tuple[float, int, int]] = field(default_factory=list)
    """Heap of (progress at which a sequence finishes, group_id, sample_idx); stale entries skipped."""
    progress: float = 0.0
    ctx: float = 0.0
    """Context tokens (prompt + generated) of the running sequences, at `clock`."""
    clock: float = 0.0
    stall_until: float = 0.0
    stamp: int = 0
    """Bumped on every change, so a posted completion event can tell it is out of date."""
    epoch: int = 0
    incoming: int = 0
    """Migrated sequences on their way here: their slots are taken, so the engine is not idle."""
    last_t: float = 0.0
    idle_s: float = 0.0
    seq_s: float = 0.0
    decoded: float = 0.0

    def account(self, t: float) -> None:
        dt = t - self.last_t
        if not self.running and not self.incoming:
            self.idle_s += dt
        self.seq_s += len(self.running) * dt
        self.last_t = t

    def advance(self, t: float) -> None:
        """Decode up to time `t`."""
        self.account(t)
        start = max(self.clock, self.stall_until)
        if t > start and self.running:
            b = len(self.running)
            beta = self.cost.step_s(b, len(self.executing), self.ctx)
            growth = self.cost.kv_read_s_per_token * b  # d(step time)/d(step)
            tau = t - start
            # Solve tau = beta*d + growth*d^2/2 for d (stable form of the quadratic root).
            d = tau / beta if growth == 0 else 2 * tau / (beta + math.sqrt(beta * beta + 2 * growth * tau))
            self._move(d)
        self.clock = max(self.clock, t)

    def _move(self, d: float) -> None:
        b = len(self.running)
        self.progress += d
        self.ctx += b * d
        self.decoded += b * d

    def next_finish(self) -> float | None:
        """Time at which the next running sequence finishes (state must be advanced to `clock`)."""
        while self.targets and self._stale(self.targets[0]):
            heapq.heappop(self.targets)
        if not self.targets:
            return None
        d = max(0.0, self.targets[0][0] - self.progress)
        b = len(self.running)
        beta = self.cost.step_s(b, len(self.executing), self.ctx)
        return max(self.clock, self.stall_until) + beta * d + self.cost.kv_read_s_per_token * b * d * d / 2

    def _stale(self, entry: tuple[float, int, int]) -> bool:
        seq = self.running.get((entry[1], entry[2]))
        return seq is None or seq.start_progress + seq.length != entry[0]

    def pop_finished(self) -> list[_Seq]:
        """At a completion event: the sequences that reached their length (progress snaps to it)."""
        while self.targets and self._stale(self.targets[0]):
            heapq.heappop(self.targets)
        if not self.targets:
            return []
        if self.targets[0][0] > self.progress:
            self._move(self.targets[0][0] - self.progress)
        done = []
        while self.targets and self.targets[0][0] <= self.progress:
            _, gid, idx = heapq.heappop(self.targets)
            seq = self.running.get((gid, idx))
            if seq is not None and seq.start_progress + seq.length <= self.progress:
                done.append(self.remove((gid, idx)))
        return done

    def add(self, seq: _Seq, prompt_len: int, generated: float = 0.0) -> None:
        """Start decoding `seq`, which already generated `generated` tokens (a migrated sequence)."""
        seq.start_progress = self.progress - generated
        self.running[(seq.group.group_id, seq.sample_idx)] = seq
        self.executing[seq.max_version] = self.executing.get(seq.max_version, 0) + 1
        self.ctx += prompt_len + generated
        heapq.heappush(self.targets, (seq.start_progress + seq.length, seq.group.group_id, seq.sample_idx))
        self.stamp += 1

    def prefill(self, t: float, prompt_len: int) -> None:
        self.stall_until = max(self.stall_until, t) + self.cost.prefill_s_per_token * prompt_len
        self.stamp += 1

    def remove(self, key: tuple[int, int]) -> _Seq:
        seq = self.running.pop(key)
        left = self.executing[seq.max_version] - 1
        if left:
            self.executing[seq.max_version] = left
        else:
            del self.executing[seq.max_version]
        self.ctx = max(0.0, self.ctx - len(seq.group.prompt_ids) - (self.progress - seq.start_progress))
        if not self.running:
            self.ctx = 0.0
        self.stamp += 1
        return seq

    def relabel(self, dropped: int) -> None:
        """Partial rollout: sequences of the dropped version continue on the newest live one."""
        newest = max(self.live)
        for seq in self.running.values():
            if seq.max_version == dropped:
                seq.max_version = newest
                self.executing[dropped] -= 1
                self.executing[newest] = self.executing.get(newest, 0) + 1
        if not self.executing.get(dropped):
            self.executing.pop(dropped, None)
        self.stamp += 1

    def reset(self, t: float) -> None:
        self.advance(t)
        self.epoch += 1
        self.live.clear()
        self.running.clear()
        self.executing.clear()
        self.targets.clear()
        self.ctx = 0.0
        self.incoming = 0
        self.stamp += 1


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
    decoded_tokens: float = 0.0
    """Tokens decoded by all engines (including aborted and not yet trained work)."""

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


def simulate(config: RolloutConfig, workload: SimWorkloadLike, *, crash_at_step: int | None = None,
             restore_at_step: int | None = None, max_steps: int | None = None,
             max_events: int = 10_000_000) -> SimResult:
    """Run the prompts of `workload` through the scheduler; raise `SimDeadlock` if the run stalls.
    `max_steps`: stop once that many train steps finished (the prompts need not run out).
    `crash_at_step`: all engines reset right after version s is published. `restore_at_step`: the
    scheduler is saved there (JSON + safetensors round trip), rebuilt and resumed on fresh engines."""
    w = workload
    source = RangePromptSource(w.num_prompts, config.group_size, w.prompt_len)
    sched = Scheduler(config, source, w.num_engines)
    engines = [SimEngine(e, w.decode_cost(e), config.max_seqs_per_engine, config.max_live_versions or 1,
                         config.partial) for e in range(w.num_engines)]
    heap: list[tuple[float, int, str, tuple]] = []
    order = 0
    steps: list[SimStep] = []
    submits: list[tuple[float, int, int, int, int]] = []
    lengths: dict[tuple[int, int], int] = {}
    """Finished, not yet trained (group_id, sample_idx) -> response tokens."""
    touched: set[int] = set()
    in_transit: dict[tuple[int, int], list[tuple[_Seq, float]]] = {}
    """(group_id, destination engine) -> migrating sequences and the tokens they generated."""
    reported_as: dict[tuple[int, int], tuple[int, int]] = {}
    """(group_id, source engine) -> (destination, samples): finished on the source before a migration
    but not reported yet (the core counts them on the destination), as a real driver sees it."""
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
                eng.advance(t)
                prompt_len = len(a.group.prompt_ids)
                for i in range(a.group.num_samples):
                    idx = a.sample_offset + i
                    length = max(1, w.length(a.group.prompt_id, a.group.group_id, idx))
                    eng.add(_Seq(a.group, idx, a.version, a.version, length, t, 0.0), prompt_len)
                if eng.cost.prefill_s_per_token:
                    eng.prefill(t, prompt_len)
                assert len(eng.running) <= eng.max_seqs, f"engine {a.engine_id} over capacity"
                submits.append((t, a.group.group_id, a.group.prompt_id, a.version, a.engine_id))
                touched.add(a.engine_id)
            elif isinstance(a, Abort):
                for e in a.engine_ids:
                    eng = engines[e]
                    eng.advance(t)
                    for key in [key for key in eng.running if key[0] == a.group_id]:
                        # Aborting is immediate (the slot is free at once); the ABORT record streams back.
                        push(t, "aborted", (e, eng.remove(key)))
                    for seq, _ in in_transit.pop((a.group_id, e), ()):
                        eng.incoming -= 1
                        push(t, "aborted", (e, seq))
                    touched.add(e)
            elif isinstance(a, Migrate):
                src, dst = engines[a.src], engines[a.dst]
                assert a.version in src.live and a.version in dst.live, \
                    f"group {a.group_id} migrated on v{a.version} from {sorted(src.live)} to {sorted(dst.live)}"
                src.advance(t)
                dst.advance(t)
                moving = in_transit.pop((a.group_id, a.src), [])  # still on its way to src: redirected
                src.incoming -= len(moving)
                for key in [key for key in src.running if key[0] == a.group_id]:
                    seq = src.running[key]
                    moving.append((seq, src.progress - seq.start_progress))
                    src.remove(key)
                if len(moving) < a.num_samples:
                    reported_as[(a.group_id, a.src)] = (a.dst, a.num_samples - len(moving))
                assert (a.group_id, a.dst) not in in_transit
                in_transit[(a.group_id, a.dst)] = moving
                dst.incoming += len(moving)
                context = sum(len(seq.group.prompt_ids) + round(g) for seq, g in moving)
                push(t + w.migrate_time(context), "arrive", (a.dst, a.group_id, dst.epoch))
                touched.add(a.src)
            elif isinstance(a, LoadVersion):
                push(t + w.load_time(a.version), "loaded", (a.engine_id, a.version, engines[a.engine_id].epoch))
            elif isinstance(a, DropVersion):
                eng = engines[a.engine_id]
                eng.live.discard(a.version)
                if eng.executing.get(a.version):
                    assert eng.partial and eng.live, \
                        f"version {a.version} dropped under running sequences on engine {a.engine_id}"
                    eng.advance(t)
                    eng.relabel(a.version)
                    touched.add(a.engine_id)
            elif isinstance(a, StartStep):
                batch = a.batch
                seq_lens = [len(tr.prompt_ids) + lengths.pop((tr.group_id, tr.sample_idx))
                            for g in batch.groups for tr in g]
                tokens = sum(seq_lens)
                tokens_sq = sum(x * x for x in seq_lens)
                steps.append(SimStep(batch.step, t, t + w.step_time(batch.step, tokens, tokens_sq),
                                     [g[0].prompt_id for g in batch.groups], [g[0].group_id for g in batch.groups],
                                     [g[0].version for g in batch.groups],
                                     [max(tr.max_version for tr in g) for g in batch.groups], tokens))
                push(steps[-1].end, "publish", (batch.step + 1,))

    def reschedule() -> None:
        for e in touched:
            eng = engines[e]
            at = eng.next_finish()
            if at is not None:
                push(at, "engine", (e, eng.stamp, eng.epoch))
        touched.clear()

    def request_next(t: float, step: int) -> None:
        if not sched.done:
            apply(sched.handle(StepRequested(t, step)), t)

    apply(sched.start(0.0), 0.0)
    request_next(0.0, 0)
    reschedule()
    num_events = 0
    t = 0.0
    while heap:
        num_events += 1
        if num_events > max_events:
            raise SimDeadlock(f"more than {max_events} events")
        t, _, kind, payload = heapq.heappop(heap)
        if kind == "engine":
            e, stamp, epoch = payload
            eng = engines[e]
            if stamp != eng.stamp or epoch != eng.epoch:
                continue  # the batch changed since this completion was posted
            eng.advance(t)
            touched.add(e)
            for seq in eng.pop_finished():
                lengths[(seq.group.group_id, seq.sample_idx)] = seq.length
                apply(sched.handle(SampleFinished(t, counted_on(reported_as, seq.group.group_id, e),
                                                  _trajectory(seq, FinishReason.STOP, e, t))), t)
        elif kind == "arrive":
            e, group_id, epoch = payload
            moving = in_transit.pop((group_id, e), None)
            eng = engines[e]
            if moving is None or epoch != eng.epoch:
                continue  # aborted or reset on the way
            eng.advance(t)
            eng.incoming -= len(moving)
            for seq, generated in moving:
                eng.add(seq, len(seq.group.prompt_ids), generated)
            assert len(eng.running) <= eng.max_seqs, f"engine {e} over capacity after a migration"
            touched.add(e)
        elif kind == "aborted":
            e, seq = payload
            apply(sched.handle(SampleFinished(t, e, _trajectory(seq, FinishReason.ABORT, e, t))), t)
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
                in_transit.clear()
                for eng in engines:
                    eng.reset(t)
                apply(sched.handle(EnginesReset(t, tuple(range(w.num_engines)))), t)
            if version == restore_at_step:
                sched = _round_trip(sched, config, w, t)
                in_transit.clear()
                for eng in engines:
                    eng.reset(t)
                apply(sched.start(t), t)
            if max_steps is not None and version >= max_steps:
                break
            request_next(t, version)
        reschedule()
    if not sched.done and (max_steps is None or len(steps) < max_steps):
        status = sched.wait_status(t)
        raise SimDeadlock(f"simulation stalled at t={t:.2f}: " + (status.describe() if status else
                                                                 "the trainer is not waiting but prompts remain"))
    for eng in engines:
        eng.advance(t)
    return SimResult(steps, submits, t, [e.idle_s for e in engines], [e.seq_s for e in engines],
                     sched.pool.idle_s(t), config.max_seqs_per_engine, sched.metrics, max_in_flight, num_events,
                     sum(e.decoded for e in engines))


def _trajectory(seq: _Seq, reason: FinishReason, engine_id: int, t: float) -> Trajectory:
    return Trajectory(seq.group.group_id, seq.sample_idx, seq.group.prompt_id, seq.group.prompt_ids, [],
                      _NO_LOGPROBS, seq.version, seq.version, seq.max_version, reason, engine_id=engine_id,
                      queued_at=seq.started, finished_at=t)


def _round_trip(sched: Scheduler, config: RolloutConfig, w: SimWorkloadLike, t: float) -> Scheduler:
    """Checkpoint as a real run would (JSON + safetensors bytes) and rebuild from it."""
    state, tensors = sched.state_dict()
    state = json.loads(json.dumps(state))
    tensors = load_safetensors(save_safetensors(tensors)) if tensors else {}
    source = RangePromptSource(w.num_prompts, config.group_size, w.prompt_len)
    restored = Scheduler(config, source, w.num_engines)
    restored.load_state_dict(state, tensors)
    return restored

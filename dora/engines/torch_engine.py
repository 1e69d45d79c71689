"""The embedded torch engine: continuous batching over a preallocated KV cache, several live versions
in one forward pass per step, behavior log-probs and the MoE routing record. CPU and CUDA.

Where it sits: the rollout pool submits groups to an `Engine` (dora/engines/base.py) and consumes
its `finished()` stream; this is the default engine. Inside, one step is: drain submissions and
aborts -> `Scheduler.plan` (admission, decode rows, prefill chunks) -> `PackedForward.forward` ->
`sampler.sample` -> `Scheduler.commit` -> finished trajectories.

Two ways to drive it:
- `step()`: one scheduler iteration in the caller's thread, returning what finished (tests, inline).
- `start()`: a background worker thread runs steps while there is work; `finished()` (async, on the
  event loop) yields trajectories handed over with `loop.call_soon_threadsafe`. Torch never runs
  on the event-loop thread. `close()` stops the worker and ends the stream.

Threads: `submit`, `abort`, `add_version` and `drop_version` may be called from any thread. Version
weights are prepared in the caller's thread and published by swapping one reference, so the decode
loop never waits for a load; it reads the live set once per step, so a version can only appear or
disappear between steps, and `drop_version` refuses while any sequence of that version exists.
`add_version` copies tensors: from asyncio code call it as `await asyncio.to_thread(engine.add_version,
v, weights)` so the copy stays off the event loop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import random
import threading
import time
from collections.abc import AsyncIterator, Mapping

import torch

from dora.engines import ENGINES
from dora.engines.base import EngineStats, GroupHandle, TrajectoryStream, check_request
from dora.engines.config import EngineConfig
from dora.engines.kv_cache import SlotCache
from dora.engines.sampler import sample
from dora.engines.scheduler import GroupState, MigratingGroup, Scheduler, SeqState
from dora.engines.torch_forward import PackedForward
from dora.engines.versions import LiveVersions, VersionWeights, prepare_version
from dora.models.config import DTYPES, ModelConfig
from dora.types import FinishReason, PromptGroup, SamplingParams, Trajectory

_STATS_WINDOW_S = 5.0




@ENGINES.register("torch")
class TorchEngine:
    """Implements `dora.engines.base.Engine`."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig | None = None) -> None:
        self.model_config = model_config
        self.config = config = config or EngineConfig()
        if config.max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"engine.max_model_len ({config.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({model_config.max_position_embeddings})")
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.engine_id = config.engine_id
        self.max_live_versions = config.max_live_versions
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        cfg = model_config
        self.cache = SlotCache(
            num_layers=cfg.num_hidden_layers, num_slots=config.max_num_seqs, max_len=config.max_model_len,
            num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, num_moe_layers=cfg.num_moe_layers,
            top_k=cfg.num_experts_per_tok, routing_dtype=cfg.routing_dtype, dtype=self.dtype, device=self.device)
        self._forward = PackedForward(cfg, self.cache, self.dtype, self.device, config.moe_impl)
        self._scheduler = Scheduler(self.cache, config.max_num_batched_tokens, self.device, self.dtype)
        self._seed_rng = random.Random(config.seed)

        # `_lock` guards what other threads touch: the inbox, the live set, the per-version counts.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._version_lock = threading.Lock()  # serialises add/drop (held while preparing weights)
        self._live = LiveVersions.build([])
        self._inbox: list[GroupState] = []
        self._aborts: list[int] = []
        self._exports: list[tuple[int, concurrent.futures.Future[MigratingGroup | None]]] = []
        self._imports: list[MigratingGroup] = []
        self._group_remaining: dict[int, int] = {}  # group_id -> samples not yet returned
        self._active_per_version: collections.Counter[int] = collections.Counter()

        self._stream = TrajectoryStream()
        self._worker: threading.Thread | None = None
        self._closing = False
        self._worker_error: BaseException | None = None
        self._busy_s = 0.0
        self._num_generated = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        # Scheduler state as of the end of the last step, for other threads (the scheduler itself is
        # touched only by the stepping thread): (has work, running per version, waiting, slots used).
        self._snapshot: tuple[bool, dict[int, int], int, int] = (False, {}, 0, 0)

    # ------------------------------------------------------------------ versions

    def add_version(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        with self._version_lock:
            live = self._live
            if version in live:
                raise ValueError(f"version {version} is already live on engine {self.engine_id}")
            if len(live.versions) >= self.max_live_versions:
                raise ValueError(f"engine {self.engine_id} already holds max_live_versions="
                                 f"{self.max_live_versions} versions {list(live.versions)}; drop one first")
            prepared = prepare_version(self.model_config, version, weights, dtype=self.dtype, device=self.device)
            new_live = LiveVersions.build([*live.weights, prepared])
            with self._lock:
                self._live = new_live

    def drop_version(self, version: int) -> None:
        with self._version_lock:
            with self._lock:
                live = self._live
                if version not in live:
                    raise ValueError(f"version {version} is not live on engine {self.engine_id}; "
                                     f"live: {list(live.versions)}")
                if self._active_per_version[version]:
                    raise ValueError(f"cannot drop version {version}: {self._active_per_version[version]} "
                                     f"sequences of it are still waiting or running")
                kept: list[VersionWeights] = [w for w in live.weights if w.version != version]
            new_live = LiveVersions.build(kept)
            with self._lock:
                self._live = new_live

    @property
    def live_versions(self) -> list[int]:
        return list(self._live.versions)

    # ------------------------------------------------------------------ requests

    def submit(self, group: PromptGroup, version: int, sampling: SamplingParams) -> GroupHandle:
        ecfg = self.config
        check_request(group, sampling, self.model_config.vocab_size, ecfg.max_model_len)
        where = f"group {group.group_id} (prompt {group.prompt_id})"
        if group.num_samples > ecfg.max_num_seqs:
            raise ValueError(f"{where}: num_samples={group.num_samples} exceeds engine.max_num_seqs="
                             f"{ecfg.max_num_seqs} (a group's samples run together)")
        with self._lock:
            if version not in self._live:
                raise ValueError(f"{where}: version {version} is not live on engine {self.engine_id}; "
                                 f"live: {list(self._live.versions)}")
            if group.group_id in self._group_remaining:
                raise ValueError(f"{where}: group_id {group.group_id} is already running on this engine")
            base_seed = sampling.seed if sampling.seed is not None else self._seed_rng.getrandbits(62)
            self._inbox.append(GroupState(group=group, version=version, sampling=sampling, base_seed=base_seed,
                                          queued_at=time.monotonic(), stop_ids=frozenset(sampling.stop_token_ids)))
            self._group_remaining[group.group_id] = group.num_samples
            self._active_per_version[version] += group.num_samples
            self._wake.notify()
        return GroupHandle(group_id=group.group_id, version=version, engine_id=self.engine_id)

    def abort(self, group_id: int) -> None:
        """Samples come back with FinishReason.ABORT (partial responses) from the next step; a group
        this engine does not hold (unknown or already finished) is ignored."""
        with self._lock:
            if group_id in self._group_remaining:
                self._aborts.append(group_id)
                self._wake.notify()

    # ------------------------------------------------------------------ migration

    def export_group(self, group_id: int, timeout: float | None = 60.0) -> MigratingGroup | None:
        """Take the samples of `group_id` still held here out of this engine, with their KV cache,
        tokens, log-probs and routing record (None if it holds none of them: they all finished and
        stream back from here). With the background worker running, this waits for the step in
        progress to end (the worker hands the group over between two steps)."""
        if self._worker is None:
            return self._export(group_id)
        future: concurrent.futures.Future[MigratingGroup | None] = concurrent.futures.Future()
        with self._lock:
            self._exports.append((group_id, future))
            self._wake.notify()
        return future.result(timeout)

    def import_group(self, group: MigratingGroup) -> None:
        """Go on with a group another engine exported (`export_group`): same version, same samples;
        its running samples resume from their records as soon as slots are free."""
        where = f"group {group.group.group_id} (prompt {group.group.prompt_id})"
        with self._lock:
            if group.version not in self._live:
                raise ValueError(f"{where}: migrated on version {group.version}, which is not live on engine"
                                 f" {self.engine_id}; live: {list(self._live.versions)}")
            if group.group.group_id in self._group_remaining:
                raise ValueError(f"{where}: group_id {group.group.group_id} is already running on engine"
                                 f" {self.engine_id}")
            if group.num_samples:
                self._imports.append(group)
                self._group_remaining[group.group.group_id] = group.num_samples
                self._active_per_version[group.version] += group.num_samples
                self._wake.notify()

    def _export(self, group_id: int) -> MigratingGroup | None:
        """In the stepping thread: hand the group over (once the inbox and imports reached the schedule)."""
        with self._lock:
            self._take_requests()
        moving = self._scheduler.export_group(group_id)
        if moving is not None:
            with self._lock:
                self._active_per_version[moving.version] -= moving.num_samples
                left = self._group_remaining[group_id] - moving.num_samples
                assert left >= 0, f"group {group_id}: exported more samples than the engine held"
                if left:
                    self._group_remaining[group_id] = left
                else:
                    del self._group_remaining[group_id]
                self._snapshot = self._schedule_snapshot()
        return moving

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborts or self._exports or self._imports) or self._snapshot[0]

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[Trajectory]:
        """One scheduler iteration in the caller's thread -> trajectories finished in it."""
        if self._worker is not None:
            raise RuntimeError("step() cannot be called while the background worker runs (see start())")
        return self._step()

    def _step(self) -> list[Trajectory]:
        with self._lock:
            live = self._live
            aborts, self._aborts = self._aborts, []
            exports, self._exports = self._exports, []
            self._take_requests()
        sched = self._scheduler
        for group_id, future in exports:
            try:
                future.set_result(self._export(group_id))
            except BaseException as e:  # re-raised in the caller of export_group
                future.set_exception(e)
        finished: list[tuple[SeqState, FinishReason]] = []
        for group_id in aborts:
            seqs = sched.remove_group(group_id)
            finished.extend((s, FinishReason.ABORT) for s in seqs or ())

        plan = sched.plan(live)
        if plan is not None:
            t0 = time.perf_counter()
            logits_RV = self._forward.forward(live, plan.inputs)
            tokens_R, logprobs_R = sample(logits_RV, plan.sampling)
            finished.extend(sched.commit(plan, tokens_R, logprobs_R, self.config.max_model_len))
            elapsed = time.perf_counter() - t0
            self._busy_s += elapsed
            self._num_generated += len(plan.sampled)
            now = time.monotonic()
            with self._lock:
                self._recent.append((now, len(plan.sampled)))
                while self._recent and self._recent[0][0] < now - _STATS_WINDOW_S:
                    self._recent.popleft()

        trajectories = []
        for seq, reason in finished:
            trajectories.append(sched.trajectory(seq, reason, self.engine_id))
            sched.release(seq)
        with self._lock:
            for t in trajectories:
                self._active_per_version[t.version] -= 1
                assert self._active_per_version[t.version] >= 0, f"version {t.version} count went negative"
                self._group_remaining[t.group_id] -= 1
                if not self._group_remaining[t.group_id]:
                    del self._group_remaining[t.group_id]
            self._snapshot = self._schedule_snapshot()
        return trajectories

    def _take_requests(self) -> None:
        """Submitted and migrated-in groups into the schedule (stepping thread, lock held)."""
        inbox, self._inbox = self._inbox, []
        imports, self._imports = self._imports, []
        self._scheduler.waiting.extend(inbox)
        for group in imports:
            self._scheduler.import_group(group)

    def _schedule_snapshot(self) -> tuple[bool, dict[int, int], int, int]:
        sched = self._scheduler
        return sched.has_work(), sched.running_per_version(), sched.num_waiting_seqs(), sched.slots.num_used

    # ------------------------------------------------------------------ background worker + async stream

    def start(self) -> None:
        """Run steps in a background thread whenever there is work; results go to `finished()`."""
        if self._worker is not None:
            raise RuntimeError("the engine's worker is already running")
        self._closing = False
        self._worker = threading.Thread(target=self._run, name=f"dora-torch-engine-{self.engine_id}", daemon=True)
        self._worker.start()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._closing or self._inbox or self._aborts or self._exports or self._imports
                               or self._snapshot[0]):
                        self._wake.wait()
                    if self._closing:
                        return
                self._stream.put(list(self._step()))
        except BaseException as e:  # surfaced to the consumer of finished() and to close()
            self._worker_error = e
            self._stream.put([None])
            raise

    def close(self) -> None:
        """Stop the worker (running sequences stay where they are) and end the `finished()` stream."""
        worker = self._worker
        if worker is None:
            return
        with self._lock:
            self._closing = True
            self._wake.notify()
        worker.join()
        self._worker = None
        self._stream.put([None])
        if self._worker_error is not None:
            raise RuntimeError(f"engine {self.engine_id} worker failed") from self._worker_error

    async def finished(self) -> AsyncIterator[Trajectory]:
        while True:
            item = await self._stream.get()
            if item is None:
                if self._worker_error is not None:
                    raise RuntimeError(f"engine {self.engine_id} worker failed") from self._worker_error
                return
            yield item

    # ------------------------------------------------------------------ stats

    def stats(self) -> EngineStats:
        with self._lock:
            recent = list(self._recent)
            _, running, waiting, used = self._snapshot
            span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
            rate = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
            return EngineStats(
                tokens_per_s=rate, num_generated_tokens=self._num_generated, running_per_version=dict(running),
                waiting=waiting + sum(g.group.num_samples for g in self._inbox),
                kv_occupancy=used / self.cache.num_slots, live_versions=list(self._live.versions),
                busy_s=self._busy_s,
                capabilities={"routing_record": self.model_config.is_moe, "multi_version_forward": True,
                              "behavior_logprobs": True})

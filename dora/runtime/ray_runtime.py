"""The Ray runtime: engines and the trainer as Ray actors, the scheduler core in the driver.

Same `TrainLoop` as the inline runtime (loop.py); only the stages differ:

    driver process: TrainLoop + RolloutDriver (scheduler core) + RewardPool + eval engine
        RayEngineProxy x N  --submit/abort/drop (fire-and-forget), add_version, poll_finished-->  EngineActor x N
        RayTrainerHandle    --train_step / publish / weights / save / restore-->                  TrainerActor
    TrainerActor --sync channel (shm on one machine, Ray object store on a cluster)--> EngineActor (staging)

Weights never pass through the driver: `publish(v)` writes them on the sync channel and hands the
driver a `PublishedMarker`; each engine actor receives every version in the background while it
decodes and `add_version(v, marker)` only makes the staged copy live. Before publishing `v` the
handle checks that every engine received `v - 1` (normally long done: it had a whole train step),
so a channel that keeps only the newest version never makes an engine skip one it will be asked for.

Rewards stay in the driver: `RewardPool` already runs user rewards in killable worker processes,
off the event loop, so an actor would only add a hop.

Threads: every engine actor sets `torch.set_num_threads(runtime.engine_threads)`, the trainer actor
`runtime.trainer_threads`, the driver (eval engine) `runtime.engine_threads`. Actors request
fractional CPUs (`runtime.ray_engine_cpus`, `runtime.ray_trainer_cpus`), checked against the
cluster before anything starts, so a 2-core machine never waits for CPUs.

Running a recipe:

    dora-train grpo_tiny runtime=ray                       # starts a local Ray cluster (ray.init)
    dora-train grpo_tiny runtime=ray runtime.num_engines=2 runtime.ray_engine_cpus=0.5

On an existing cluster, submit the driver as a Ray job; it joins with `runtime.ray_address=auto`
(the job sets RAY_ADDRESS) and weights go through the object store (`sync=ray`, the default when
an address is set; shm only reaches processes of one machine). Tried on one machine:

    export RAY_AUTH_MODE=disabled                          # same value for `ray start` and `ray job submit`
    ray start --head --num-cpus=2 --dashboard-host=127.0.0.1
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        dora-train grpo_tiny runtime=ray runtime.ray_address=auto logging.run_dir=/abs/path/run
    ray stop                                               # stops every Ray instance on the machine

Recent Ray (2.60 here) turns token authentication on by default; both sides must agree on `RAY_AUTH_MODE`
(`disabled` for a head on a trusted machine, or keep tokens and give the submitting shell the
cluster's token). `--working-dir .` uploads the checkout (minus .gitignore'd paths) and runs the
command there, so give `logging.run_dir` an absolute path on a filesystem the trainer actor's node
can write (the trainer actor writes the checkpoints). Worker environment variables come from the
job (`--runtime-env-json '{"env_vars": {...}}'`); a local cluster gets WANDB_MODE, HF_HUB_OFFLINE
and TOKENIZERS_PARALLELISM from `ray.init`. While a `ray start` head runs, a plain `ray.init()` on
that machine joins it; dora starts its local cluster with `address="local"` so it never does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import ray
import torch

from dora.config import RunConfig
from dora.data.prompt_source import PromptSource
from dora.engines.base import EngineStats, GroupHandle
from dora.runtime.allocator import tune_malloc
from dora.runtime.components import (
    build_rewards,
    build_scheduler,
    build_tokenizer,
    engine_config,
)
from dora.runtime.loop import Stages, TrainLoop, TrainSummary
from dora.runtime.ray_actors import ENGINE_CONCURRENCY_GROUPS, EngineActor, TrainerActor
from dora.sync.base import SyncConfig
from dora.types import Batch, PromptGroup, SamplingParams, Trajectory

log = logging.getLogger(__name__)

POLL_S = 0.2
"""Longest wait of one `poll_finished` call (bounds how long closing the stream takes)."""


class PublishedMarker(Mapping[str, torch.Tensor]):
    """What `RayTrainerHandle.publish` gives the rollout driver instead of weights: the version is
    on the sync channel, the engine actors have (or will have) it staged. Holds no tensors."""

    def __init__(self, version: int, channel: str, nbytes: int) -> None:
        self.version, self.channel, self.nbytes = version, channel, nbytes

    def __getitem__(self, key: str) -> torch.Tensor:
        raise KeyError(f"version {self.version} travels on the {self.channel} channel; it holds no tensors")

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"PublishedMarker(version={self.version}, channel={self.channel!r}, nbytes={self.nbytes})"


class RayEngineProxy:
    """The `Engine` protocol in the driver, backed by an `EngineActor`."""

    def __init__(self, actor: Any, engine_id: int, max_live_versions: int, timeout_s: float) -> None:
        self.actor = actor
        self.engine_id = engine_id
        self.max_live_versions = max_live_versions
        self.timeout_s = timeout_s
        self._seq = 0
        self._pending: list[ray.ObjectRef] = []
        self._stats = EngineStats()
        self.load_s: dict[int, float] = {}
        """version -> seconds from the driver's add_version call to the version being live."""
        self.received: list[int] = []
        """Versions the actor's sync receiver delivered (known after `close`)."""

    def start(self) -> None:
        self._stats = _get(self.actor.start.remote(), self.timeout_s, f"engine {self.engine_id} to start")

    def _send(self, op: str, *args: Any) -> None:
        """Fire-and-forget: errors surface on the next poll (the driver's `finished()` reader)."""
        self._raise_failed_commands()
        self._pending.append(self.actor.command.remote(self._seq, op, args))
        self._seq += 1

    def _raise_failed_commands(self) -> None:
        if not self._pending:
            return
        ready, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        ray.get(ready)  # raises the actor's error, if any

    def submit(self, group: PromptGroup, version: int, sampling: SamplingParams) -> GroupHandle:
        self._send("submit", group, version, sampling)
        return GroupHandle(group_id=group.group_id, version=version, engine_id=self.engine_id)

    def abort(self, group_id: int) -> None:
        self._send("abort", group_id)

    def drop_version(self, version: int) -> None:
        self._send("drop_version", version)

    def add_version(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Blocks until the engine actor made `version` live (the driver calls this in a thread)."""
        if not isinstance(weights, PublishedMarker) or weights.version != version:
            raise TypeError(f"engine {self.engine_id}: add_version({version}) needs the PublishedMarker of "
                            f"version {version} from RayTrainerHandle.publish, got {weights!r}")
        start = time.monotonic()
        # Ordered after every command sent so far (a drop_version must land before the load).
        _get(self.actor.add_version.remote(version, self._seq), 2 * self.timeout_s + 30.0,
             f"engine {self.engine_id} to load version {version}")
        self.load_s[version] = time.monotonic() - start

    async def finished(self) -> AsyncIterator[Trajectory]:
        while True:
            trajectories, self._stats, ended = await self.actor.poll_finished.remote(POLL_S)
            self._raise_failed_commands()
            for traj in trajectories:
                yield traj
            if ended:
                return

    def stats(self) -> EngineStats:
        """As of the last poll (at most `POLL_S` old while the stream is read)."""
        return self._stats

    def close(self) -> None:
        try:
            self.received = _get(self.actor.close.remote(), self.timeout_s + 30.0, f"engine {self.engine_id} to close")
        except ray.exceptions.RayActorError as e:  # died earlier: that failure already reached the driver
            log.warning("engine %d: its actor was already dead at close: %s", self.engine_id, e)
            return
        self._raise_failed_commands()


class RayTrainerHandle:
    """`TrainerHandle` backed by a `TrainerActor`."""

    def __init__(self, actor: Any, engine_actors: list[Any], sync: SyncConfig, step_timeout_s: float) -> None:
        self.actor = actor
        self.engine_actors = engine_actors
        self.sync = sync
        self.step_timeout_s = step_timeout_s
        self._last_published: int | None = None
        self.publish_s: list[float] = []

    async def train_step(self, batch: Batch) -> dict[str, Any]:
        return await _wait(self.actor.train_step.remote(batch), self.step_timeout_s, f"train step {batch.step}")

    async def publish(self, version: int) -> Mapping[str, torch.Tensor]:
        if self._last_published is not None:
            previous = self._last_published
            await asyncio.gather(*(
                _wait(engine.wait_received.remote(previous, self.sync.timeout_s), self.sync.timeout_s + 30.0,
                      f"engine {i} to receive version {previous} before version {version} is published")
                for i, engine in enumerate(self.engine_actors)))
        receipt = await _wait(self.actor.publish.remote(version), self.sync.timeout_s + 30.0,
                              f"the trainer to publish version {version}")
        self._last_published = version
        self.publish_s.append(receipt["seconds"])
        return PublishedMarker(version, self.sync.channel, int(receipt["nbytes"]))

    async def weights(self) -> Mapping[str, torch.Tensor]:
        return await _wait(self.actor.weights.remote(), self.sync.timeout_s, "the trainer's weights")

    async def save(self, folder: Path) -> None:
        await _wait(self.actor.save.remote(str(folder)), self.step_timeout_s, f"the trainer to save {folder}")

    async def restore(self, folder: Path) -> None:
        await _wait(self.actor.restore.remote(str(folder)), self.step_timeout_s, f"the trainer to restore {folder}")

    def close(self) -> None:
        try:
            _get(self.actor.close.remote(), self.sync.timeout_s, "the trainer to close its sync channel")
        except ray.exceptions.RayActorError as e:  # died earlier: that failure already reached the driver
            log.warning("the trainer actor was already dead at close: %s", e)


def _get(ref: ray.ObjectRef, timeout_s: float, what: str) -> Any:
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"ray runtime: timed out after {timeout_s:g} s waiting for {what}") from None


async def _wait(ref: ray.ObjectRef, timeout_s: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(ref, timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"ray runtime: timed out after {timeout_s:g} s waiting for {what}") from None


# ---- building and running ---------------------------------------------------------------------


def ray_sync_config(cfg: RunConfig) -> SyncConfig:
    """The run's sync config: `inprocess` cannot cross processes, so it becomes `shm` on a local
    cluster and `ray` (the object store) on an existing one; the name gets a unique suffix so
    segments and board actors of two runs never collide."""
    channel = cfg.sync.channel
    if channel == "inprocess":
        channel = "ray" if cfg.runtime.ray_address else "shm"
    return dataclasses.replace(cfg.sync, channel=channel, name=f"{cfg.sync.name}-{uuid.uuid4().hex[:12]}")


def _job_env() -> dict[str, Any]:
    """Environment of a local cluster's workers. Thread counts are not here: each actor calls
    `torch.set_num_threads` itself (Ray already sets OMP_NUM_THREADS from the CPUs it requests)."""
    return {"env_vars": {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "HF_HUB_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false"}}


def check_cpus(cfg: RunConfig, have: float) -> None:
    """Actors asking for more CPUs than the cluster has would wait forever: fail now instead."""
    rt = cfg.runtime
    wanted = rt.num_engines * rt.ray_engine_cpus + rt.ray_trainer_cpus
    if wanted > have:
        raise ValueError(f"runtime: {rt.num_engines} engine actors x runtime.ray_engine_cpus={rt.ray_engine_cpus} + "
                         f"runtime.ray_trainer_cpus={rt.ray_trainer_cpus} = {wanted:g} CPUs, but the Ray cluster "
                         f"has {have:g}; lower them (fractions are fine) or add nodes")


@dataclasses.dataclass(slots=True)
class RayActors:
    """The actors of one run, so teardown can reach them whatever failed."""

    trainer: Any = None
    engines: list[Any] = dataclasses.field(default_factory=list)

    def kill_all(self) -> None:
        for actor in [*self.engines, self.trainer]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.engines, self.trainer = [], None


def build_ray_stages(cfg: RunConfig, sync: SyncConfig, actors: RayActors, timings: dict[str, float]) -> Stages:
    start = time.monotonic()
    rt = cfg.runtime
    check_cpus(cfg, ray.cluster_resources().get("CPU", 0.0))
    if rt.tune_malloc:
        tune_malloc()
    torch.set_num_threads(rt.engine_threads)
    torch.manual_seed(cfg.seed)
    # No per-actor runtime_env: such actors need workers of their own (~2 s more start-up here).
    trainer_cls = ray.remote(TrainerActor).options(num_cpus=rt.ray_trainer_cpus, max_restarts=0)
    engine_cls = ray.remote(concurrency_groups=ENGINE_CONCURRENCY_GROUPS)(EngineActor).options(
        num_cpus=rt.ray_engine_cpus, max_restarts=0)
    # Processes start in parallel: the engines import torch while the trainer builds the model.
    actors.trainer = trainer_cls.remote(cfg, sync)
    actors.engines = [engine_cls.remote(engine_config(cfg, i), sync, rt.engine_threads, rt.tune_malloc)
                      for i in range(rt.num_engines)]
    tokenizer = build_tokenizer(cfg)
    source = PromptSource(cfg.data, tokenizer)
    model_config = _get(actors.trainer.model_config.remote(), sync.timeout_s + 60.0, "the trainer actor to start")
    _get([e.build.remote(model_config, cfg.model.path) for e in actors.engines], sync.timeout_s + 60.0, "the engine actors to start")
    timings["actors_ready_s"] = time.monotonic() - start
    step_timeout = cfg.rollout.wait_timeout_s
    engines = [RayEngineProxy(actor, i, cfg.engine.max_live_versions, sync.timeout_s)
               for i, actor in enumerate(actors.engines)]
    trainer = RayTrainerHandle(actors.trainer, actors.engines, sync, step_timeout)
    return Stages(tokenizer=tokenizer, model_config=model_config, source=source,
                  scheduler=build_scheduler(cfg, source), engines=engines, rewards=build_rewards(cfg, tokenizer),
                  trainer=trainer, setup_s=time.monotonic() - start, close_hooks=[actors.kill_all])


def init_ray(cfg: RunConfig) -> bool:
    """Join `runtime.ray_address`, or start a local cluster; False if Ray was already initialised
    (by the caller, or by a Ray job's driver), so the caller knows whether to shut it down."""
    if ray.is_initialized():
        return False
    if cfg.runtime.ray_address:
        ray.init(address=cfg.runtime.ray_address, log_to_driver=True)
    else:
        # "local": a new cluster even when a `ray start` head runs on this machine (ray.init() would join it).
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 runtime_env=_job_env())
    return True


def train_ray(cfg: RunConfig, run_dir: Path) -> TrainSummary:
    """Run `cfg` with engines and trainer as Ray actors; writes `ray_runtime.json` (start-up costs,
    channel) next to the metrics."""
    timings: dict[str, float] = {}
    sync = ray_sync_config(cfg)
    if not cfg.runtime.ray_address and not ray.is_initialized():
        check_cpus(cfg, float(os.cpu_count() or 1))  # the local cluster's size, known before starting it
    start = time.monotonic()
    started_ray = init_ray(cfg)
    timings["ray_init_s"] = time.monotonic() - start
    actors = RayActors()
    try:
        stages = build_ray_stages(cfg, sync, actors, timings)
        summary = asyncio.run(TrainLoop(cfg, run_dir, stages).run())
        first_loads = [min(e.load_s.items())[1] for e in stages.engines if e.load_s]
        timings["first_load_s"] = max(first_loads, default=0.0)
        timings["startup_s"] = timings["ray_init_s"] + timings["actors_ready_s"] + timings["first_load_s"]
        report = {"sync_channel": sync.channel, "sync_name": sync.name,
                  "cluster": cfg.runtime.ray_address or ("local" if started_ray else "already initialised"),
                  **timings, "publish_s": stages.trainer.publish_s,
                  "engine_load_s": {str(e.engine_id): {str(v): s for v, s in sorted(e.load_s.items())}
                                    for e in stages.engines},
                  "engine_received": {str(e.engine_id): e.received for e in stages.engines}}
        (run_dir / "ray_runtime.json").write_text(json.dumps(report, indent=2))
        summary.extra["ray"] = report
        return summary
    finally:
        actors.kill_all()
        if started_ray:
            ray.shutdown()
        if sync.channel == "shm":  # segments of writers killed before they could unlink them
            from dora.sync.shm import cleanup_stale

            cleanup_stale(sync.name)

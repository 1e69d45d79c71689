"""The training loop, the same for every runtime: serve a version, wait for a batch, train, publish.

Lifecycle (one screen): restore (if resuming) -> serve version `start_step` -> [wait for the
batch of step s -> train -> publish version s + 1 -> log / evaluate / checkpoint] x steps -> close.

The rollout driver (scheduler core) runs on this process's asyncio loop; engines and the trainer
are whatever the runtime built (`Stages`): objects on worker threads (inline.py) or thin proxies of
Ray actors (ray_runtime.py). Generation never waits for training: while a step trains, the engines
keep decoding the groups the deadline invariant lets them hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dora.config import RunConfig, config_to_dict
from dora.data.prompt_source import PromptSource
from dora.data.tokenizer import Tokenizer
from dora.engines.config import EngineConfig
from dora.engines.torch_engine import TorchEngine
from dora.models.config import ModelConfig
from dora.rewards.pool import RewardPool
from dora.rollout.driver import RolloutDriver
from dora.rollout.scheduler import Scheduler
from dora.runtime import checkpoint as ckpt
from dora.runtime.components import group_for_reward, sampling_params
from dora.runtime.evaluate import EvalResult, evaluate
from dora.telemetry.metrics import JsonlLogger, MetricLogger, MultiLogger, WandbLogger
from dora.telemetry.progress import ProgressDisplay
from dora.telemetry.timeline import Timeline
from dora.types import Batch, Trajectory

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainSummary:
    run_dir: Path
    metrics_path: Path
    steps: int
    initial_eval: EvalResult | None
    final_eval: EvalResult | None
    max_live_versions: int
    """Most policy versions with running or unconsumed groups at the start of any step."""
    staleness: dict[int, int]
    train_wall_s: float
    """Wall time of the training loop (setup excluded)."""
    setup_s: float
    trained_tokens: int
    rollout_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


class TrainerHandle(Protocol):
    """The trainer as the loop sees it: in this process (inline) or in a Ray actor."""

    async def train_step(self, batch: Batch) -> dict[str, Any]:
        """Run one train step; its `TrainMetrics.to_dict()`."""

    async def publish(self, version: int) -> Mapping[str, torch.Tensor]:
        """Publish the current weights as `version` on the sync channel; returns what the rollout
        driver hands to `engine.add_version` (the tensors, or a handle the engine side resolves)."""

    async def weights(self) -> Mapping[str, torch.Tensor]:
        """The current policy weights in this process (for evaluation)."""

    async def save(self, folder: Path) -> None:
        """Write `folder/model` (Hugging Face layout) and the trainer state."""

    async def restore(self, folder: Path) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Stages:
    """Everything a run is made of; built by a runtime (inline.py, ray_runtime.py)."""

    tokenizer: Tokenizer
    model_config: ModelConfig
    source: PromptSource
    scheduler: Scheduler
    engines: list[Any]
    """Engine-protocol objects with `start()` / `close()`, engine_id 0..N-1."""
    rewards: RewardPool
    trainer: TrainerHandle
    setup_s: float = 0.0
    close_hooks: list[Callable[[], None]] = field(default_factory=list)


class TrainLoop:
    def __init__(self, cfg: RunConfig, run_dir: Path, stages: Stages) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.stages = stages
        self.tokenizer, self.source, self.scheduler = stages.tokenizer, stages.source, stages.scheduler
        self.engines, self.rewards, self.trainer = stages.engines, stages.rewards, stages.trainer
        self.sampling = sampling_params(cfg, self.tokenizer)
        replay = cfg.algorithm.routing_replay
        if stages.model_config.is_moe and replay is not False:
            blind = [e.engine_id for e in self.engines if not e.stats().capabilities.get("routing_record", True)]
            if blind:
                raise ValueError(f"algorithm.routing_replay is {'on' if replay else 'on by default for MoE models'}, "
                                 f"but engines {blind} cannot record routing (see their stats().capabilities); "
                                 f"set algorithm.routing_replay=false to train with the trainer's own routing")
        self.eval_groups = self.source.eval_groups()
        if cfg.eval.num_prompts:
            self.eval_groups = self.eval_groups[:cfg.eval.num_prompts]
        max_prompt = max(len(g.prompt_ids) for g in self.eval_groups)
        self.eval_engine = TorchEngine(stages.model_config, EngineConfig(
            device=cfg.engine.device, dtype=cfg.engine.dtype, max_num_seqs=cfg.engine.max_num_seqs,
            max_model_len=max(cfg.engine.max_model_len, max_prompt + cfg.eval.max_new_tokens + 1),
            max_num_batched_tokens=cfg.engine.max_num_batched_tokens, max_live_versions=1, engine_id=-1))
        self.timeline = Timeline()
        self.start_step = 0
        self._resume_from = ckpt.latest_checkpoint(Path(cfg.resume)) if cfg.resume else None
        self.metrics_path = run_dir / "metrics.jsonl"
        loggers: list[MetricLogger] = [JsonlLogger(self.metrics_path)]
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            loggers.append(WandbLogger(cfg.logging.wandb_project, run_dir, config_to_dict(cfg),
                                       mode=cfg.logging.wandb_mode, name=run_dir.name))
        self.logger = MultiLogger(loggers)
        self.progress = ProgressDisplay(cfg.steps, live=cfg.logging.progress)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        self._group_spans: dict[int, list[float]] = {}
        self._rollout_tokens = 0
        self.setup_s = stages.setup_s

    # ---- the loop --------------------------------------------------------------------------

    async def run(self) -> TrainSummary:
        cfg = self.cfg
        self.progress.print(f"dora: run folder {self.run_dir} (metrics: {self.metrics_path})")
        if self._resume_from is not None:
            await self._restore(self._resume_from)
        driver = RolloutDriver(self.scheduler, self.engines, self.sampling, reward=self._score)
        for engine in self.engines:
            engine.start()
        initial_eval = await self._evaluate(self.start_step)
        start = time.monotonic()  # the training part: the initial evaluation is not counted
        train_busy_s, engine_busy_s = 0.0, []
        final_eval = initial_eval
        trained_tokens, max_live, staleness = 0, 0, Counter()
        try:
            await driver.start(await self.trainer.publish(self.start_step))
            for step in range(self.start_step, cfg.steps):
                waited_from = time.monotonic()
                batch = await driver.next_batch(step)
                wait_s = time.monotonic() - waited_from
                live = sorted(set(batch.versions) | set(self.scheduler.unconsumed_versions()))
                max_live = max(max_live, len(live))
                step_start = self.timeline.now()
                train_started = time.monotonic()
                train = await self.trainer.train_step(batch)
                train_busy_s += time.monotonic() - train_started
                self.timeline.span("trainer", f"step {step}", step_start, self.timeline.now(), version=step)
                with self.timeline.measure("sync", f"publish v{step + 1}", version=step + 1):
                    driver.publish(step + 1, await self.trainer.publish(step + 1))
                trained_tokens += train["trained_tokens"]
                staleness.update(step - t.version for t in batch.trajectories)
                metrics = self._step_metrics(step, batch, train, live, wait_s, trained_tokens, start)
                last = step + 1 == cfg.steps
                if last or (cfg.eval.every and (step + 1) % cfg.eval.every == 0):
                    final_eval = await self._evaluate(step + 1)
                    metrics["eval_accuracy"] = final_eval.accuracy
                    metrics["eval_reward"] = final_eval.mean_reward
                # Metrics first: a checkpoint at step s + 1 then implies step s's row is on disk, so a run
                # killed right after a checkpoint and resumed from it has every step's row exactly once.
                self.logger.log(metrics, step)
                if last or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                    await self._save(step + 1)
                self.progress.update(step, metrics)
            engine_busy_s = [engine.stats().busy_s for engine in self.engines]
        finally:
            await driver.close()
            self._close()
        wall = time.monotonic() - start
        summary = TrainSummary(
            run_dir=self.run_dir, metrics_path=self.metrics_path, steps=cfg.steps - self.start_step,
            initial_eval=initial_eval, final_eval=final_eval, max_live_versions=max_live,
            staleness=dict(sorted(staleness.items())), train_wall_s=wall, setup_s=self.setup_s,
            trained_tokens=trained_tokens, rollout_tokens=self._rollout_tokens,
            extra={"rollout": self.scheduler.metrics.summary(), "reward": _reward_stats(self.rewards),
                   "trainer_busy_s": train_busy_s,
                   "engine_busy_s": engine_busy_s})
        (self.run_dir / "summary.json").write_text(json.dumps(_summary_dict(summary), indent=2))
        self.progress.print(f"dora: done in {wall:.0f} s (setup {self.setup_s:.1f} s); eval accuracy "
                            f"{_fmt(initial_eval)} -> {_fmt(final_eval)}; metrics: {self.metrics_path}")
        return summary

    def _step_metrics(self, step: int, batch: Batch, train: dict[str, Any], live: list[int], wait_s: float,
                      trained_tokens: int, start: float) -> dict[str, Any]:
        elapsed = time.monotonic() - start
        return {
            "version": step, "live_versions": live, "staleness_max": batch.max_staleness,
            "staleness_mean": sum(step - t.version for t in batch.trajectories) / len(batch.trajectories),
            "reward_mean": train["reward_mean"], "trained_tokens": trained_tokens, "wait_s": wait_s,
            "elapsed_s": elapsed, "trained_tokens_per_s": trained_tokens / max(elapsed, 1e-9),
            "rollout_tokens": self._rollout_tokens,
            "rollout_tokens_per_s": sum(e.stats().tokens_per_s for e in self.engines),
            "in_flight_groups": self.scheduler.num_in_flight,
            "response_len_mean": batch.num_tokens / len(batch.trajectories),
            "prompt_ids": [group[0].prompt_id for group in batch.groups],
            **{f"train/{k}": v for k, v in train.items() if k not in ("step", "reward_mean", "trained_tokens")},
        }

    async def _score(self, traj: Trajectory) -> None:
        await self.rewards.score_async([traj], group_for_reward(self.source, traj))
        self._rollout_tokens += traj.num_tokens
        span = self._group_spans.setdefault(traj.group_id, [traj.queued_at, traj.finished_at, 0])
        span[0], span[1], span[2] = min(span[0], traj.queued_at), max(span[1], traj.finished_at), span[2] + 1
        if span[2] == self.cfg.rollout.group_size:
            del self._group_spans[traj.group_id]
            self.timeline.span(f"engine {traj.engine_id}", f"group {traj.group_id}", self.timeline.since(span[0]),
                               self.timeline.since(span[1]), version=traj.version)

    async def _evaluate(self, version: int) -> EvalResult:
        engine = self.eval_engine
        for old in engine.live_versions:
            engine.drop_version(old)
        engine.add_version(version, await self.trainer.weights())
        with self.timeline.measure("eval", f"eval v{version}", version=version):
            return await asyncio.to_thread(evaluate, engine, version, self.eval_groups, self.tokenizer,
                                           self.cfg.reward.name, self.cfg.eval.max_new_tokens, self.cfg.reward.options)

    # ---- checkpoints -----------------------------------------------------------------------

    async def _save(self, step: int) -> Path:
        folder = ckpt.checkpoint_dir(self.run_dir, step)
        folder.mkdir(parents=True, exist_ok=True)
        await self.trainer.save(folder)
        sched_state, tensors = self.scheduler.state_dict()
        ckpt.save_state(folder, "scheduler", sched_state, tensors)
        # meta.json last: its presence marks a complete checkpoint.
        (folder / "meta.json").write_text(json.dumps({"step": step, "version": step,
                                                      "config": config_to_dict(self.cfg)}, indent=2))
        ckpt.prune(self.run_dir, self.cfg.checkpoint.keep)
        return folder

    async def _restore(self, folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        await self.trainer.restore(folder)
        sched_state, tensors = ckpt.load_state(folder, "scheduler")
        self.scheduler.load_state_dict(sched_state, tensors)
        self.start_step = int(meta["step"])
        self.progress.print(f"dora: resumed from {folder} at step {self.start_step}")

    def _close(self) -> None:
        for engine in self.engines:
            engine.close()
        self.trainer.close()
        self.rewards.close()
        for hook in self.stages.close_hooks:
            hook()
        self.logger.close()
        self.progress.close()
        if self.cfg.logging.timeline:
            self.timeline.save(self.run_dir / "timeline.json")


def _fmt(result: EvalResult | None) -> str:
    return "n/a" if result is None else f"{result.accuracy:.3f}"


def _reward_stats(pool: Any) -> dict[str, Any]:
    stats = pool.stats()
    return {"num_calls": stats.num_calls, "num_failures": dict(stats.num_failures)}


def _summary_dict(s: TrainSummary) -> dict[str, Any]:
    def ev(r: EvalResult | None) -> dict[str, Any] | None:
        return None if r is None else {"accuracy": r.accuracy, "mean_reward": r.mean_reward,
                                       "mean_response_tokens": r.mean_response_tokens, "num_prompts": r.num_prompts}
    return {"run_dir": str(s.run_dir), "steps": s.steps, "initial_eval": ev(s.initial_eval),
            "final_eval": ev(s.final_eval), "max_live_versions": s.max_live_versions,
            "staleness": {str(k): v for k, v in s.staleness.items()}, "train_wall_s": s.train_wall_s,
            "setup_s": s.setup_s, "trained_tokens": s.trained_tokens, "rollout_tokens": s.rollout_tokens,
            **s.extra}

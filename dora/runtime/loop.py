"""The inline runtime: every stage in one process, the whole training run in one screen.

Engines decode on their own worker threads, the trainer runs each step on another thread, and the
rollout driver (scheduler core) runs on the asyncio loop of the main thread — so generation keeps
going while a step trains, exactly as with the Ray runtime, but with no process boundaries
(tests, debugging, a laptop). torch's intra-op thread pool is per process: the run uses
`max(runtime.engine_threads, runtime.trainer_threads)` threads for every stage.

Lifecycle: build stages -> serve version 0 (or the resumed one) -> [wait for batch -> train ->
publish -> log / evaluate / checkpoint] x steps -> save -> tear down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dora.config import RunConfig, config_to_dict
from dora.engines.torch_engine import TorchEngine, TorchEngineConfig
from dora.models.io import save_model
from dora.rollout.driver import RolloutDriver
from dora.runtime import checkpoint as ckpt
from dora.runtime.components import (build_engines, build_model, build_rewards, build_scheduler, build_tokenizer,
                                     group_for_reward, sampling_params)
from dora.runtime.evaluate import EvalResult, evaluate
from dora.telemetry.metrics import JsonlLogger, MetricLogger, MultiLogger, WandbLogger
from dora.telemetry.progress import ProgressDisplay
from dora.telemetry.timeline import Timeline
from dora.trainer.trainer import Trainer
from dora.data.prompt_source import PromptSource
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


class InlineRun:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        setup_start = time.monotonic()
        self.cfg = cfg
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(max(cfg.runtime.engine_threads, cfg.runtime.trainer_threads))
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer(cfg)
        self.model = build_model(cfg, self.tokenizer)
        self.source = PromptSource(cfg.data, self.tokenizer)
        self.engines = build_engines(cfg, self.model.config)
        self.scheduler = build_scheduler(cfg, self.source)
        self.rewards = build_rewards(cfg, self.tokenizer)
        self.trainer = Trainer(self.model, cfg.algorithm, cfg.trainer)
        self.sampling = sampling_params(cfg, self.tokenizer)
        self.eval_groups = self.source.eval_groups()
        if cfg.eval.num_prompts:
            self.eval_groups = self.eval_groups[:cfg.eval.num_prompts]
        max_prompt = max(len(g.prompt_ids) for g in self.eval_groups)
        self.eval_engine = TorchEngine(self.model.config, TorchEngineConfig(
            device=cfg.engine.device, dtype=cfg.engine.dtype, max_num_seqs=cfg.engine.max_num_seqs,
            max_model_len=max(cfg.engine.max_model_len, max_prompt + cfg.eval.max_new_tokens + 1),
            max_num_batched_tokens=cfg.engine.max_num_batched_tokens, max_live_versions=1, engine_id=-1))
        self.timeline = Timeline()
        self.start_step = 0
        if cfg.resume:
            self._restore(ckpt.latest_checkpoint(Path(cfg.resume)))
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
        self.setup_s = time.monotonic() - setup_start

    # ---- the loop --------------------------------------------------------------------------

    async def run(self) -> TrainSummary:
        cfg = self.cfg
        self.progress.print(f"dora: run folder {self.run_dir} (metrics: {self.metrics_path})")
        driver = RolloutDriver(self.scheduler, self.engines, self.sampling, reward=self._score)
        for engine in self.engines:
            engine.start()
        start = time.monotonic()
        initial_eval = await self._evaluate(self.start_step)
        final_eval = initial_eval
        trained_tokens, max_live, staleness = 0, 0, Counter()
        try:
            await driver.start(self.trainer.publish_weights())
            for step in range(self.start_step, cfg.steps):
                waited_from = time.monotonic()
                batch = await driver.next_batch(step)
                wait_s = time.monotonic() - waited_from
                live = self.scheduler.active_versions()
                max_live = max(max_live, len(live))
                step_start = self.timeline.now()
                train = await asyncio.to_thread(self.trainer.train_step, batch)
                self.timeline.span("trainer", f"step {step}", step_start, self.timeline.now(), version=step)
                with self.timeline.measure("sync", f"publish v{step + 1}", version=step + 1):
                    driver.publish(step + 1, self.trainer.publish_weights())
                trained_tokens += train.trained_tokens
                staleness.update(step - t.version for t in batch.trajectories)
                metrics = self._step_metrics(step, batch, train.to_dict(), live, wait_s, trained_tokens, start)
                last = step + 1 == cfg.steps
                if last or (cfg.eval.every and (step + 1) % cfg.eval.every == 0):
                    final_eval = await self._evaluate(step + 1)
                    metrics["eval_accuracy"] = final_eval.accuracy
                    metrics["eval_reward"] = final_eval.mean_reward
                if last or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                    self._save(step + 1)
                self.logger.log(metrics, step)
                self.progress.update(step, metrics)
        finally:
            await driver.close()
            self._close()
        wall = time.monotonic() - start
        summary = TrainSummary(
            run_dir=self.run_dir, metrics_path=self.metrics_path, steps=cfg.steps - self.start_step,
            initial_eval=initial_eval, final_eval=final_eval, max_live_versions=max_live,
            staleness=dict(sorted(staleness.items())), train_wall_s=wall, setup_s=self.setup_s,
            trained_tokens=trained_tokens, rollout_tokens=self._rollout_tokens,
            extra={"rollout": self.scheduler.metrics.summary(), "reward": _reward_stats(self.rewards)})
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
        engine.add_version(version, self.trainer.publish_weights())
        with self.timeline.measure("eval", f"eval v{version}", version=version):
            return await asyncio.to_thread(evaluate, engine, version, self.eval_groups, self.tokenizer,
                                           self.cfg.reward.name, self.cfg.eval.max_new_tokens, self.cfg.reward.options)

    # ---- checkpoints -----------------------------------------------------------------------

    def _save(self, step: int) -> Path:
        folder = ckpt.checkpoint_dir(self.run_dir, step)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.model, folder / "model", tokenizer=self.tokenizer)
        ckpt.save_state(folder, "trainer", self.trainer.state_dict())
        sched_state, tensors = self.scheduler.state_dict()
        ckpt.save_state(folder, "scheduler", sched_state, tensors)
        (folder / "meta.json").write_text(json.dumps({"step": step, "version": step,
                                                      "config": config_to_dict(self.cfg)}, indent=2))
        ckpt.prune(self.run_dir, self.cfg.checkpoint.keep)
        return folder

    def _restore(self, folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        trainer_state, _ = ckpt.load_state(folder, "trainer")
        self.trainer.load_state_dict(trainer_state)
        sched_state, tensors = ckpt.load_state(folder, "scheduler")
        self.scheduler.load_state_dict(sched_state, tensors)
        self.start_step = int(meta["step"])
        log.info("resumed from %s at step %d", folder, self.start_step)

    def _close(self) -> None:
        for engine in self.engines:
            engine.close()
        self.rewards.close()
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


def train_inline(cfg: RunConfig, run_dir: Path) -> TrainSummary:
    return asyncio.run(InlineRun(cfg, run_dir).run())

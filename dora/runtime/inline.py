"""The inline runtime: every stage in this process.

Engines decode on their own worker threads, the trainer runs each step on another thread, and the
rollout driver runs on the main thread's asyncio loop — so generation keeps going while a step
trains, exactly as with the Ray runtime, without process boundaries (tests, debugging, a laptop).
Weights go to the engines in-process (the tensors themselves; each engine stages its own copy).
torch's intra-op thread pool is per process: the run uses `max(runtime.engine_threads,
runtime.trainer_threads)` threads for every stage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dora.config import RunConfig
from dora.data.prompt_source import PromptSource
from dora.data.tokenizer import Tokenizer
from dora.models.io import save_model
from dora.models.model import DecoderLM
from dora.runtime.allocator import tune_malloc
from dora.runtime import checkpoint as ckpt
from dora.runtime.components import build_engines, build_model, build_rewards, build_scheduler, build_tokenizer
from dora.runtime.loop import Stages, TrainLoop, TrainSummary
from dora.trainer.trainer import Trainer
from dora.types import Batch


class LocalTrainer:
    """`TrainerHandle` around a `Trainer` in this process; steps run on a worker thread."""

    def __init__(self, trainer: Trainer, model: DecoderLM, tokenizer: Tokenizer) -> None:
        self.trainer, self.model, self.tokenizer = trainer, model, tokenizer

    async def train_step(self, batch: Batch) -> dict[str, Any]:
        return (await asyncio.to_thread(self.trainer.train_step, batch)).to_dict()

    async def publish(self, version: int) -> Mapping[str, torch.Tensor]:
        return self.trainer.publish_weights()

    async def weights(self) -> Mapping[str, torch.Tensor]:
        return self.trainer.publish_weights()

    async def save(self, folder: Path) -> None:
        save_model(self.model, folder / "model", tokenizer=self.tokenizer)
        ckpt.save_state(folder, "trainer", self.trainer.state_dict())

    async def restore(self, folder: Path) -> None:
        state, _ = ckpt.load_state(folder, "trainer")
        self.trainer.load_state_dict(state)

    def close(self) -> None:
        pass


def build_inline_stages(cfg: RunConfig) -> Stages:
    start = time.monotonic()
    if cfg.runtime.tune_malloc:
        tune_malloc()  # before any stage starts a thread
    torch.set_num_threads(max(cfg.runtime.engine_threads, cfg.runtime.trainer_threads))
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    source = PromptSource(cfg.data, tokenizer)
    trainer = Trainer(model, cfg.algorithm, cfg.trainer)
    return Stages(tokenizer=tokenizer, model_config=model.config, source=source,
                  scheduler=build_scheduler(cfg, source), engines=build_engines(cfg, model.config),
                  rewards=build_rewards(cfg, tokenizer), trainer=LocalTrainer(trainer, model, tokenizer),
                  setup_s=time.monotonic() - start)


def train_inline(cfg: RunConfig, run_dir: Path) -> TrainSummary:
    return asyncio.run(TrainLoop(cfg, run_dir, build_inline_stages(cfg)).run())

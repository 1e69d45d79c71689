"""Build the stages of a run from a `RunConfig`: tokenizer, model, prompt source, rewards, engines,
scheduler, trainer. Both runtimes (inline, Ray) start from these builders, so a stage is configured
the same way wherever it lives.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

from dora.config import RunConfig
from dora.data.prompt_source import PromptSource
from dora.data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer
from dora.engines.base import Engine
from dora.engines.config import EngineConfig, EngineKind
from dora.engines.torch_engine import TorchEngine
from dora.engines.vllm_engine import VllmEngine
from dora.models.config import ModelConfig
from dora.models.io import load_model
from dora.models.model import DecoderLM
from dora.paths import REPO_ROOT, resolve_path  # noqa: F401  (REPO_ROOT: re-exported for callers)
from dora.rewards.pool import RewardPool
from dora.rollout.scheduler import Scheduler
from dora.types import PromptGroup, SamplingParams, Trajectory

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tokenizer(cfg: RunConfig) -> Tokenizer:
    if cfg.model.path:
        folder = resolve_path(cfg.model.path)
        if any((folder / name).exists() for name in _TOKENIZER_FILES):
            return load_tokenizer(folder)
        raise ValueError(f"model.path {folder} has no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    return CharTokenizer()


def build_model(cfg: RunConfig, tokenizer: Tokenizer) -> DecoderLM:
    if cfg.model.path:
        folder = resolve_path(cfg.model.path)
        if not (folder / "config.json").exists():
            raise ValueError(f"model.path {folder} is not a model folder (no config.json)")
        model = load_model(folder, device=cfg.trainer.device)
    else:
        preset = getattr(ModelConfig, cfg.model.preset)(vocab_size=tokenizer.vocab_size)
        model = DecoderLM.from_config(preset.with_tokenizer(tokenizer), seed=cfg.model.seed, device=cfg.trainer.device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}")
    model.activation_checkpointing = cfg.model.activation_checkpointing
    return model


def sampling_params(cfg: RunConfig, tokenizer: Tokenizer) -> SamplingParams:
    s = cfg.sampling
    return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          stop_token_ids=(tokenizer.eos_token_id,), seed=None)


def engine_config(cfg: RunConfig, engine_id: int) -> EngineConfig:
    """Engine `engine_id`'s config; its seed depends on the run seed and the engine id only, so
    both runtimes sample the same tokens."""
    return dataclasses.replace(cfg.engine, engine_id=engine_id, seed=cfg.seed * 1000 + engine_id, num_threads=None)


def build_engine(config: EngineConfig, model_config: ModelConfig, model_path: str = "") -> Engine:
    """The engine `config.kind` names. vLLM serves a model folder (`model.path`); the torch engine only
    needs the architecture (weights arrive with the first version)."""
    if config.kind is EngineKind.vllm:
        if not model_path:
            raise ValueError("engine.kind=vllm serves a model folder: set model.path (a preset model has none)")
        return VllmEngine(resolve_path(model_path), config, model_config)
    return TorchEngine(model_config, config)


def build_engines(cfg: RunConfig, model_config: ModelConfig) -> list[Engine]:
    """All engines. vLLM replicas on the CPU start their engine processes concurrently (each takes
    seconds); on a GPU one after another, since each sizes its KV cache from the memory left free."""
    configs = [engine_config(cfg, i) for i in range(cfg.runtime.num_engines)]
    if cfg.engine.kind is not EngineKind.vllm or cfg.engine.device != "cpu":
        return [build_engine(c, model_config, cfg.model.path) for c in configs]
    with concurrent.futures.ThreadPoolExecutor(len(configs)) as pool:
        futures = [pool.submit(build_engine, c, model_config, cfg.model.path) for c in configs]
        concurrent.futures.wait(futures)
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for f in futures:
            if f.exception() is None:
                f.result().close()
        raise failed[0]
    return [f.result() for f in futures]


def build_scheduler(cfg: RunConfig, source: PromptSource) -> Scheduler:
    return Scheduler(cfg.rollout, source, cfg.runtime.num_engines)


def group_for_reward(source: PromptSource, traj: Trajectory) -> PromptGroup:
    """The answer and metadata a reward needs for `traj`, from the dataset row (stable prompt_id)."""
    row = source.row(traj.prompt_id)
    return PromptGroup(group_id=traj.group_id, prompt_id=traj.prompt_id, prompt_ids=traj.prompt_ids,
                       answer=row.answer, meta=dict(row.meta), prompt_text=row.prompt)


def build_rewards(cfg: RunConfig, tokenizer: Tokenizer) -> RewardPool:
    return RewardPool(cfg.reward, tokenizer)

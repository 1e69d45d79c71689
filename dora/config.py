"""The run configuration: one typed dataclass per stage, composed by Hydra from `conf/` and a recipe.

`RunConfig` is the schema of the whole composed config (stored in Hydra's ConfigStore as
`dora_schema`); each field is one `conf/<group>/` folder. The stage configs live next to the class
they configure (`DataConfig` in dora/data, `RolloutConfig` in dora/rollout, ...); the ones that belong
to no single stage (model choice, sampling, runtime, evaluation, checkpoints, logging) live here.

`to_run_config` converts the composed DictConfig with `OmegaConf.to_object`, so every
`__post_init__` check runs before anything is built; a wrong key, type or value fails naming it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dora.data.config import DataConfig
from dora.engines.config import EngineConfig, EngineKind
from dora.registry import parse_enum
from dora.rewards.pool import RewardConfig
from dora.rollout.config import RolloutConfig
from dora.sync.base import SyncConfig
from dora.trainer.config import AlgorithmConfig, TrainerConfig

MODEL_PRESETS = ("tiny", "bench7m")


@dataclass(slots=True)
class ModelSpec:
    path: str = ""
    """A local model folder in Hugging Face layout (config.json + safetensors [+ tokenizer]).
    Relative paths are relative to the repository root. Empty = a fresh `preset`."""
    preset: str = "tiny"
    """Architecture of a freshly initialised model when `path` is empty: one of MODEL_PRESETS."""
    seed: int = 0
    """Initialisation seed of a preset model."""
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not self.path and self.preset not in MODEL_PRESETS:
            raise ValueError(f"model.preset must be one of {list(MODEL_PRESETS)} (or set model.path), got {self.preset!r}")


@dataclass(slots=True)
class SamplingConfig:
    """How rollout samples; the trainer uses the same temperature (see dora.types.SamplingParams)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0 for RL sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")


class RuntimeKind(str, enum.Enum):
    inline = "inline"
    """Every stage in this process: engines on worker threads, the trainer on another."""
    local = "local"
    """As inline, with the trainer in a child process: no interpreter lock shared with the engines."""
    ray = "ray"
    """Engines, trainer and reward workers as Ray actors (a local cluster or `ray job submit`)."""


@dataclass(slots=True)
class RuntimeConfig:
    kind: RuntimeKind = RuntimeKind.inline
    num_engines: int = 1
    engine_threads: int = 1
    """torch threads of each engine (its own thread or actor)."""
    trainer_threads: int = 1
    """torch threads of the trainer."""
    ray_address: str = ""
    """Empty: start a local Ray cluster (`ray.init()`); "auto" or an address: join that cluster."""
    ray_engine_cpus: float = 1.0
    """CPUs each engine actor requests (fractional, so a 2-core machine never hangs)."""
    ray_trainer_cpus: float = 1.0
    tune_malloc: bool = True
    """Keep freed tensor memory mapped (glibc malloc settings, `dora.runtime.allocator`): saves the
    page faults that otherwise cost up to 1.5 s per train step on CPU."""

    def __post_init__(self) -> None:
        self.kind = parse_enum(RuntimeKind, self.kind, "runtime.kind")
        for key in ("num_engines", "engine_threads", "trainer_threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"runtime.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("ray_engine_cpus", "ray_trainer_cpus"):
            if not getattr(self, key) > 0:
                raise ValueError(f"runtime.{key} must be > 0, got {getattr(self, key)}")


@dataclass(slots=True)
class EvalConfig:
    every: int = 10
    """Evaluate every this many train steps (and after the last); 0 = only before and after."""
    max_new_tokens: int = 128
    num_prompts: int = 0
    """Held-out prompts to use; 0 = all of them."""

    def __post_init__(self) -> None:
        for key in ("every", "num_prompts"):
            if getattr(self, key) < 0:
                raise ValueError(f"eval.{key} must be >= 0, got {getattr(self, key)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(slots=True)
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (and at the end); 0 = only at the end."""
    keep: int = 2
    """Checkpoints kept on disk (oldest removed first)."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ValueError(f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got {self.every}, {self.keep}")


@dataclass(slots=True)
class LoggingConfig:
    run_dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    """Run folder: metrics.jsonl, timeline.json, checkpoints, resolved config."""
    wandb: bool = True
    wandb_project: str = "dora"
    wandb_mode: str = "offline"
    """offline (default), online, disabled; WANDB_MODE in the environment wins."""
    timeline: bool = True
    progress: bool | None = None
    """Live progress bar; None = when stdout is a terminal (plain lines otherwise)."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")


@dataclass(slots=True)
class RunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    steps: int = 100
    """Train steps (= policy versions published) in this run."""
    seed: int = 0
    resume: str = ""
    """A checkpoint folder of an earlier run to continue from."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.data.n != self.rollout.group_size:
            raise ValueError(f"data.n ({self.data.n}) and rollout.group_size ({self.rollout.group_size}) must agree "
                             "(conf/ sets data.n to ${rollout.group_size}; override rollout.group_size)")
        if abs(self.algorithm.temperature - self.sampling.temperature) > 1e-12:
            raise ValueError(f"algorithm.temperature ({self.algorithm.temperature}) must equal sampling.temperature "
                             f"({self.sampling.temperature}): the trainer's log-probs must match the engine's")
        if self.engine.kind is EngineKind.vllm and not self.model.path:
            raise ValueError("engine.kind=vllm serves a model folder: set model.path (a preset model has none)")


ConfigStore.instance().store(name="dora_schema", node=RunConfig)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve and convert the composed config; errors name the key (Hydra/OmegaConf or __post_init__)."""
    try:
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ValueError(f"invalid config: {e}") from None
    assert isinstance(run, RunConfig), type(run)
    return run


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-able dict of a RunConfig (for wandb, the run folder and config diffs)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]

"""Engine configuration (`conf/engine/`): which engine serves rollouts, and its settings.

`kind` picks the engine: "torch", dora's embedded engine (dora/engines/torch_engine.py; CPU and CUDA,
several versions in one forward pass), or "vllm" (dora/engines/vllm_engine.py; one full-weight version
per engine replica). The sizing fields mean the same for both (vLLM's arguments of the same names);
`vllm` holds what only vLLM has.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore

from dora.engines.experts import MOE_IMPLS
from dora.models.config import DTYPES
from dora.registry import parse_enum


class EngineKind(str, enum.Enum):
    torch = "torch"
    vllm = "vllm"


@dataclass(slots=True)
class VllmOptions:
    """Settings only the vLLM engine reads (vLLM's `AsyncEngineArgs` of the same names, and dora's own)."""

    gpu_memory_utilization: float = 0.5
    """Share of the GPU vLLM may take (weights + KV cache); the rest is the trainer's when both share a
    device (recipes/grpo_qwen_1gpu.yaml)."""
    kv_cache_memory_bytes: int | None = None
    """KV-cache size in bytes; overrides gpu_memory_utilization. On CPU, None means 256 MiB (vLLM's own
    CPU default reserves many GiB and takes tens of seconds to start)."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: fast start. False for long GPU runs."""
    enable_prefix_caching: bool = True
    """A group's n samples share their prompt's KV."""
    return_routed_experts: bool | None = None
    """Ask vLLM for the routing record (MoE models). None = on for MoE models; where the installed vLLM
    cannot return it, the engine says so in stats().capabilities and trajectories carry no routing."""
    update_bucket_mb: int = 256
    """A weight update crosses into vLLM's engine process in safetensors buckets of about this size."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Extra `vllm.AsyncEngineArgs` keyword arguments, passed through as given."""

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"engine.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"engine.vllm.kv_cache_memory_bytes must be >= 1 or null, got {self.kv_cache_memory_bytes}")
        if self.update_bucket_mb < 1:
            raise ValueError(f"engine.vllm.update_bucket_mb must be >= 1, got {self.update_bucket_mb}")


@dataclass(slots=True)
class EngineConfig:
    kind: EngineKind = EngineKind.torch
    """"torch" (embedded) or "vllm"."""
    device: str = "cpu"
    """"cpu", "cuda" or "cuda:N"."""
    dtype: str = "float32"
    """float32, bfloat16 or float16 (weights, activations and KV cache)."""
    max_num_seqs: int = 64
    """Sequences decoding at once (the torch engine's KV-cache slots)."""
    max_model_len: int = 1024
    """Positions per sequence: prompt + response tokens."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: decodes first, the rest prefill chunks. Must be >= max_num_seqs."""
    max_live_versions: int = 2
    """Versions one engine holds at once (the vLLM engine holds exactly 1)."""
    num_threads: int | None = None
    """torch.set_num_threads at construction (None leaves the process setting alone)."""
    seed: int = 0
    """Draws the base seed of groups submitted without `SamplingParams.seed`."""
    engine_id: int = 0
    moe_impl: str = "auto"
    """Torch engine MoE experts (see dora/engines/experts.py): "auto", "grouped", "padded", "loop" or
    "ops" (the trainer's `dora.models.ops.moe_experts`, the reference)."""
    vllm: VllmOptions = field(default_factory=VllmOptions)

    def __post_init__(self) -> None:
        self.kind = parse_enum(EngineKind, self.kind, "engine.kind")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"engine.moe_impl must be one of {list(MOE_IMPLS)}, got {self.moe_impl!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"engine.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"engine.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"engine.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for key in ("max_num_seqs", "max_model_len", "max_live_versions"):
            if getattr(self, key) < 1:
                raise ValueError(f"engine.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_model_len < 2:
            raise ValueError(f"engine.max_model_len must be >= 2 (a prompt token and a response token), "
                             f"got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"engine.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"engine.max_num_seqs ({self.max_num_seqs}) so prefill always gets budget")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"engine.num_threads must be >= 1 or None, got {self.num_threads}")
        if self.kind is EngineKind.vllm and self.max_live_versions != 1:
            raise ValueError(f"engine.max_live_versions must be 1 with engine.kind=vllm (a vLLM engine holds one "
                             f"full-weight version; versions switch per replica), got {self.max_live_versions}")


ConfigStore.instance().store(group="engine", name="engine_schema", node=EngineConfig)

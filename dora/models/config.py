"""Architecture of the built-in decoder (`ModelConfig`) and its Hugging Face `config.json` form.

One dataclass describes every model dora can build or load: the Qwen3-MoE-style decoder dora
trains by default, and the dense Qwen3 / Qwen2 / Llama checkpoints it can load from a local folder.
The model (`dora.models.model`), the engines and the folder IO (`dora.models.io`) all read it.

`from_hf_dict` / `to_hf_dict` translate to and from the `config.json` that transformers (5.x)
writes for `Qwen3MoeForCausalLM`, `Qwen3ForCausalLM`, `Qwen2ForCausalLM` and `LlamaForCausalLM`,
so a folder saved by dora loads in transformers and vLLM, and theirs load in dora.
"""

from __future__ import annotations

import enum
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


class ModelType(str, enum.Enum):
    QWEN3_MOE = "qwen3_moe"
    QWEN3 = "qwen3"
    QWEN2 = "qwen2"
    LLAMA = "llama"
    # OmegaConf converts YAML strings to enums by member *name*; these aliases let a config say
    # `model_type: qwen3_moe` (Hugging Face's spelling) as well as `QWEN3_MOE`.
    qwen3_moe = "qwen3_moe"
    qwen3 = "qwen3"
    qwen2 = "qwen2"
    llama = "llama"


ARCHITECTURES = {
    ModelType.QWEN3_MOE: "Qwen3MoeForCausalLM",
    ModelType.QWEN3: "Qwen3ForCausalLM",
    ModelType.QWEN2: "Qwen2ForCausalLM",
    ModelType.LLAMA: "LlamaForCausalLM",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Per model type, the attention flags transformers hard-wires (None = taken from `attention_bias`):
# (q/k rms-norm, q/k/v bias, o_proj bias).
_ATTENTION_LAYOUT: dict[ModelType, tuple[bool, bool | None, bool | None]] = {
    ModelType.QWEN3_MOE: (True, None, None),
    ModelType.QWEN3: (True, None, None),
    ModelType.QWEN2: (False, True, False),
    ModelType.LLAMA: (False, None, None),
}


@dataclass(slots=True)
class ModelConfig:
    """Decoder architecture. Field names follow Hugging Face's `config.json` where one exists."""

    model_type: ModelType = ModelType.QWEN3_MOE
    vocab_size: int = 128
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    """Hidden width of the dense SwiGLU FFN (dense layers and dense models)."""
    moe_intermediate_size: int = 128
    """Hidden width of one expert."""
    num_experts: int = 8
    """Experts per MoE layer; 0 = dense model."""
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    """Renormalise the top-k router probabilities to sum to 1 (Qwen3-MoE checkpoints: True)."""
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    """Layer indices that use the dense FFN even in a MoE model."""
    qk_norm: bool | None = None
    """RMSNorm on each query/key head (Qwen3). None = the model type's rule."""
    attention_bias: bool | None = None
    """Bias on q/k/v projections (always on for Qwen2). None = the model type's rule (False)."""
    attention_out_bias: bool | None = None
    """Bias on o_proj (Qwen3/Llama tie it to `attention_bias`; Qwen2 never has it). None = rule."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    """Every id that ends generation (HF `eos_token_id`, an int or a list)."""
    pad_token_id: int | None = None
    dtype: str = "float32"
    """Parameter dtype name: float32, bfloat16 or float16."""
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        try:
            self.model_type = ModelType(self.model_type)
        except ValueError:
            raise ValueError(f"model.model_type must be one of {[t.value for t in ModelType]}, "
                             f"got {self.model_type!r}") from None
        self._resolve_attention_layout()
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "decoder_sparse_step",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"model.num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts < 0:
            raise ValueError(f"model.num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        if self.num_experts and self.model_type is not ModelType.QWEN3_MOE:
            raise ValueError(f"model.num_experts must be 0 for model_type {self.model_type.value!r} "
                             f"(only qwen3_moe has experts), got {self.num_experts}")
        if self.num_experts == 0:
            # Meaningless for a dense model; zeroed so equal architectures compare equal.
            self.num_experts_per_tok = self.moe_intermediate_size = 0
        else:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"model.num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                 f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"model.moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            raise ValueError(f"model.mlp_only_layers {bad_layers} are outside [0, {self.num_hidden_layers})")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        bad_ids = {k: v for k, v in (("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id))
                   if v is not None and not 0 <= v < self.vocab_size}
        bad_ids.update({"eos_token_ids": i for i in self.eos_token_ids if not 0 <= i < self.vocab_size})
        if bad_ids:
            raise ValueError(f"model token ids {bad_ids} are outside the vocabulary [0, {self.vocab_size})")

    def _resolve_attention_layout(self) -> None:
        qk_norm, qkv_bias, out_bias = _ATTENTION_LAYOUT[self.model_type]
        if self.qk_norm is None:
            self.qk_norm = qk_norm
        if self.attention_bias is None:
            self.attention_bias = False if qkv_bias is None else qkv_bias
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias if out_bias is None else out_bias
        # A folder must mean the same thing to transformers as to dora, so flags that transformers
        # fixes per architecture cannot be overridden.
        expected = (qk_norm, self.attention_bias if qkv_bias is None else qkv_bias,
                    self.attention_bias if out_bias is None else out_bias)
        found = (self.qk_norm, self.attention_bias, self.attention_out_bias)
        if found != expected:
            raise ValueError(
                f"model_type {self.model_type.value!r} requires (qk_norm, attention_bias, attention_out_bias) "
                f"= {expected}, got {found}")

    # ----------------------------------------------------------------- layer layout

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Hugging Face Qwen3-MoE's rule for which decoder layers hold experts."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layer_ids(self) -> list[int]:
        """Indices of the MoE layers, in order; position l in a routing record is layer moe_layer_ids[l]."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_layers > 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def routing_dtype(self) -> torch.dtype:
        """Compact integer dtype of a routing record (uint8 up to 256 experts, as types.Trajectory)."""
        return torch.uint8 if self.num_experts <= 256 else torch.int16

    def replace(self, **overrides: Any) -> ModelConfig:
        return dataclasses.replace(self, **overrides)

    def with_tokenizer(self, tokenizer: Any) -> ModelConfig:
        """This config with the tokenizer's bos/eos/pad ids (written to config.json, so transformers
        and vLLM stop on the same eos); an error if the tokenizer has more ids than the vocabulary."""
        if tokenizer.vocab_size > self.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than "
                             f"model.vocab_size ({self.vocab_size})")
        eos = tokenizer.eos_token_id
        return dataclasses.replace(self, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                       eos_token_ids=[] if eos is None else [eos])

    # ----------------------------------------------------------------- presets

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A ~1.8M-parameter MoE for tests and CPU RL (char-level vocab; head_dim 32 for vLLM CPU)."""
        base: dict[str, Any] = dict(
            vocab_size=128, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, max_position_embeddings=1024,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def bench7m(cls, **overrides: Any) -> ModelConfig:
        """A ~7M-parameter MoE (4 layers, 8 experts, top-2, head_dim 64) for the engine benchmark."""
        base: dict[str, Any] = dict(
            vocab_size=128, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, intermediate_size=512, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, max_position_embeddings=2048,
        )
        return cls(**{**base, **overrides})

    # ----------------------------------------------------------------- Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Read a transformers `config.json` dict (Qwen3-MoE, Qwen3, Qwen2 or Llama)."""
        model_type = d.get("model_type")
        if model_type not in {t.value for t in ModelType}:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                             f"supported: {[t.value for t in ModelType]}")
        mt = ModelType(model_type)
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        unsupported = []
        if d.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={d['hidden_act']!r} (only 'silu')")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            unsupported.append(f"rope_type={rope_type!r} (only 'default')")
        if d.get("use_sliding_window"):
            unsupported.append("use_sliding_window=true")
        if d.get("mlp_bias"):
            unsupported.append("mlp_bias=true")
        if unsupported:
            raise ValueError(f"{source}: unsupported settings: {', '.join(unsupported)}")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        kwargs: dict[str, Any] = dict(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            intermediate_size=d["intermediate_size"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            pad_token_id=d.get("pad_token_id"),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32").removeprefix("torch."),
            initializer_range=d.get("initializer_range", 0.02),
        )
        if mt is ModelType.QWEN2:
            kwargs.update(attention_bias=True, attention_out_bias=False)
        else:
            kwargs.update(attention_bias=d.get("attention_bias", False))
        if mt is ModelType.QWEN3_MOE:
            kwargs.update(
                num_experts=d.get("num_experts", d.get("num_local_experts", 128)),
                num_experts_per_tok=d.get("num_experts_per_tok", 8),
                moe_intermediate_size=d.get("moe_intermediate_size", 768),
                norm_topk_prob=d.get("norm_topk_prob", False),
                decoder_sparse_step=d.get("decoder_sparse_step", 1),
                mlp_only_layers=list(d.get("mlp_only_layers") or []),
            )
        else:
            kwargs.update(num_experts=0)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers writes for this architecture (loads with AutoConfig)."""
        mt = self.model_type
        eos: int | list[int] | None = (None if not self.eos_token_ids else
                                       self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else
                                       list(self.eos_token_ids))
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[mt]],
            "model_type": mt.value,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            # transformers 5 reads rope_parameters; older readers (vLLM on transformers 4) rope_theta.
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }
        if mt is not ModelType.QWEN2:
            d["attention_bias"] = self.attention_bias
        if mt in (ModelType.QWEN3_MOE, ModelType.QWEN3, ModelType.QWEN2):
            d.update(use_sliding_window=False, sliding_window=None)
        if mt in (ModelType.QWEN3, ModelType.QWEN2):
            d.update(max_window_layers=self.num_hidden_layers)
        if mt is ModelType.LLAMA:
            d.update(mlp_bias=False, pretraining_tp=1)
        if mt is ModelType.QWEN3_MOE:
            d.update(
                num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                output_router_logits=False, router_aux_loss_coef=0.001,
            )
        return d

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = self.model_type.value
        return d

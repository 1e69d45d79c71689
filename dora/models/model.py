"""The built-in decoder: Qwen3-MoE-style blocks, trained by dora's trainer.

RMSNorm, RoPE, GQA attention (optional per-head q/k RMSNorm and q/k/v bias, so Qwen3 / Qwen2 /
Llama dense checkpoints fit too), and per layer either a dense SwiGLU FFN or a top-k softmax-routed
set of SwiGLU experts (dropless). All math goes through `dora.models.ops`, the functions the torch
engine uses too, so the trainer scores exactly what the engine sampled.

Parameter names are Hugging Face's (`model.layers.3.self_attn.q_proj.weight`, router
`model.layers.3.mlp.gate.weight`, ...) except the experts of a MoE layer, stacked as transformers
(>= 5) holds them in memory: `model.layers.3.mlp.experts.gate_up_proj` [E, 2I, D] and
`...experts.down_proj` [E, D, I]. `state_dict()` in this naming is what a `PolicyVersion` carries;
`dora.models.io` converts to the per-expert on-disk layout.

Routing replay (R3): `forward(..., replay_BSLK=ids)` makes every MoE layer use the recorded expert ids
instead of its own top-k, while the gate weights still come from the current router (gradient kept).
Every forward reports the ids it used as `routing_BSLK`.

Shape legend: B batch rows, S positions, D hidden, V vocab, L MoE layers (in layer order),
K experts per token, N = B * S tokens, E experts, H/G query/kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dora.models import ops
from dora.models.config import ModelConfig


@dataclass(slots=True)
class ModelOutput:
    logits_BSV: torch.Tensor | None
    """[B, S, V] next-token logits (None when `return_hidden=True`)."""
    hidden_BSD: torch.Tensor | None
    """[B, S, D] final-norm hidden states, only with `return_hidden=True` (logits = model.lm_head(h))."""
    routing_BSLK: torch.Tensor | None
    """[B, S, L, K] int64 expert ids each MoE layer used at every position (replayed ones when
    replaying); None for a dense model."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.head_dim = Dh
        self.eps = cfg.rms_norm_eps
        self.q_proj = nn.Linear(D, cfg.num_attention_heads * Dh, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, cfg.num_key_value_heads * Dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, cfg.num_key_value_heads * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * Dh, D, bias=cfg.attention_out_bias)
        self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x_BSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor,
                attention_mask_BS: torch.Tensor | None) -> torch.Tensor:
        q_BSHD, k_BSGD, v_BSGD = ops.project_qkv(
            x_BSD, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
            head_dim=self.head_dim, cos_ND=cos_BSD, sin_ND=sin_BSD,
            q_bias=self.q_proj.bias, k_bias=self.k_proj.bias, v_bias=self.v_proj.bias,
            q_norm_weight=None if self.q_norm is None else self.q_norm.weight,
            k_norm_weight=None if self.k_norm is None else self.k_norm.weight,
            eps=self.eps,
        )
        out_BSHD = ops.causal_attention(q_BSHD, k_BSGD, v_BSGD, attention_mask_BS)
        return self.o_proj(out_BSHD.flatten(-2))


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return ops.dense_mlp(x_BSD, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class Experts(nn.Module):
    """E SwiGLU experts stacked as transformers 5 holds them (gate and up rows concatenated)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router, [E, D]
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x_BSD: torch.Tensor, replay_NK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (y [B, S, D], expert ids used [N, K])."""
        x_ND = x_BSD.reshape(-1, x_BSD.shape[-1])
        weights_NK, ids_NK = ops.route(self.gate(x_ND), self.top_k, self.norm_topk_prob, replay_NK)
        y_ND = ops.moe_experts(x_ND, ids_NK, weights_NK, self.experts.gate_up_proj, self.experts.down_proj)
        return y_ND.view_as(x_BSD), ids_NK


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.self_attn = Attention(cfg)
        self.mlp: nn.Module = MoEBlock(cfg) if self.is_moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor,
                attention_mask_BS: torch.Tensor | None,
                replay_NK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos_BSD, sin_BSD, attention_mask_BS)
        h_BSD = self.post_attention_layernorm(x_BSD)
        if self.is_moe:
            y_BSD, ids_NK = self.mlp(h_BSD, replay_NK)
            return x_BSD + y_BSD, ids_NK
        return x_BSD + self.mlp(h_BSD), None


class DecoderBody(nn.Module):
    """The `model.` prefix of the Hugging Face names: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False
        """Recompute each layer's activations in backward instead of storing them (training only)."""
        self.tie_weights()

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, seed: int = 0, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> DecoderLM:
        """A freshly initialised model (deterministic in `seed`), in `dtype` (default: cfg.dtype)."""
        model = cls(cfg)
        model.init_weights(seed)
        return model.to(device=device, dtype=dtype or cfg.torch_dtype)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """HF-style init: weights ~ N(0, initializer_range), biases 0, norm scales 1. Draws happen in
        parameter-name order from one seeded generator on the CPU, so a seed gives the same model on
        every machine and device."""
        std = self.config.initializer_range
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():  # tied lm_head is listed once (as embed_tokens)
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                value = torch.ones(p.shape)
            elif leaf == "bias":
                value = torch.zeros(p.shape)
            else:
                value = torch.empty(p.shape).normal_(0.0, std, generator=g)
            p.copy_(value)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied lm_head counts once)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.model.embed_tokens.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        *,
        attention_mask_BS: torch.Tensor | None = None,
        position_ids_BS: torch.Tensor | None = None,
        replay_BSLK: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> ModelOutput:
        """Full causal forward over right-padded rows (`attention_mask_BS` 1 = real token).

        `replay_BSLK` (any integer dtype, e.g. stacked `Trajectory.routing`) makes MoE layer l use
        `replay_BSLK[:, :, l]` as its expert ids. Positions with no record (right padding, the last
        sampled token, which the engine never fed back) may hold any valid id such as 0: causal
        attention keeps them from touching earlier positions. Positions are `0..S-1` unless given.
        """
        cfg = self.config
        if input_ids_BS.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids_BS.shape)}")
        B, S = input_ids_BS.shape
        replay_LNK = self._split_replay(replay_BSLK, B, S)
        if position_ids_BS is None:
            position_ids_BS = torch.arange(S, device=input_ids_BS.device).expand(B, S)
        x_BSD = self.model.embed_tokens(input_ids_BS)
        cos_BSD, sin_BSD = ops.rope_cos_sin(position_ids_BS, cfg.head_dim, cfg.rope_theta, x_BSD.dtype, x_BSD.device)
        routing: list[torch.Tensor] = []
        for layer in self.model.layers:
            replay_NK = replay_LNK[len(routing)] if replay_LNK is not None and layer.is_moe else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x_BSD, ids_NK = checkpoint(layer, x_BSD, cos_BSD, sin_BSD, attention_mask_BS, replay_NK,
                                           use_reentrant=False)
            else:
                x_BSD, ids_NK = layer(x_BSD, cos_BSD, sin_BSD, attention_mask_BS, replay_NK)
            if ids_NK is not None:
                routing.append(ids_NK)
        h_BSD = self.model.norm(x_BSD)
        routing_BSLK = torch.stack(routing, dim=1).view(B, S, len(routing), -1) if routing else None
        if return_hidden:
            return ModelOutput(logits_BSV=None, hidden_BSD=h_BSD, routing_BSLK=routing_BSLK)
        return ModelOutput(logits_BSV=self.lm_head(h_BSD), hidden_BSD=None, routing_BSLK=routing_BSLK)

    def _split_replay(self, replay_BSLK: torch.Tensor | None, B: int, S: int) -> list[torch.Tensor] | None:
        if replay_BSLK is None:
            return None
        cfg = self.config
        expected = [B, S, cfg.num_moe_layers, cfg.num_experts_per_tok]
        if not cfg.is_moe:
            raise ValueError("replay_BSLK was given but the model has no MoE layers")
        if list(replay_BSLK.shape) != expected:
            raise ValueError(f"replay_BSLK must have shape [batch, seq, moe_layers, top_k] = {expected}, "
                             f"got {list(replay_BSLK.shape)}")
        return [replay_BSLK[:, :, l].reshape(B * S, -1) for l in range(cfg.num_moe_layers)]

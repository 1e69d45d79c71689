"""Policy versions held by the torch engine: weight validation, preparation, and the live set.

Where it sits: `TorchEngine.add_version` calls `prepare_version` in the caller's thread (validation,
device/dtype transfer, fusing q/k/v and dense gate/up into one matmul each), then builds a new
immutable `LiveVersions` (which also stacks every live version's experts per MoE layer so one
grouped expert call serves all versions) and publishes it with a single reference swap. The decode
loop picks up the current `LiveVersions` at the start of each step and uses it for the whole step,
so a version appears or disappears between steps, never inside one, and never under a sequence
(the engine refuses to drop a version that still has sequences).

Weights come in the dora model's `state_dict()` naming (see `dora.types.PolicyVersion`).

Shape legend: V vocab, D hidden, H/G query/kv heads, Dh head dim, E experts, I expert width,
F dense FFN width, Vn live versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dora.models.config import ModelConfig


@dataclass(slots=True)
class LayerWeights:
    """Matmul weights are stored transposed, [in, out] contiguous (`_T` names): `x @ w_T` through
    torch.mm reads them without repacking, ~15-40% faster than F.linear for decode-sized batches."""

    input_norm_D: torch.Tensor
    qkv_T: torch.Tensor
    """[D, (H + 2G) * Dh]: q, k and v projections fused into one matmul."""
    qkv_bias: torch.Tensor | None
    o_T: torch.Tensor
    o_bias: torch.Tensor | None
    qk_norm_HDh: torch.Tensor | None
    """[H + G, Dh]: the q_norm weight for each query head, then the k_norm weight for each kv head,
    so queries and keys are normalised in one call (the same per-head RMSNorm).
    With `rope_pairs_adjacent(dtype)`, the q and k heads' dims (in qkv_T, qkv_bias and this weight)
    are stored in `rope_pair_order`, and so are the cached keys. q and k are permuted alike, so the
    attention scores are the same up to float summation order (the q/k norm and the q.k products
    sum the head dims in another order)."""
    post_norm_D: torch.Tensor
    router_T: torch.Tensor | None
    """MoE layers: router [D, E]; the experts live stacked across versions in `LiveVersions`."""
    gate_up_EDF: torch.Tensor | None
    """Experts' gate/up [E, D, 2I] (the state_dict's [E, 2I, D] transposed, contiguous)."""
    down_EID: torch.Tensor | None
    mlp_gate_up_T: torch.Tensor | None
    """Dense layers: [D, 2F] gate and up fused."""
    mlp_down_T: torch.Tensor | None


@dataclass(slots=True)
class VersionWeights:
    version: int
    embed_VD: torch.Tensor
    final_norm_D: torch.Tensor
    lm_head_T: torch.Tensor
    """[D, V] (a transposed copy even when tied to the embeddings)."""
    layers: list[LayerWeights]


def expected_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """-> (name -> shape of every weight a version must carry, names that may be present or not)."""
    D, Dh, H, G = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D),
                                          "model.norm.weight": (D,), "lm_head.weight": (cfg.vocab_size, D)}
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        for name, rows in (("q_proj", H * Dh), ("k_proj", G * Dh), ("v_proj", G * Dh)):
            shapes[p + f"self_attn.{name}.weight"] = (rows, D)
            if cfg.attention_bias:
                shapes[p + f"self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (D, H * Dh)
        if cfg.attention_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (D,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (Dh,)
            shapes[p + "self_attn.k_norm.weight"] = (Dh,)
        if cfg.is_moe_layer(i):
            E, I = cfg.num_experts, cfg.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (E, D)
            shapes[p + "mlp.experts.gate_up_proj"] = (E, 2 * I, D)
            shapes[p + "mlp.experts.down_proj"] = (E, D, I)
        else:
            F = cfg.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (F, D)
            shapes[p + "mlp.up_proj.weight"] = (F, D)
            shapes[p + "mlp.down_proj.weight"] = (D, F)
    return shapes, optional


def validate_weights(cfg: ModelConfig, version: int, weights: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming every missing, unexpected or mis-shaped weight."""
    shapes, optional = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(weights) - optional)
    unexpected = sorted(set(weights) - set(shapes))
    mismatched = [f"{name}: expected {list(shape)}, got {list(weights[name].shape)}"
                  for name, shape in shapes.items() if name in weights and tuple(weights[name].shape) != shape]
    not_float = [name for name in shapes if name in weights and not weights[name].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"missing {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {_preview(unexpected)}")
    if mismatched:
        problems.append(f"mismatched shapes {_preview(mismatched)}")
    if not_float:
        problems.append(f"non-floating-point {_preview(not_float)}")
    if problems:
        raise ValueError(f"weights of version {version} do not match the engine's model: " + "; ".join(problems))


def _preview(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


def rope_pairs_adjacent(dtype: torch.dtype) -> bool:
    """Whether the engine keeps RoPE's rotated pairs (i, i + Dh / 2) of every q/k head adjacent, so
    RoPE is one complex multiply (bit-identical to `ops.apply_rope` on the permuted dims): in float32,
    which has a complex type (complex64)."""
    return dtype == torch.float32


def rope_pair_order(head_dim: int) -> torch.Tensor:
    """Head-dim order with each rotated pair adjacent: [0, Dh/2, 1, Dh/2 + 1, ...]."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)


def prepare_version(cfg: ModelConfig, version: int, weights: Mapping[str, torch.Tensor], *,
                    dtype: torch.dtype, device: torch.device) -> VersionWeights:
    """Validate, then copy the weights to the engine's device/dtype in the layout its forward uses.
    Always copies, so the caller may keep training the tensors it passed in."""
    validate_weights(cfg, version, weights)

    def get(name: str) -> torch.Tensor:
        return weights[name].detach().to(device=device, dtype=dtype, copy=True)

    def opt(name: str) -> torch.Tensor | None:
        return get(name) if name in weights else None

    def get_T(name: str) -> torch.Tensor:
        return get(name).t().contiguous()

    pair_order = rope_pair_order(cfg.head_dim).to(device) if rope_pairs_adjacent(dtype) else None

    def heads(name: str) -> torch.Tensor:
        """A q/k projection weight [heads * Dh, ...] or bias, or a norm weight [Dh], with each head's
        dims in `pair_order` when RoPE runs on adjacent pairs."""
        t = get(name)
        if pair_order is None:
            return t
        return t.unflatten(0, (-1, cfg.head_dim)).index_select(1, pair_order).flatten(0, 1)

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        qkv_bias = (torch.cat([heads(a + "q_proj.bias"), heads(a + "k_proj.bias"), get(a + "v_proj.bias")])
                    if cfg.attention_bias else None)
        moe = cfg.is_moe_layer(i)
        layers.append(LayerWeights(
            input_norm_D=get(p + "input_layernorm.weight"),
            qkv_T=torch.cat([heads(a + "q_proj.weight"), heads(a + "k_proj.weight"),
                             get(a + "v_proj.weight")]).t().contiguous(), qkv_bias=qkv_bias,
            o_T=get_T(a + "o_proj.weight"), o_bias=opt(a + "o_proj.bias"),
            qk_norm_HDh=torch.cat([heads(a + "q_norm.weight").expand(cfg.num_attention_heads, -1),
                                   heads(a + "k_norm.weight").expand(cfg.num_key_value_heads, -1)])
            if cfg.qk_norm else None,
            post_norm_D=get(p + "post_attention_layernorm.weight"),
            router_T=get_T(p + "mlp.gate.weight") if moe else None,
            gate_up_EDF=get(p + "mlp.experts.gate_up_proj").transpose(1, 2).contiguous() if moe else None,
            down_EID=get(p + "mlp.experts.down_proj").transpose(1, 2).contiguous() if moe else None,
            mlp_gate_up_T=None if moe else torch.cat([get(p + "mlp.gate_proj.weight"),
                                                      get(p + "mlp.up_proj.weight")]).t().contiguous(),
            mlp_down_T=None if moe else get_T(p + "mlp.down_proj.weight"),
        ))
    embed = get("model.embed_tokens.weight")
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in weights
    return VersionWeights(version=version, embed_VD=embed, final_norm_D=get("model.norm.weight"),
                          lm_head_T=(embed if tied else get("lm_head.weight")).t().contiguous(), layers=layers)


@dataclass(slots=True, frozen=True)
class LiveVersions:
    """An immutable snapshot of the live versions, in the row order a step uses (ascending)."""

    versions: tuple[int, ...]
    weights: tuple[VersionWeights, ...]
    gate_up_LEDF: tuple[torch.Tensor | None, ...]
    """Per layer: every live version's experts stacked, [Vn * E, D, 2I]; version index j owns
    experts [j * E, (j + 1) * E). None for dense layers."""
    down_LEID: tuple[torch.Tensor | None, ...]

    @staticmethod
    def build(weights: list[VersionWeights]) -> LiveVersions:
        """Stack the experts of `weights` (done by add/drop_version, off the decode loop). With
        several versions the stacked tensors are a copy: expert memory is about twice the live
        versions' experts (the per-version tensors are kept to re-stack when the live set changes)."""
        weights = sorted(weights, key=lambda w: w.version)
        num_layers = len(weights[0].layers) if weights else 0
        gate_up, down = [], []
        for i in range(num_layers):
            if weights[0].layers[i].gate_up_EDF is None:
                gate_up.append(None)
                down.append(None)
            elif len(weights) == 1:
                gate_up.append(weights[0].layers[i].gate_up_EDF)
                down.append(weights[0].layers[i].down_EID)
            else:
                gate_up.append(torch.cat([w.layers[i].gate_up_EDF for w in weights]))
                down.append(torch.cat([w.layers[i].down_EID for w in weights]))
        return LiveVersions(versions=tuple(w.version for w in weights), weights=tuple(weights),
                            gate_up_LEDF=tuple(gate_up), down_LEID=tuple(down))

    def index(self, version: int) -> int:
        return self.versions.index(version)

    def __contains__(self, version: int) -> bool:
        return version in self.versions

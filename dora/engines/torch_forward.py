"""One forward pass of the torch engine over a packed step: decode tokens and prefill chunks of every
live version, in one pass.

Where it sits: `torch_engine` plans a step (which tokens of which sequences are fed), packs it into
`StepInputs` and calls `PackedForward.forward`, which writes the new keys/values and routing ids
into the `SlotCache` and returns the logits of the rows that sample a token.

How several versions share one pass: rows are ordered version by version, so each version owns a
contiguous row range (`segments`). Only the ops that carry weights are split per segment (embedding,
norms, projections, router, lm_head); RoPE, attention over the cache and the sampling that follows
run once over all rows, and the MoE experts of all versions run in one grouped call over the stacked
expert tensors (ids offset by version index * E). With one live version nothing is split.

Attention: decode rows (one token each) go through one SDPA call laid out by slot — queries are
scattered to their slot's row and the cache is read as a view `k[:num_slots, :max_len]` (slots are
packed at the front), with a length mask. Prefill chunks go through a second call (padded to the
longest chunk when there are several). The math is `dora.models.ops` (RMSNorm, RoPE tables, router)
and `dora.engines.experts` (the experts of `ops.moe_experts` on the engine's weight layout), so the
engine computes the function the trainer's `DecoderLM` computes, up to float summation order.

Shape legend: N fed tokens this step, R sampled rows, B decode rows, S slots in the decode view,
Lk keys, P prefill chunks, C longest chunk, D hidden, H/G query/kv heads, A = H + 2G heads of the fused
q/k/v projection, Dh head dim, Dp = Dh / 2 rotated pairs, V vocab, E experts, K top-k, Lm MoE layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dora.engines import experts
from dora.engines.kv_cache import SlotCache
from dora.engines.versions import LayerWeights, LiveVersions, VersionWeights, rope_pairs_adjacent
from dora.models import ops
from dora.models.config import ModelConfig

Segments = list[tuple[int, int, int]]
"""(version index in LiveVersions, first row, end row): contiguous, ascending, covering all rows."""


@dataclass(slots=True)
class DecodeLayout:
    rows_B: torch.Tensor
    """Rows of the packed step that are decode tokens."""
    slots_B: torch.Tensor
    num_slots: int
    """Slots [0, num_slots) form the attention view."""
    mask_S11Lk: torch.Tensor
    """Additive (0 / -inf, activation dtype): key position <= the slot's query position; slots
    without a decode row see key 0 only (no all-masked row, no NaN)."""
    identity: bool
    """Decode rows are rows [0, B) holding slots 0..B-1 in order: no scatter/gather needed."""
    long_slots_b: torch.Tensor | None = None
    """Slots whose sequences are longer than the view's key range: attended in a second call over
    their gathered keys (so a long-tail sequence does not make every slot read its length)."""
    long_mask_b11Lk: torch.Tensor | None = None


@dataclass(slots=True)
class PrefillLayout:
    rows: slice | torch.Tensor
    """Rows of the packed step that are prefill tokens (a slice when there is one chunk)."""
    slots_P: torch.Tensor
    gather_PC: torch.Tensor | None
    """For every (chunk, offset), its index among the step's prefill rows; padding repeats the
    chunk's last row (its output is dropped). None for a single chunk (no padding)."""
    scatter_n: torch.Tensor | None
    """For each prefill row, its index in the flattened [P * C] padded layout."""
    num_keys: int
    mask_P1CLk: torch.Tensor | None
    """bool causal mask with each chunk's offset; None (plain causal) when every chunk is a whole
    prompt starting at position 0 and the chunks have one length."""
    single_slot: int
    """The slot of the chunk when there is exactly one (read as a view), else -1."""


@dataclass(slots=True)
class StepInputs:
    flat_N: torch.Tensor
    """slot * max_len + position of every fed token (where its K/V and routing ids are written)."""
    pos_N: torch.Tensor
    tokens_N: torch.Tensor
    segments: Segments
    vidx_N: torch.Tensor | None
    """Version index of each row, only when several versions are in the step."""
    decode: DecodeLayout | None
    prefill: PrefillLayout | None
    sample_rows_R: torch.Tensor
    """Rows whose logits are sampled (a finished prompt's last row repeats once per sample)."""
    sample_segments: Segments


class PackedForward:
    """The engine's model function over the preallocated cache; holds no weights of its own."""

    def __init__(self, cfg: ModelConfig, cache: SlotCache, dtype: torch.dtype, device: torch.device,
                 moe_impl: str = "auto") -> None:
        self.cfg = cfg
        self.moe_impl = moe_impl
        self.cache = cache
        positions = torch.arange(cache.max_len, device=device)
        # Indexing a table computed by ops.rope_cos_sin gives bit-identical values to calling it per step.
        cos_MDh, sin_MDh = ops.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype, device)
        half = cfg.head_dim // 2
        self.complex_rope = rope_pairs_adjacent(dtype)
        if self.complex_rope:
            # q/k heads hold each rotated pair (x_i, x_{i + Dh/2}) adjacent (see versions.LayerWeights):
            # RoPE is (x_i + i x_{i + Dh/2}) * (cos + i sin), the products and sums of ops.apply_rope.
            self.rope_tables = (torch.complex(cos_MDh[:, :half], sin_MDh[:, :half]),)
        else:
            # rotate_half(x) * sin == roll(x, Dh / 2) * sin_signed (first half of sin negated): the same
            # products bit for bit, in one roll instead of two slices, a negation and a cat.
            self.rope_tables = (cos_MDh, torch.cat([-sin_MDh[:, :half], sin_MDh[:, half:]], dim=-1))
        self.q_width = cfg.num_attention_heads * cfg.head_dim

    @torch.inference_mode()
    def forward(self, live: LiveVersions, step: StepInputs) -> torch.Tensor:
        """Run every layer over the packed rows -> logits [R, V] (float32) of the sampled rows."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        rows = _Rows(live.weights, step.segments)
        x_ND = rows.apply(step.tokens_N, lambda w, t: F.embedding(t, w.embed_VD))
        # The rows of one step share their positions' RoPE tables across layers: indexed once.
        rope = tuple(t.index_select(0, step.pos_N).unsqueeze(1) for t in self.rope_tables)
        routing: list[torch.Tensor] = []
        for i in range(cfg.num_hidden_layers):
            h_ND = rows.apply(x_ND, lambda w, x: _rms_norm(x, w.layers[i].input_norm_D, eps))
            # x_ND is this pass's own tensor: the output projection adds into it in place.
            rows.addmm_(x_ND, self._attention(i, rows, step, h_ND, rope),
                        lambda w: (w.layers[i].o_T, w.layers[i].o_bias))
            h_ND = rows.apply(x_ND, lambda w, x: _rms_norm(x, w.layers[i].post_norm_D, eps))
            if cfg.is_moe_layer(i):
                y_ND, ids_NK = self._moe(i, live, rows, step, h_ND)
                routing.append(ids_NK)
            else:
                y_ND = rows.apply(h_ND, lambda w, x: _dense_mlp(x, w.layers[i]))
            x_ND += y_ND
        if routing:
            self.cache.write_routing(step.flat_N, torch.stack(routing, dim=1))
        h_RD = x_ND.index_select(0, step.sample_rows_R)
        if not h_RD.shape[0]:  # only unfinished prefill chunks this step: KV written, nothing to sample
            return h_RD.new_empty((0, cfg.vocab_size), dtype=torch.float32)
        logits_RV = _Rows(live.weights, step.sample_segments).apply(
            h_RD, lambda w, x: torch.mm(_rms_norm(x, w.final_norm_D, eps), w.lm_head_T))
        return logits_RV.float()

    # ------------------------------------------------------------------ blocks

    def _attention(self, i: int, rows: _Rows, step: StepInputs, h_ND: torch.Tensor,
                   rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """-> attention output [N, H * Dh], before the output projection."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        H, G = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv_NAD = rows.apply(h_ND, lambda w, x: _linear(x, w.layers[i].qkv_T, w.layers[i].qkv_bias)
                             ).unflatten(-1, (-1, cfg.head_dim))
        # Queries and keys go through norm and RoPE together: the same per-head math, half the ops.
        # RoPE (= ops.apply_rope) writes back into the q/k heads of qkv, which leaves each token's
        # keys and values adjacent: one cache write for both.
        qk_NHD = qkv_NAD[:, :H + G]
        if cfg.qk_norm:
            qk_NHD = rows.apply(qk_NHD, lambda w, x: _rms_norm_heads(x, w.layers[i].qk_norm_HDh, eps))
        if self.complex_rope:
            (freqs_N1Dp,) = rope
            torch.mul(torch.view_as_complex(qk_NHD.unflatten(-1, (-1, 2))), freqs_N1Dp,
                      out=torch.view_as_complex(qkv_NAD[:, :H + G].unflatten(-1, (-1, 2))))
        else:
            cos_N1Dh, sin_signed_N1Dh = rope
            rotated_NHD = qk_NHD.roll(cfg.head_dim // 2, -1) * sin_signed_N1Dh
            torch.mul(qk_NHD, cos_N1Dh, out=qkv_NAD[:, :H + G]).add_(rotated_NHD)
        self.cache.write_kv(i, step.flat_N, qkv_NAD[:, H:])
        q_NHD = qkv_NAD[:, :H]

        num_rows = h_ND.shape[0]
        dec, pre = step.decode, step.prefill
        if dec is not None and pre is None and dec.identity and dec.rows_B.shape[0] == num_rows:
            out_NX = self._decode_attention(i, dec, q_NHD)
        elif dec is None and pre is not None and isinstance(pre.rows, slice) and pre.rows == slice(0, num_rows):
            out_NX = self._prefill_attention(i, pre, q_NHD)
        else:
            out_NX = q_NHD.new_empty(num_rows, self.q_width)
            if dec is not None:
                out_NX.index_copy_(0, dec.rows_B, self._decode_attention(i, dec, q_NHD.index_select(0, dec.rows_B)))
            if pre is not None:
                if isinstance(pre.rows, slice):
                    out_NX[pre.rows] = self._prefill_attention(i, pre, q_NHD[pre.rows])
                else:
                    out_NX.index_copy_(0, pre.rows, self._prefill_attention(i, pre, q_NHD.index_select(0, pre.rows)))
        return out_NX

    def _decode_attention(self, i: int, dec: DecodeLayout, q_BHD: torch.Tensor) -> torch.Tensor:
        """One query per decode row against its slot's cached keys -> [B, H * Dh]."""
        cfg = self.cfg
        G, Dh = cfg.num_key_value_heads, cfg.head_dim
        S, Lk = dec.num_slots, dec.mask_S11Lk.shape[-1]  # slots longer than Lk: see long_slots_b
        if dec.identity:
            q_SHD = q_BHD
        else:
            q_SHD = q_BHD.new_zeros(S, cfg.num_attention_heads, Dh)
            q_SHD.index_copy_(0, dec.slots_B, q_BHD)
        # GQA without repeating keys: the H / G query heads sharing a kv head act as H / G queries.
        q_SGhD = q_SHD.view(S, G, -1, Dh)
        k_SGLD = self.cache.keys_SMGD[i][:S, :Lk].transpose(1, 2)
        v_SGLD = self.cache.values_SMGD[i][:S, :Lk].transpose(1, 2)
        out_SGhD = F.scaled_dot_product_attention(q_SGhD, k_SGLD, v_SGLD, attn_mask=dec.mask_S11Lk)
        out_SX = out_SGhD.reshape(S, -1)
        if dec.long_slots_b is not None:
            assert dec.long_mask_b11Lk is not None
            b, Lk = dec.long_slots_b.shape[0], dec.long_mask_b11Lk.shape[-1]
            q_bGhD = q_SGhD.index_select(0, dec.long_slots_b)
            k_bGLD = self.cache.keys_SMGD[i][:, :Lk].index_select(0, dec.long_slots_b).transpose(1, 2)
            v_bGLD = self.cache.values_SMGD[i][:, :Lk].index_select(0, dec.long_slots_b).transpose(1, 2)
            out_bGhD = F.scaled_dot_product_attention(q_bGhD, k_bGLD, v_bGLD, attn_mask=dec.long_mask_b11Lk)
            out_SX = out_SX.index_copy(0, dec.long_slots_b, out_bGhD.reshape(b, -1))
        return out_SX if dec.identity else out_SX.index_select(0, dec.slots_B)

    def _prefill_attention(self, i: int, pre: PrefillLayout, q_nHD: torch.Tensor) -> torch.Tensor:
        """Causal attention of prompt chunks over their slots' cached keys -> [n, H * Dh]."""
        Lk = pre.num_keys
        if pre.single_slot >= 0:
            q_1HCD = q_nHD.transpose(0, 1).unsqueeze(0)
            k_1GLD = self.cache.keys_SMGD[i][pre.single_slot, :Lk].transpose(0, 1).unsqueeze(0)
            v_1GLD = self.cache.values_SMGD[i][pre.single_slot, :Lk].transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(q_1HCD, k_1GLD, v_1GLD, attn_mask=pre.mask_P1CLk,
                                                 is_causal=pre.mask_P1CLk is None, enable_gqa=True)
            return out[0].transpose(0, 1).reshape(q_nHD.shape[0], -1)
        assert pre.gather_PC is not None and pre.scatter_n is not None
        P, C = pre.gather_PC.shape
        q_PHCD = q_nHD.index_select(0, pre.gather_PC.view(-1)).view(P, C, *q_nHD.shape[1:]).transpose(1, 2)
        k_PGLD = self.cache.keys_SMGD[i][:, :Lk].index_select(0, pre.slots_P).transpose(1, 2)
        v_PGLD = self.cache.values_SMGD[i][:, :Lk].index_select(0, pre.slots_P).transpose(1, 2)
        out_PHCD = F.scaled_dot_product_attention(q_PHCD, k_PGLD, v_PGLD, attn_mask=pre.mask_P1CLk,
                                                  is_causal=pre.mask_P1CLk is None, enable_gqa=True)
        return out_PHCD.transpose(1, 2).reshape(P * C, -1).index_select(0, pre.scatter_n)

    def _moe(self, i: int, live: LiveVersions, rows: _Rows, step: StepInputs,
             h_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        router_logits_NE = rows.apply(h_ND, lambda w, x: torch.mm(x, w.layers[i].router_T))
        weights_NK, ids_NK = _route(router_logits_NE, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        # Several versions: version j's experts are rows [j * E, (j + 1) * E) of the stacked tensors.
        stacked_ids_NK = ids_NK if step.vidx_N is None else ids_NK + (step.vidx_N * cfg.num_experts)[:, None]
        gate_up, down = live.gate_up_LEDF[i], live.down_LEID[i]
        assert gate_up is not None and down is not None
        return experts.moe_experts(h_ND, stacked_ids_NK, weights_NK, gate_up, down, self.moe_impl), ids_NK


class _Rows:
    """Applies a weight-carrying op range by range, each row range through its own version."""

    __slots__ = ("weights", "segs")

    def __init__(self, weights: tuple[VersionWeights, ...], segs: Segments) -> None:
        self.weights = weights
        self.segs = segs

    def apply(self, x: torch.Tensor, fn: Callable[[VersionWeights, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if len(self.segs) == 1:
            return fn(self.weights[self.segs[0][0]], x)
        return torch.cat([fn(self.weights[j], x[a:b]) for j, a, b in self.segs if b > a])

    def addmm_(self, y: torch.Tensor, x: torch.Tensor,
               weight: Callable[[VersionWeights], tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """y += x @ w_IO (+ bias) in place, each row range with its version's (w_IO, bias); addmm gives
        the same values as the matmul then the add."""
        for j, a, b in self.segs:
            w_IO, bias_O = weight(self.weights[j])
            y_rows = y if len(self.segs) == 1 else y[a:b]
            y_rows.addmm_(x if len(self.segs) == 1 else x[a:b], w_IO)
            if bias_O is not None:
                y_rows.add_(bias_O)


def _rms_norm(x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """ops.rms_norm; in fp32 through F.rms_norm, which runs the same ops in the same order in C++
    (bit-identical, without a Python call per op; tests/engines/test_torch_forward.py pins it)."""
    if x_ND.dtype != torch.float32:
        return ops.rms_norm(x_ND, weight_D, eps)
    return F.rms_norm(x_ND, weight_D.shape, weight_D, eps)


def _rms_norm_heads(x_NHD: torch.Tensor, weight_HDh: torch.Tensor, eps: float) -> torch.Tensor:
    """ops.rms_norm over the head dim with a weight per head (q_norm for query heads, k_norm for kv
    heads); in fp32 the unweighted F.rms_norm times the weight, which is the same computation."""
    if x_NHD.dtype != torch.float32:
        return ops.rms_norm(x_NHD, weight_HDh, eps)
    return F.rms_norm(x_NHD, weight_HDh.shape[-1:], None, eps) * weight_HDh


def _route(router_logits_NE: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.route in two ops when the top-k weights are renormalised: softmax is monotonic, so the
    top-k of the logits are the top-k experts, and the renormalised top-k probabilities are the
    softmax of the top-k logits (equal up to float rounding; the ids differ only if two logits are
    within rounding of each other, where any change of summation order could swap them too)."""
    if not norm_topk_prob:
        return ops.route(router_logits_NE, top_k, norm_topk_prob)
    top_logits_NK, ids_NK = torch.topk(router_logits_NE, top_k, dim=-1)
    return torch.softmax(top_logits_NK, dim=-1, dtype=torch.float32).to(router_logits_NE.dtype), ids_NK


def _linear(x_NI: torch.Tensor, w_IO: torch.Tensor, bias_O: torch.Tensor | None) -> torch.Tensor:
    """x @ w (+ bias) with the weight stored transposed ([in, out], see versions.LayerWeights)."""
    return torch.mm(x_NI, w_IO) if bias_O is None else torch.addmm(bias_O, x_NI, w_IO)


def _dense_mlp(x_ND: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
    """SwiGLU with gate and up fused into one matmul (same math as ops.dense_mlp)."""
    gate_NF, up_NF = torch.mm(x_ND, layer.mlp_gate_up_T).chunk(2, dim=-1)
    return torch.mm(F.silu(gate_NF) * up_NF, layer.mlp_down_T)

"""Shared functional ops: router (with R3 replay), dropless experts, norms and RoPE vs transformers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dora.models import ops


def _naive_experts(x_ND, ids_NK, weights_NK, gate_up_EFD, down_EDI):
    """Per-token, per-slot loop: the definition moe_experts must match."""
    y = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        for k in range(ids_NK.shape[1]):
            e = int(ids_NK[n, k])
            gate, up = (gate_up_EFD[e] @ x_ND[n]).chunk(2)
            y[n] += weights_NK[n, k] * (down_EDI[e] @ (torch.nn.functional.silu(gate) * up))
    return y


@given(num_tokens=st.integers(0, 12), num_experts=st.integers(1, 6), top_k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_moe_experts_matches_naive_loop(num_tokens, num_experts, top_k, seed):
    top_k = min(top_k, num_experts)
    g = torch.Generator().manual_seed(seed)
    D, I = 8, 6
    x = torch.randn(num_tokens, D, generator=g, dtype=torch.float64)
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64)
    weights, ids = ops.route(logits, top_k, norm_topk_prob=bool(seed % 2))
    gate_up = torch.randn(num_experts, 2 * I, D, generator=g, dtype=torch.float64)
    down = torch.randn(num_experts, D, I, generator=g, dtype=torch.float64)
    got = ops.moe_experts(x, ids, weights, gate_up, down, impl="loop")
    torch.testing.assert_close(got, _naive_experts(x, ids, weights, gate_up, down))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@settings(max_examples=60)  # forward + backward of both implementations per example
@given(num_tokens=st.integers(0, 40), num_experts=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_grouped_impl_matches_loop_values_and_gradients(num_tokens, num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    D, I = 16, 8
    x = torch.randn(num_tokens, D, generator=g)
    weights, ids = ops.route(torch.randn(num_tokens, num_experts, generator=g), min(2, num_experts), True)
    gate_up = torch.randn(num_experts, 2 * I, D, generator=g)
    down = torch.randn(num_experts, D, I, generator=g)
    assert ops.grouped_mm_supported(x, gate_up, down)
    results = {}
    for impl in ops.MOE_IMPLS:
        leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
        y = ops.moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], impl=impl)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        # With no tokens at all the loop never touches the experts (grad None): same as zeros.
        results[impl] = [y.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    for loop, grouped in zip(results["loop"], results["grouped"]):
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)


def test_moe_impl_choice():
    x, gu, dn = torch.zeros(2, 16), torch.zeros(3, 16, 16), torch.zeros(3, 16, 8)
    assert not ops.grouped_mm_supported(x.double(), gu.double(), dn.double())
    assert not ops.grouped_mm_supported(torch.zeros(2, 6), torch.zeros(3, 16, 6), torch.zeros(3, 6, 8))
    with pytest.raises(ValueError, match="moe impl"):
        ops.moe_experts(x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), gu, dn, impl="fast")


def test_moe_experts_stacked_versions_offset_ids():
    """Two versions' experts stacked on dim 0 with ids offset by version * E give each version's output."""
    g = torch.Generator().manual_seed(0)
    E, D, I, N = 4, 8, 6, 5
    x = torch.randn(N, D, generator=g)
    ids = torch.randint(0, E, (N, 2), generator=g)
    w = torch.rand(N, 2, generator=g)
    gu = [torch.randn(E, 2 * I, D, generator=g) for _ in range(2)]
    dn = [torch.randn(E, D, I, generator=g) for _ in range(2)]
    stacked = ops.moe_experts(x, ids + E, w, torch.cat(gu), torch.cat(dn))
    torch.testing.assert_close(stacked, ops.moe_experts(x, ids, w, gu[1], dn[1]))


def test_route_replay_of_own_ids_equals_recomputed():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 8, generator=g)
    for norm in (True, False):
        w, ids = ops.route(logits, 2, norm)
        w_replay, ids_replay = ops.route(logits, 2, norm, replay_ids_NK=ids.to(torch.uint8))
        assert torch.equal(ids_replay, ids) and ids_replay.dtype == torch.int64
        assert torch.equal(w_replay, w)


def test_route_replay_keeps_router_gradient():
    g = torch.Generator().manual_seed(2)
    router = torch.randn(8, 16, generator=g, requires_grad=True)
    x = torch.randn(6, 16, generator=g)
    replay = torch.randint(0, 8, (6, 2), generator=g)
    w, ids = ops.route(x @ router.T, 2, True, replay_ids_NK=replay)
    assert torch.equal(ids, replay)
    gate_up = torch.randn(8, 12, 16, generator=g)
    down = torch.randn(8, 16, 6, generator=g)
    ops.moe_experts(x, ids, w, gate_up, down).square().sum().backward()
    assert router.grad is not None and router.grad.abs().sum() > 0
    # Every router row feeds the softmax denominator; the replayed experts' rows must get gradient.
    assert (router.grad[replay.unique()].abs().sum(-1) > 0).all()


def test_route_replay_validation():
    logits = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"shape \[tokens=4, top_k=2\]"):
        ops.route(logits, 2, True, replay_ids_NK=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        ops.route(logits, 2, True, replay_ids_NK=torch.full((4, 2), 8))
    with pytest.raises(TypeError, match="integer"):
        ops.route(logits, 2, True, replay_ids_NK=torch.zeros(4, 2))


def test_norm_rope_router_match_transformers():
    pytest.importorskip("transformers")
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

    torch.manual_seed(3)
    cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8, norm_topk_prob=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    x = torch.randn(2, 5, 16)
    norm = hf.Qwen3MoeRMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=0, atol=0)

    pos = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    cos_hf, sin_hf = hf.Qwen3MoeRotaryEmbedding(cfg)(x, pos)
    cos, sin = ops.rope_cos_sin(pos, 8, 5000.0, torch.float32)
    torch.testing.assert_close(cos, cos_hf)
    torch.testing.assert_close(sin, sin_hf)
    q = torch.randn(2, 5, 2, 8)
    q_hf, _ = hf.apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos_hf, sin_hf)
    torch.testing.assert_close(ops.apply_rope(q, cos, sin), q_hf.transpose(1, 2))

    block = hf.Qwen3MoeSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    flat = x.reshape(-1, 16)
    logits = torch.nn.functional.linear(flat, block.gate.weight)
    w, ids = ops.route(logits, 2, True)
    _, w_hf, ids_hf = block.gate(flat)
    assert torch.equal(ids, ids_hf)
    torch.testing.assert_close(w, w_hf)
    y = ops.moe_experts(flat, ids, w, block.experts.gate_up_proj, block.experts.down_proj)
    torch.testing.assert_close(y.reshape(x.shape), block(x), rtol=1e-5, atol=1e-6)


def test_causal_attention_right_padding_matches_unpadded():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 5, 4, 8, generator=g)
    k = torch.randn(1, 5, 2, 8, generator=g)
    v = torch.randn(1, 5, 2, 8, generator=g)
    full = ops.causal_attention(q[:, :3], k[:, :3], v[:, :3])
    padded = ops.causal_attention(q, k, v, torch.tensor([[1, 1, 1, 0, 0]]))
    torch.testing.assert_close(padded[:, :3], full)
    assert torch.isfinite(padded).all()

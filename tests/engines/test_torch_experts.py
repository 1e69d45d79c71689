"""The engine's expert implementations against the trainer's `dora.models.ops.moe_experts`."""

import pytest
import torch

from dora.engines.experts import MOE_IMPLS, fused_kernel, moe_experts
from dora.models import ops

needs_fused = pytest.mark.skipif(fused_kernel() is None, reason="dora_kernels.cpu_moe could not be built here")


def _case(num_tokens: int, num_experts: int = 8, top_k: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    D, I = 32, 16
    x = torch.randn(num_tokens, D, generator=gen)
    gate_up_EFD = torch.randn(num_experts, 2 * I, D, generator=gen) * 0.1
    down_EDI = torch.randn(num_experts, D, I, generator=gen) * 0.1
    weights, ids = ops.route(torch.randn(num_tokens, num_experts, generator=gen), top_k, True)
    return x, ids, weights, gate_up_EFD, down_EDI


@pytest.mark.parametrize("impl", [pytest.param(i, marks=needs_fused) if i == "fused" else i for i in MOE_IMPLS])
@pytest.mark.parametrize("num_tokens", [1, 3, 64])
def test_matches_the_reference(impl, num_tokens):
    x, ids, weights, gate_up_EFD, down_EDI = _case(num_tokens)
    expected = ops.moe_experts(x, ids, weights, gate_up_EFD, down_EDI, impl="loop")
    got = moe_experts(x, ids, weights, gate_up_EFD.transpose(1, 2).contiguous(),
                      down_EDI.transpose(1, 2).contiguous(), impl)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_stacked_versions_with_offset_ids_equal_each_version_alone():
    x, ids, weights, gu0, dn0 = _case(40, seed=1)
    _, _, _, gu1, dn1 = _case(40, seed=2)
    version_N = (torch.arange(40) >= 25).long()  # rows 25.. belong to version 1
    stacked_gu = torch.cat([gu0, gu1]).transpose(1, 2).contiguous()
    stacked_dn = torch.cat([dn0, dn1]).transpose(1, 2).contiguous()
    got = moe_experts(x, ids + 8 * version_N[:, None], weights, stacked_gu, stacked_dn, "auto")
    alone0 = ops.moe_experts(x[:25], ids[:25], weights[:25], gu0, dn0)
    alone1 = ops.moe_experts(x[25:], ids[25:], weights[25:], gu1, dn1)
    torch.testing.assert_close(got, torch.cat([alone0, alone1]), atol=1e-6, rtol=1e-5)


def test_unknown_impl_is_rejected():
    x, ids, weights, gu, dn = _case(4)
    with pytest.raises(ValueError, match="moe impl must be one of"):
        moe_experts(x, ids, weights, gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous(), "fast")


def _engine_layout(gate_up_EFD, down_EDI, dtype=torch.float32):
    return gate_up_EFD.transpose(1, 2).contiguous().to(dtype), down_EDI.transpose(1, 2).contiguous().to(dtype)


@needs_fused
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_splits_a_hot_expert_across_threads_without_changing_the_result(threads):
    # 200 tokens, most routed to expert 0: its rows are cut into blocks dealt to different threads.
    x, ids, weights, gu, dn = _case(200, seed=3)
    ids[:150, 0] = 0
    ids[:150, 1] = torch.where(ids[:150, 1] == 0, 1, ids[:150, 1])
    expected = ops.moe_experts(x, ids, weights, gu, dn, impl="loop")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = moe_experts(x, ids, weights, *_engine_layout(gu, dn), "fused")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@needs_fused
def test_fused_bfloat16_matches_the_reference_in_bfloat16():
    x, ids, weights, gu, dn = _case(64, seed=4)
    expected = ops.moe_experts(x, ids, weights, gu, dn, impl="loop")
    got = moe_experts(x.bfloat16(), ids, weights.bfloat16(), *_engine_layout(gu, dn, torch.bfloat16), "fused")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


@needs_fused
def test_fused_rejects_bad_input_with_a_clear_error():
    x, ids, weights, gu, dn = _case(8)
    gu_e, dn_e = _engine_layout(gu, dn)
    bad_ids = ids.clone()
    bad_ids[3, 1] = 8
    with pytest.raises(RuntimeError, match=r"expert id 8 outside \[0, 8\)"):
        moe_experts(x, bad_ids, weights, gu_e, dn_e, "fused")
    with pytest.raises(RuntimeError, match="inference only"):
        moe_experts(x.clone().requires_grad_(), ids, weights, gu_e, dn_e, "fused")
    with pytest.raises(RuntimeError, match="shapes do not match"):
        moe_experts(x[:, :16].contiguous(), ids, weights, gu_e, dn_e, "fused")

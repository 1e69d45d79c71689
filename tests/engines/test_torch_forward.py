"""Pieces of the torch engine's forward that claim to compute the model's function bit for bit."""

import numpy as np
import pytest
import torch

from dora.engines.kv_cache import SlotCache
from dora.engines.scheduler import Scheduler, _split_long
from dora.engines.torch_forward import _rms_norm, _rms_norm_heads, _route
from dora.engines.versions import rope_pair_order, rope_pairs_adjacent
from dora.models import ops


@pytest.mark.parametrize("shape", [(1, 256), (64, 256), (7, 48)])
def test_rms_norm_is_the_models_bit_for_bit(shape):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=gen) * 3, torch.randn(shape[-1], generator=gen)
    assert torch.equal(_rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))
    qkv = torch.randn(shape[0], 8, 64, generator=gen)
    w_HDh = torch.randn(6, 64, generator=gen)
    assert torch.equal(_rms_norm_heads(qkv[:, :6], w_HDh, 1e-6), ops.rms_norm(qkv[:, :6], w_HDh, 1e-6))


def test_complex_rope_on_adjacent_pairs_is_apply_rope():
    assert rope_pairs_adjacent(torch.float32) and not rope_pairs_adjacent(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    N, heads, Dh = 33, 6, 64
    x = torch.randn(N, heads, Dh, generator=gen)
    cos, sin = ops.rope_cos_sin(torch.randint(0, 4000, (N,), generator=gen), Dh, 1e6, torch.float32)
    order = rope_pair_order(Dh)
    freqs = torch.complex(cos[:, :Dh // 2], sin[:, :Dh // 2])[:, None]
    rotated = torch.view_as_real(torch.view_as_complex(x[..., order].unflatten(-1, (-1, 2))) * freqs).flatten(-2)
    assert torch.equal(rotated, ops.apply_rope(x, cos, sin)[..., order])


def test_length_mask_shows_each_slot_its_keys():
    cache = SlotCache(num_layers=1, num_slots=4, max_len=12, num_kv_heads=1, head_dim=2, num_moe_layers=0, top_k=1,
                      routing_dtype=torch.uint8, dtype=torch.float32, device=torch.device("cpu"))
    mask = Scheduler(cache, 16, torch.device("cpu"), torch.float32)._length_mask([0, 3, 11, 5])
    assert mask.shape == (4, 1, 1, 12)
    visible = mask[:, 0, 0] == 0
    assert visible.sum(1).tolist() == [1, 4, 12, 6] and torch.equal(visible, visible.cummin(1).values)
    assert torch.isneginf(mask[:, 0, 0][~visible]).all()


def test_split_long_reads_the_fewest_keys():
    rng = np.random.default_rng(0)
    for _ in range(300):
        lengths = rng.integers(1, 300, rng.integers(1, 40))
        num_slots = len(lengths) + int(rng.integers(0, 4))
        keys = _split_long(lengths, num_slots)
        cost = lambda k: num_slots * k + 2 * int((lengths > k).sum()) * int(lengths.max())  # noqa: E731
        assert keys in lengths and cost(keys) == min(cost(int(k)) for k in lengths)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_route_picks_the_models_experts(norm_topk_prob):
    logits = torch.randn(512, 8, generator=torch.Generator().manual_seed(2))
    weights, ids = _route(logits, 2, norm_topk_prob)
    ref_weights, ref_ids = ops.route(logits, 2, norm_topk_prob)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-6)

"""Routing traces (synthetic, engine-recorded, .npz storage) and the cost model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dora.models.config import ModelConfig
from dora.moe import cost_model
from dora.moe.balancer import (
    BalancerConfig,
    contiguous_plan,
    place_nodes,
    plan_microbatch,
)
from dora.moe.plan import Topology
from dora.moe.traces import (
    TraceConfig,
    counts_from_ids,
    expert_probabilities,
    load_trace,
    record_engine_trace,
    save_trace,
    synthetic_counts,
    synthetic_ids,
)

SMALL = TraceConfig(num_experts=32, num_layers=3, top_k=4, tokens_per_microbatch=256, microbatches_per_step=4,
                    num_steps=2, num_hot=4, hot_share=0.3, hot_move_every=2)


def test_synthetic_counts_sum_to_token_slots_and_respect_top_k():
    p = expert_probabilities(SMALL)
    assert p.shape == (8, 3, 32) and np.allclose(p.sum(-1), 1) and p.max() <= 1 / SMALL.top_k + 1e-12
    counts = synthetic_counts(SMALL)
    assert counts.shape == (8, 3, 32) and (counts.sum(-1) == 256 * 4).all()


def test_hot_experts_move_every_few_microbatches():
    p = expert_probabilities(SMALL.replace(skew=0.0, microbatch_noise=0.0))
    hot = [frozenset(np.flatnonzero(p[m, 0] > 1.5 / 32).tolist()) for m in range(8)]
    assert all(len(h) == 4 for h in hot)
    assert hot[0] == hot[1] and hot[2] == hot[3] and hot[0] != hot[2]


def test_adversarial_dominant_expert_takes_its_share():
    p = expert_probabilities(SMALL.replace(dominant_token_share=0.6, num_hot=0, hot_share=0.0))
    assert np.allclose(p.max(-1), 0.6 / SMALL.top_k)


def test_synthetic_ids_are_distinct_per_token_and_round_trip_through_npz(tmp_path):
    ids = synthetic_ids(SMALL)
    assert ids.shape == (8 * 256, 3, 4) and ids.dtype == np.uint8
    assert (np.sort(ids, -1)[..., 1:] != np.sort(ids, -1)[..., :-1]).all()  # top-k picks distinct experts
    save_trace(tmp_path / "t.npz", num_experts=32, tokens_per_microbatch=256, ids_TLK=ids)
    trace = load_trace(tmp_path / "t.npz")
    np.testing.assert_array_equal(trace.ids_TLK, ids)
    np.testing.assert_array_equal(trace.counts_MLE, counts_from_ids(ids, 32, 256))
    assert (trace.counts_MLE.sum(-1) == 256 * 4).all()
    counts = synthetic_counts(SMALL)
    save_trace(tmp_path / "c.npz", num_experts=32, tokens_per_microbatch=256, counts_MLE=counts)
    np.testing.assert_array_equal(load_trace(tmp_path / "c.npz").counts_MLE, counts)


def test_bad_traces_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="hot_share"):
        TraceConfig(num_hot=2, top_k=8, hot_share=0.5)
    with pytest.raises(ValueError, match=r"\[tokens, layers, top_k\]"):
        counts_from_ids(np.zeros((4, 2)), 8, 2)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        counts_from_ids(np.full((4, 1, 2), 7), 4, 2)
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="x.npz"):
        load_trace(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="needs num_experts"):
        load_trace(tmp_path / "y.npz")


def test_engine_records_a_routing_trace_of_the_tiny_moe():
    torch.set_num_threads(1)
    cfg = ModelConfig.tiny()
    ids = record_engine_trace(cfg, num_sequences=6, prompt_len=4, max_new_tokens=5, seed=1)
    assert ids.ndim == 3 and ids.shape[1:] == (cfg.num_moe_layers, cfg.num_experts_per_tok)
    assert ids.shape[0] == 6 * (4 + 5 - 1)  # every fed token, the last sampled one excluded
    assert int(ids.max()) < cfg.num_experts
    np.testing.assert_array_equal(ids, record_engine_trace(cfg, num_sequences=6, prompt_len=4, max_new_tokens=5,
                                                           seed=1))


def test_cost_model_charges_the_slowest_rank_and_cross_node_copies():
    topo = Topology(num_experts=16, num_ranks=8, ranks_per_node=4, slots_per_rank=3)
    expert = cost_model.QWEN3_30B_A3B
    even = cost_model.layer_time(np.full(8, 1000), None, topo, expert)
    skewed = cost_model.layer_time(np.array([1500, 500, 1000, 1000, 1000, 1000, 1000, 1000]), None, topo, expert)
    assert skewed == pytest.approx(even * 1.5)
    counts = np.array([4000] + [100] * 15)
    placement = place_nodes(counts[None], topo)
    plan = plan_microbatch(counts, placement, topo, config=BalancerConfig(cross_node=False))
    move = cost_model.movement(None, plan, None, topo, expert)
    replicas = int((plan.num_replicas - 1).sum())
    assert replicas > 0 and move.inter_bytes_R.sum() == 0  # replicas stay inside the node
    assert move.intra_bytes_R.sum() == 2 * replicas * expert.weight_bytes  # weights in, gradients back
    # The hot expert overloads its node: the default config sheds to the other node, and the copies
    # there cross the inter-node link once each way (weights in, summed gradients back).
    shed = plan_microbatch(counts, placement, topo)
    move_shed = cost_model.movement(None, shed, None, topo, expert)
    assert move_shed.inter_bytes_R.sum() == 2 * expert.weight_bytes
    assert shed.rank_load().max() < plan.rank_load().max()
    none = contiguous_plan(counts, topo)
    assert cost_model.movement(none, none, none, topo, expert).total == 0
    assert cost_model.layer_time(plan.rank_load(), move, topo, expert) < cost_model.layer_time(
        none.rank_load(), None, topo, expert)

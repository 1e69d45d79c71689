"""Process entry points for the expert-parallel tests (spawned processes need importable functions)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from dora.models.config import ModelConfig
from dora.models.model import MoEBlock
from dora.moe.balancer import (
    BalancerConfig,
    contiguous_placement,
    contiguous_plan,
    place_nodes,
    plan_microbatch,
)
from dora.moe.expert_parallel import ExpertParallelMoE
from dora.moe.plan import Topology

TOKENS_PER_RANK = 7


def ep_equality_worker(rank: int, world: int, port: int, ranks_per_node: int, slots_per_rank: int,
                       replicas: bool, cross_node: bool, top_k: int) -> None:
    """EP forward and backward on this rank's tokens must equal the single-process MoEBlock's."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        cfg = ModelConfig.tiny(hidden_size=16, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=top_k)
        gen = torch.Generator().manual_seed(0)
        block = MoEBlock(cfg).double()
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
            block.gate.weight[0] += 2.0  # a hot expert, so replicas are worth making
        N = world * TOKENS_PER_RANK
        x = torch.randn(1, N, cfg.hidden_size, generator=gen, dtype=torch.float64) + 0.5
        g = torch.randn(1, N, cfg.hidden_size, generator=gen, dtype=torch.float64)

        x_ref = x.clone().requires_grad_()
        y_ref, ids = block(x_ref)
        (y_ref * g).sum().backward()

        topo = Topology(num_experts=8, num_ranks=world, ranks_per_node=ranks_per_node, slots_per_rank=slots_per_rank)
        counts = np.bincount(ids.reshape(-1).numpy(), minlength=8)
        if replicas:
            plan = plan_microbatch(counts, place_nodes(counts[None], topo), topo,
                                   config=BalancerConfig(cross_node=cross_node))
            assert plan.num_replicas.max() > 1, "the plan was meant to have replicas"
        else:
            plan = contiguous_plan(counts, topo)
        owner = contiguous_placement(topo).owner
        ep = ExpertParallelMoE(block, owner).double()

        rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
        x_local = x[:, rows].clone().requires_grad_()
        y_local, ids_local = ep(x_local, plan)
        (y_local * g[:, rows]).sum().backward()
        dist.all_reduce(ep.gate.weight.grad)  # the router is replicated: data-parallel gradient sum

        mine = torch.from_numpy(np.flatnonzero(owner == rank))
        torch.testing.assert_close(ids_local, ids.view(1, N, -1)[0, rows])
        torch.testing.assert_close(y_local, y_ref[:, rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x_local.grad, x_ref.grad[:, rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ep.gate.weight.grad, block.gate.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ep.gate_up.grad, block.experts.gate_up_proj.grad[mine], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ep.down.grad, block.experts.down_proj.grad[mine], rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()

"""Expert parallelism over gloo all-to-all equals the single-process MoE layer, forward and backward."""

from __future__ import annotations

import multiprocessing
import socket

import pytest
import torch.multiprocessing as mp
from moe_ep_workers import ep_equality_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("world", "ranks_per_node", "slots_per_rank", "replicas", "cross_node", "top_k"), [
    (2, 2, 4, False, False, 2),
    (2, 2, 5, True, False, 1),
    (4, 2, 3, True, True, 2),
])
def test_ep_forward_backward_equal_single_process(world, ranks_per_node, slots_per_rank, replicas, cross_node, top_k):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "dora.moe.expert_parallel", "moe_ep_workers"])
    mp.start_processes(ep_equality_worker, args=(world, _free_port(), ranks_per_node, slots_per_rank, replicas,
                                                 cross_node, top_k), nprocs=world, join=True, start_method="forkserver")

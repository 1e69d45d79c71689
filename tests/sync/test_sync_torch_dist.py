"""torch.distributed channel with two gloo processes on localhost."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp
from sync_workers import mp_context, torch_dist_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broadcast_delivers_bit_equal_versions_between_two_gloo_processes():
    mp_context()  # preload torch in the forkserver
    mp.start_processes(torch_dist_worker, args=(_free_port(),), nprocs=2, join=True, start_method="forkserver")

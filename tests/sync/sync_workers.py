"""Module-level helpers for the sync tests: weights with awkward dtypes/shapes, and process entry
points (spawned processes need importable functions)."""

from __future__ import annotations

import multiprocessing
import os
import time

import torch


def mp_context():
    """Processes forked from one forkserver that has torch and dora.sync imported: a child starts
    in a fraction of a second instead of re-importing torch (seconds on a loaded 2-core machine),
    and never inherits the test process's threads."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "dora.sync", "sync_workers"])
    return ctx


def awkward_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(37, 13, generator=g),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(3, 10, 7, generator=g).bfloat16(),
        "model.layers.0.self_attn.q_norm.weight": torch.randn(5, generator=g).half(),
        "model.norm.eps_scale": torch.tensor(1.25),  # 0-d
        "step_count": torch.tensor(123456789012, dtype=torch.int64),
        "routing.table": torch.randint(-128, 127, (9, 3), generator=g, dtype=torch.int8),
        "mask": torch.rand(11, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
        "lm_head.weight": torch.randn(13, 37, generator=g).t(),  # non-contiguous
    }


def filled_weights(version: int) -> dict[str, torch.Tensor]:
    """Many tensors, every element equal to `version`, so a torn read is visible."""
    out = {f"layers.{i}.w": torch.full((64, 257), float(version)) for i in range(16)}
    out["ids"] = torch.full((1031,), version, dtype=torch.int64)
    out["half"] = torch.full((333,), float(version), dtype=torch.bfloat16)
    return out


def shm_writer_publishing(config, num_versions: int, ready) -> None:
    """Publish versions 1..num_versions as fast as the channel allows, then wait for the parent."""
    from dora.sync.shm import ShmChannel

    torch.set_num_threads(1)
    channel = ShmChannel(config, "writer")
    for version in range(1, num_versions + 1):
        channel.publish(version, filled_weights(version))
    ready.wait(60)
    channel.close()


def shm_writer_then_sleep(config, queue) -> None:
    """Publish one version, report the segment path, then sleep until killed."""
    from dora.sync.shm import ShmChannel

    channel = ShmChannel(config, "writer")
    channel.publish(1, filled_weights(1))
    queue.put((os.getpid(), channel.path))
    time.sleep(120)


def torch_dist_worker(rank: int, port: int) -> None:
    """Rank 0 publishes two versions in many small buckets (with checksums); rank 1 checks them."""
    from datetime import timedelta

    import pytest
    import torch.distributed as dist

    from dora.sync import SyncConfig, SyncTimeout, build_channel
    from dora.sync.layout import as_bytes

    torch.set_num_threads(1)
    config = SyncConfig(channel="torch_dist", bucket_mb=1 / 1024, timeout_s=5, checksum=True)
    channel = build_channel(config, "writer" if rank == 0 else "reader", rank=rank, world_size=2, src=0,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        if rank == 1:
            assert channel.receive(timeout=0.05) is None  # nothing announced yet: no collective entered
        dist.barrier()
        if rank == 0:
            channel.publish(1, awkward_weights(1), step=0)
            channel.publish(2, awkward_weights(2), step=1)
            with pytest.raises(ValueError, match="cannot publish version 2 after version 2"):
                channel.publish(2, awkward_weights(2))
        else:
            for version in (1, 2):
                pv = channel.receive(timeout=20)
                assert pv.version == version and pv.step == version - 1
                want = awkward_weights(version)
                assert list(pv.weights) == list(want)
                for name, tensor in want.items():
                    assert pv.weights[name].dtype == tensor.dtype and pv.weights[name].shape == tensor.shape
                    assert torch.equal(as_bytes(pv.weights[name]), as_bytes(tensor)), name
            with pytest.raises(SyncTimeout, match=r"torch_dist: timed out after 0.1 s waiting for version 3"):
                channel.wait_for(3, timeout=0.1)
        dist.barrier()
        # A writer that announces version 3 and then never broadcasts (e.g. it hung): the reader's
        # collective fails after timeout_s, naming what it waited for, instead of hanging.
        if rank == 0:
            channel._store.set("sync/3", "3")
            channel._store.wait(["reader_timed_out"], timedelta(seconds=60))
        else:
            with pytest.raises(SyncTimeout, match=r"torch_dist: timed out after 5 s waiting for the header of "
                                                  r"version 3 from rank 0 \(rank 1, src 0\)"):
                channel.receive(timeout=5)
            channel._store.set("reader_timed_out", "1")
    finally:
        channel.close()
    assert not dist.is_initialized()

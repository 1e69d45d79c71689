"""Ray object-store channel on a local one-CPU cluster: a reader in a Ray worker process gets
bit-equal weights, skips to the newest version, and never goes back."""

from __future__ import annotations

import sys
import uuid

import pytest
import torch
from sync_workers import awkward_weights

from dora.sync import SyncConfig, SyncTimeout, build_channel
from dora.sync.layout import as_bytes

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _receive_in_worker(config: SyncConfig, after: int) -> list[tuple[int, int, dict[str, bytes]]]:
    """Runs in a Ray worker: receive everything newer than `after` for one second."""
    reader = build_channel(config, "reader")
    got = []
    while (pv := reader.receive(timeout=1.0)) is not None and pv.version > after:
        got.append((pv.version, pv.step, {k: (str(t.dtype), tuple(t.shape), as_bytes(t).numpy().tobytes())
                                          for k, t in pv.weights.items()}))
        after = pv.version
    return got


def test_ray_channel_delivers_newest_version_to_a_worker(local_ray):
    config = SyncConfig(channel="ray", name=f"test-{uuid.uuid4().hex[:8]}", bucket_mb=1 / 1024,
                        checksum=True, timeout_s=30)
    writer = build_channel(config, "writer")
    try:
        writer.publish(1, awkward_weights(1), step=0)
        writer.publish(4, awkward_weights(4), step=3)  # a busy reader skips version 1
        with pytest.raises(ValueError, match="cannot publish version 2 after version 4"):
            writer.publish(2, awkward_weights(2))
        # Workers cannot import this test module by name: ship the function by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        remote = ray.remote(num_cpus=1)(_receive_in_worker)
        got = ray.get(remote.remote(config, -1), timeout=60)
        assert [(version, step) for version, step, _ in got] == [(4, 3)]
        want = awkward_weights(4)
        assert list(got[0][2]) == list(want)
        for name, tensor in want.items():
            assert got[0][2][name] == (str(tensor.dtype), tuple(tensor.shape), as_bytes(tensor).numpy().tobytes())
        # A reader in this process, too; it times out naming the version it waited for.
        reader = build_channel(config, "reader")
        pv = reader.receive(timeout=10)
        assert pv.version == 4 and torch.equal(as_bytes(pv.weights["lm_head.weight"]), as_bytes(want["lm_head.weight"]))
        with pytest.raises(SyncTimeout, match=r"ray: timed out after 0.1 s waiting for version 5"):
            reader.wait_for(5, timeout=0.1)
        reader.close()
    finally:
        writer.close()

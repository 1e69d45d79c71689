"""Contract tests every local channel must pass: bit-equal delivery, increasing versions,
timeouts that name what they waited for, the background receiver, config validation."""

from __future__ import annotations

import threading
import uuid

import pytest
import torch
from omegaconf import OmegaConf
from sync_workers import awkward_weights

from dora.sync import (
    CHANNELS, ReadMode, SyncConfig, SyncReceiver, SyncTimeout, build_channel,
)
from dora.sync.layout import WeightLayout, as_bytes


def _config(channel: str, **kw) -> SyncConfig:
    return SyncConfig(channel=channel, name=f"dora-test-{uuid.uuid4().hex[:10]}", timeout_s=5.0, **kw)


def _pair(config: SyncConfig):
    """(writer, reader) for a local channel; the in-process channel is one object for both."""
    if config.channel == "inprocess":
        channel = build_channel(config, "both")
        return channel, channel
    return build_channel(config, "writer"), build_channel(config, "reader")


LOCAL = [("inprocess", {}), ("shm", {}), ("shm", {"read_mode": "view"}), ("shm", {"checksum": True})]
IDS = ["inprocess", "shm-copy", "shm-view", "shm-checksum"]


def assert_bit_equal(got, want) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(tensor)), name


@pytest.mark.parametrize(("channel", "kw"), LOCAL, ids=IDS)
def test_delivers_bit_equal_weights_in_increasing_versions(channel, kw):
    writer, reader = _pair(_config(channel, **kw))
    try:
        assert reader.receive(timeout=0.01) is None
        for version in (0, 1, 5):
            weights = awkward_weights(seed=version)
            receipt = writer.publish(version, weights, step=version + 10)
            assert receipt.nbytes >= sum(t.numel() * t.element_size() for t in weights.values())
            pv = reader.receive(timeout=5)
            assert pv is not None and pv.version == version and pv.step == version + 10
            assert_bit_equal(pv.weights, weights)
            reader.release(version)
        assert reader.receive(timeout=0.01) is None  # nothing newer: never re-delivers 5
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize(("channel", "kw"), LOCAL[:2], ids=IDS[:2])
def test_versions_only_increase(channel, kw):
    writer, reader = _pair(_config(channel, **kw))
    try:
        writer.publish(3, awkward_weights())
        for stale in (3, 2):
            with pytest.raises(ValueError, match=f"cannot publish version {stale} after version 3"):
                writer.publish(stale, awkward_weights())
        with pytest.raises(ValueError, match="version must be an int >= 0"):
            writer.publish(-1, awkward_weights())
        # Several publishes while the reader was busy: it skips to the newest, never back.
        writer.publish(4, awkward_weights(4))
        writer.publish(7, awkward_weights(7))
        pv = reader.receive(timeout=5)
        assert pv.version == 7
        assert_bit_equal(pv.weights, awkward_weights(7))
        assert reader.receive(timeout=0.01) is None
        assert reader.last_delivered == 7
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize(("channel", "kw"), LOCAL[:2], ids=IDS[:2])
def test_wait_for_times_out_naming_channel_version_and_seconds(channel, kw):
    writer, reader = _pair(_config(channel, **kw))
    try:
        writer.publish(1, awkward_weights())
        with pytest.raises(SyncTimeout, match=rf"{channel}: timed out after 0.05 s waiting for version 2 "
                                              r"\(newest delivered: 1\)"):
            reader.wait_for(2, timeout=0.05)
    finally:
        writer.close()
        reader.close()


def test_published_layout_is_fixed():
    writer, reader = _pair(_config("shm"))
    try:
        writer.publish(1, {"a": torch.zeros(4), "b": torch.zeros(2, dtype=torch.int32)})
        with pytest.raises(ValueError, match=r"weight 'a' is torch.float32 \(5,\).*expects torch.float32 \(4,\)"):
            writer.publish(2, {"a": torch.zeros(5), "b": torch.zeros(2, dtype=torch.int32)})
        with pytest.raises(ValueError, match=r"missing \['b'\]"):
            writer.publish(2, {"a": torch.zeros(4)})
    finally:
        writer.close()
        reader.close()


def test_inprocess_copy_is_detached_and_no_copy_shares():
    config = _config("inprocess")
    copying, sharing = build_channel(config, "both"), build_channel(config, "both", copy=False)
    weights = {"w": torch.ones(3)}
    copying.publish(1, weights)
    sharing.publish(1, weights)
    weights["w"].add_(1)  # the trainer mutates in place after publishing
    assert torch.equal(copying.receive(1).weights["w"], torch.ones(3))
    assert sharing.receive(1).weights["w"].data_ptr() == weights["w"].data_ptr()


def test_receiver_thread_delivers_in_order_and_reports_errors():
    channel = build_channel(_config("inprocess"), "both")
    seen: list[int] = []
    arrived = threading.Semaphore(0)

    def on_version(pv):
        seen.append(pv.version)
        arrived.release()

    with SyncReceiver(channel, on_version, poll_s=0.01) as receiver:
        for version in range(1, 6):
            channel.publish(version, {"w": torch.full((4,), float(version))})
            assert arrived.acquire(timeout=5)
    assert seen == [1, 2, 3, 4, 5] and receiver.delivered == seen

    def failing(pv):
        raise RuntimeError(f"engine rejected version {pv.version}")

    receiver = SyncReceiver(channel, failing, poll_s=0.01).start()
    channel.publish(6, {"w": torch.zeros(4)})
    receiver._thread.join(5)
    with pytest.raises(RuntimeError, match="engine rejected version 6"):
        receiver.stop()


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="sync.channel: unknown channel 'nccl'; registered: inprocess, ray, shm"):
        SyncConfig(channel="nccl")
    with pytest.raises(ValueError, match="sync.bucket_mb"):
        SyncConfig(bucket_mb=0)
    with pytest.raises(ValueError, match="sync.timeout_s"):
        SyncConfig(timeout_s=-1)
    with pytest.raises(ValueError, match=r"sync.read_mode must be one of \['copy', 'view'\]"):
        SyncConfig(read_mode="mmap")
    with pytest.raises(ValueError, match="sync.device"):
        SyncConfig(device="tpu9")
    with pytest.raises(ValueError, match="sync.name"):
        SyncConfig(name="a/b")
    with pytest.raises(ValueError, match="sync.device must be 'cpu'"):
        build_channel(SyncConfig(channel="shm", read_mode="view", device="cuda"), "reader")
    node = OmegaConf.structured(SyncConfig)
    node.channel, node.read_mode, node.bucket_mb = "shm", "view", 8
    config = OmegaConf.to_object(node)
    assert config.read_mode is ReadMode.view and config.bucket_bytes == 8 << 20
    assert set(CHANNELS.names()) >= {"inprocess", "shm", "torch_dist", "ray"}


def test_layout_round_trips_and_buckets_cover_the_buffer():
    weights = awkward_weights()
    layout = WeightLayout.of(weights)
    assert WeightLayout.from_json(layout.to_json()) == layout
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layout.pack(weights, flat)
    assert_bit_equal(layout.views(flat), weights)
    ranges = list(layout.buckets(1000))
    assert ranges[0][0] == 0 and ranges[-1][1] == layout.nbytes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(end - start <= 1000 for start, end in ranges)


def test_staging_pool_recycles_released_buffers_and_forgets_unreleased_ones():
    from dora.sync.base import StagingPool

    pool = StagingPool("cpu", max_free=1, max_tracked=2)
    first = pool.acquire(1, 64)
    pool.release(1)
    assert pool.acquire(2, 64).data_ptr() == first.data_ptr()  # recycled
    pool.acquire(3, 64)
    pool.acquire(4, 64)  # version 2 is no longer tracked: a reader that never releases leaks nothing
    assert sorted(pool._in_use) == [3, 4]
    pool.release(2)  # unknown: nothing to recycle
    assert pool._free == []

"""Shared-memory channel: no torn reads under a concurrent writer process, pinning in view mode,
checksums, and segment cleanup after close, SIGTERM and SIGKILL."""

from __future__ import annotations

import os
import signal
import uuid

import pytest
import torch
from sync_workers import filled_weights, mp_context, shm_writer_publishing, shm_writer_then_sleep

import dora.sync.shm as shm
from dora.sync import ChecksumError, ShmChannel, SyncConfig, SyncTimeout, cleanup_stale

NUM_VERSIONS = 100


def _config(**kw) -> SyncConfig:
    kw.setdefault("timeout_s", 30.0)
    return SyncConfig(channel="shm", name=f"dora-test-{uuid.uuid4().hex[:10]}", **kw)


def _segments(prefix: str) -> list[str]:
    return [e for e in os.listdir(shm.SHM_DIR) if e.startswith(prefix + ".")]


def assert_uniform(pv) -> None:
    for name, tensor in pv.weights.items():
        values = torch.unique(tensor.float())
        assert values.tolist() == [float(pv.version)], f"{name} of version {pv.version} holds {values.tolist()}"


@pytest.mark.parametrize("read_mode", ["copy", "view"])
def test_reader_never_sees_a_half_written_version(read_mode):
    """A writer process publishes versions 1..N (every element == its version) as fast as it can;
    this process reads concurrently and checks each delivered version is uniformly its number."""
    config = _config(read_mode=read_mode)
    ctx = mp_context()
    done = ctx.Event()
    writer = ctx.Process(target=shm_writer_publishing, args=(config, NUM_VERSIONS, done), daemon=True)
    writer.start()
    reader = ShmChannel(config, "reader")
    try:
        delivered = []
        while not delivered or delivered[-1] < NUM_VERSIONS:
            pv = reader.receive(timeout=30)
            assert pv is not None, f"no version after {delivered[-1:]} within 30 s"
            assert_uniform(pv)
            delivered.append(pv.version)
            reader.release(pv.version)
        assert delivered == sorted(set(delivered))  # strictly increasing
    finally:
        reader.close()
        done.set()
        writer.join(30)
    assert writer.exitcode == 0
    assert _segments(config.name) == []


@pytest.mark.parametrize(("published_during_copy", "delivered"), [((2,), 1), ((2, 3), 3)])
def test_a_lapped_copy_is_discarded_and_retried(monkeypatch, published_during_copy, delivered):
    """Deterministic version of the race. One publish during the reader's copy writes the other
    slot, so the copy of version 1 is intact and returned; a second one overwrites the slot being
    copied, so that copy is discarded and the reader retries on version 3."""
    config = _config()
    writer, reader = ShmChannel(config, "writer"), ShmChannel(config, "reader")
    writer.publish(1, filled_weights(1))
    real_copy = shm.copy_chunked
    laps = iter([published_during_copy])

    def copy_while_writer_publishes(dst, src):
        real_copy(dst, src)
        for version in next(laps, ()):
            writer.publish(version, filled_weights(version))

    monkeypatch.setattr(shm, "copy_chunked", copy_while_writer_publishes)
    try:
        pv = reader.receive(timeout=5)
        assert pv.version == delivered
        assert_uniform(pv)
    finally:
        writer.close()
        reader.close()


def test_view_mode_pins_the_slot_until_release():
    config = _config(read_mode="view", timeout_s=0.2)
    writer, reader = ShmChannel(config, "writer"), ShmChannel(config, "reader")
    try:
        writer.publish(1, filled_weights(1))
        first = reader.receive(timeout=5)
        writer.publish(2, filled_weights(2))  # the other slot: allowed while 1 is pinned
        second = reader.receive(timeout=5)
        with pytest.raises(SyncTimeout, match=r"shm: timed out after 0.2 s waiting for reader pid\(s\) "
                                              rf"\[{os.getpid()}\] to release version 1 \(slot 0\) before "
                                              r"publishing version 3"):
            writer.publish(3, filled_weights(3))
        assert_uniform(first)  # the writer did not touch the pinned slot
        reader.release(1)
        writer.publish(3, filled_weights(3))
        assert_uniform(second)
        assert reader.receive(timeout=5).version == 3
    finally:
        writer.close()
        reader.close()


def test_checksum_mismatch_is_detected():
    config = _config(checksum=True)
    writer, reader = ShmChannel(config, "writer"), ShmChannel(config, "reader")
    try:
        writer.publish(1, filled_weights(1))
        writer._seg.slots[0][100] ^= 0xFF  # a bit flip in the committed slot
        with pytest.raises(ChecksumError, match="checksum mismatch in weight 'layers.0.w' of version 1"):
            reader.receive(timeout=5)
    finally:
        writer.close()
        reader.close()


def test_segment_removed_on_close_and_readers_keep_their_copy():
    config = _config()
    writer, reader = ShmChannel(config, "writer"), ShmChannel(config, "reader")
    writer.publish(1, filled_weights(1))
    pv = reader.receive(timeout=5)
    assert len(_segments(config.name)) == 1
    writer.close()
    assert _segments(config.name) == []
    assert_uniform(pv)
    assert reader.receive(timeout=0.05) is None  # the writer is gone: nothing newer
    reader.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_segment_of_a_killed_writer_is_removed(sig):
    """SIGTERM: the writer's handler unlinks it. SIGKILL: nothing runs in the writer, so the next
    writer with the same name removes it (its owner pid is dead)."""
    config = _config()
    ctx = mp_context()
    queue = ctx.Queue()
    proc = ctx.Process(target=shm_writer_then_sleep, args=(config, queue), daemon=True)
    proc.start()
    pid, path = queue.get(timeout=60)
    assert os.path.exists(path) and path.endswith(f"{config.name}.{pid}")
    os.kill(pid, sig)
    proc.join(30)
    if sig == signal.SIGKILL:
        assert os.path.exists(path)  # nobody could clean up yet
        ShmChannel(config, "writer").close()  # the next start
    assert not os.path.exists(path)
    assert _segments(config.name) == []


def test_cleanup_stale_spares_live_owners():
    config = _config()
    writer = ShmChannel(config, "writer")
    writer.publish(1, filled_weights(1))
    dead = os.path.join(shm.SHM_DIR, f"{config.name}.{2**22 + 12345}.init")  # beyond pid_max
    open(dead, "wb").close()
    try:
        assert cleanup_stale(config.name) == [dead]
        assert _segments(config.name) == [os.path.basename(writer.path)]
    finally:
        writer.close()

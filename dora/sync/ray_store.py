"""Ray object-store channel: trainer and engines are Ray actors/drivers of one Ray cluster.

The writer packs each version into one reused flat host buffer and `ray.put`s it in buckets of
`sync.bucket_mb` (the object store copies them; the writer may mutate its weights as soon as
`publish` returns). The handles go to a small named board actor (`dora-sync-{sync.name}`, 0 CPUs)
that keeps only the newest version; readers long-poll the board, `ray.get` the buckets (zero-copy
views of the local object store) and copy them into a staging buffer they own. A reader that was
busy skips to the newest version.

The objects are owned by the writer process: they live while the writer does (Ray's ownership
model), and the board drops the previous version's handles on every publish, so the store holds
at most two versions at a time (the newest, and one a reader may still be fetching).

Readers find the board by name, so writer and readers must share a Ray namespace (one job does;
separate drivers pass the same `ray.init(namespace=...)`). Ray is imported only when a channel is
built, keeping `import dora.sync` cheap.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from dora.sync.base import (
    CHANNELS, ChecksumError, StagingPool, SyncConfig, SyncRole, SyncTimeout, WeightChannel,
)
from dora.sync.layout import WeightLayout, checksum, copy_chunked
from dora.types import PolicyVersion


class VersionBoard:
    """The board actor's class: the newest version's metadata and object handles."""

    def __init__(self) -> None:
        self._newest: dict | None = None
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # created on the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def publish(self, entry: dict) -> None:
        async with self._condition():
            self._newest = entry
            self._condition().notify_all()

    async def wait_newer(self, after: int, timeout: float) -> dict | None:
        """The newest entry if its version is > `after`, waiting up to `timeout` seconds."""
        cond = self._condition()
        async with cond:
            try:
                await asyncio.wait_for(
                    cond.wait_for(lambda: self._newest is not None and self._newest["version"] > after), timeout)
            except asyncio.TimeoutError:
                return None
            return self._newest


@CHANNELS.register("ray")
class RayChannel(WeightChannel):
    name = "ray"

    def __init__(self, config: SyncConfig, role: SyncRole) -> None:
        super().__init__(config, role)
        import ray

        if not ray.is_initialized():
            raise ValueError("ray channel: call ray.init() (or run inside a Ray worker) before building it")
        self._ray = ray
        self.board_name = f"dora-sync-{config.name}"
        if self.role == SyncRole.writer:
            board_cls = ray.remote(num_cpus=0, max_concurrency=64)(VersionBoard)
            self._board = board_cls.options(name=self.board_name, get_if_exists=True).remote()
        else:
            self._board = None
        self._flat: np.ndarray | None = None
        self._layout: WeightLayout | None = None
        self._pool = StagingPool(config.device)

    def _find_board(self, deadline: float) -> bool:
        while self._board is None:
            try:
                self._board = self._ray.get_actor(self.board_name)
            except ValueError:  # not created yet
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
        return True

    # -- writer ----------------------------------------------------------------------------------
    def _publish(self, version: int, weights: Mapping[str, torch.Tensor], step: int) -> int:
        if self._layout is None:
            self._layout = WeightLayout.of(weights)
            self._flat = np.zeros(self._layout.nbytes, dtype=np.uint8)
        layout, flat = self._layout, self._flat
        layout.check(weights, self.name)
        flat_t = torch.from_numpy(flat)
        layout.pack(weights, flat_t)
        ranges = list(layout.buckets(self.config.bucket_bytes))
        refs = [self._ray.put(flat[start:end]) for start, end in ranges]
        sums = [checksum(flat_t[start:end]) for start, end in ranges] if self.config.checksum else None
        entry = {"version": version, "step": step, "layout": layout.to_json(), "ranges": ranges,
                 "refs": refs, "sums": sums}
        try:
            self._ray.get(self._board.publish.remote(entry), timeout=self.config.timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            raise SyncTimeout(self.name, f"board actor {self.board_name!r} to accept version {version}",
                              self.config.timeout_s) from None
        return layout.nbytes

    # -- reader ----------------------------------------------------------------------------------
    def _receive(self, after: int, timeout: float) -> PolicyVersion | None:
        deadline = time.monotonic() + timeout
        if not self._find_board(deadline):
            return None
        ray = self._ray
        remaining = max(0.0, deadline - time.monotonic())
        # The actor bounds its own wait; the extra seconds only cover the round trip.
        try:
            entry = ray.get(self._board.wait_newer.remote(after, remaining), timeout=remaining + self.config.timeout_s)
        except ray.exceptions.RayActorError:
            self._board = None  # the writer closed or died; a restarted writer creates a new board
            return None
        if entry is None:
            return None
        version = entry["version"]
        try:
            buckets = ray.get(entry["refs"], timeout=self.config.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise SyncTimeout(self.name, f"the {len(entry['refs'])} buckets of version {version}",
                              self.config.timeout_s) from None
        layout = WeightLayout.from_json(entry["layout"])
        flat = self._pool.acquire(version, layout.nbytes)
        with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            for i, ((start, end), bucket) in enumerate(zip(entry["ranges"], buckets)):
                host = torch.from_numpy(bucket)
                # Verified on the host bytes, where the writer computed it (CRC-32 on CPU).
                if entry["sums"] is not None and (got := checksum(host)) != entry["sums"][i]:
                    self._pool.release(version)
                    raise ChecksumError(f"ray: checksum mismatch in bucket {i + 1} of version {version} "
                                        f"(expected {entry['sums'][i]:#x}, got {got:#x})")
                copy_chunked(flat[start:end], host)
        del buckets  # unpin the object-store buffers
        return PolicyVersion(version=version, weights=layout.views(flat), step=entry["step"])

    def release(self, version: int) -> None:
        self._pool.release(version)

    def close(self) -> None:
        if self.role == SyncRole.writer and self._board is not None:
            self._ray.kill(self._board)
        self._board = None

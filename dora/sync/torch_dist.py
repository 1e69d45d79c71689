"""torch.distributed channel: the trainer rank broadcasts each version to the engine ranks
(gloo on CPU, NCCL when `sync.device` is a CUDA device).

Per version, all from rank `src`:
1. an announcement in the channel's TCPStore (`sync/{n}` = version), so a reader can poll for a
   new version without entering a collective it cannot leave (`receive(timeout)` returns None
   when nothing was announced in time);
2. a broadcast of the header [version, step, layout bytes, flat bytes, buckets] and of the layout
   JSON (names, dtypes, shapes, offsets);
3. the flat weights, one broadcast per bucket of `sync.bucket_mb` (the writer packs each bucket into
   a reused buffer; readers receive straight into their staging buffer, no unpack copy);
4. with the writer's `sync.checksum`, one more broadcast of its per-bucket checksums (the header
   carries the flag, so readers follow the writer's setting).

Broadcast is a collective: every reader receives every version, in order (no skipping), and the
writer's `publish` returns when the readers have joined. The process group is created with
`timeout=sync.timeout_s`, so a dead peer fails the collective with SyncTimeout instead of hanging.

If torch.distributed is not yet initialized the channel initializes it over its own store and
destroys it in `close()`; otherwise it builds a subgroup of the whole world (ranks are global).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from dora.sync.base import (
    CHANNELS, ChecksumError, StagingPool, SyncConfig, SyncRole, SyncTimeout, WeightChannel,
)
from dora.sync.layout import WeightLayout, as_bytes, checksum
from dora.types import PolicyVersion

HEADER_WORDS = 6  # version, step, layout json bytes, flat bytes, number of buckets, checksums on


@CHANNELS.register("torch_dist")
class TorchDistChannel(WeightChannel):
    name = "torch_dist"

    def __init__(self, config: SyncConfig, role: SyncRole, *, rank: int, world_size: int, src: int = 0,
                 init_method: str = "tcp://127.0.0.1:29511") -> None:
        """`init_method`: tcp://host:port of the channel's store, served by rank `src`."""
        super().__init__(config, role)
        if not 0 <= src < world_size or not 0 <= rank < world_size:
            raise ValueError(f"torch_dist: need 0 <= rank ({rank}), src ({src}) < world_size ({world_size})")
        expected = SyncRole.writer if rank == src else SyncRole.reader
        if self.role != expected:
            raise ValueError(f"torch_dist: rank {rank} must be a {expected.value} (src={src}), "
                             f"got role {self.role.value}")
        url = urlparse(init_method)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise ValueError(f"torch_dist: init_method must look like 'tcp://host:port', got {init_method!r}")
        self.rank, self.world_size, self.src = rank, world_size, src
        self.device = torch.device(config.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=config.timeout_s)
        self._store = dist.TCPStore(url.hostname, url.port, world_size, is_master=rank == src, timeout=timeout)
        self._owns_world = not dist.is_initialized()
        if self._owns_world:
            dist.init_process_group(backend, store=dist.PrefixStore("pg", self._store), rank=rank,
                                    world_size=world_size, timeout=timeout)
            self._group = None
        else:
            self._group = dist.new_group(backend=backend, timeout=timeout)
        self._pool = StagingPool(config.device)
        self._bucket: torch.Tensor | None = None
        self._layout: WeightLayout | None = None
        self._layout_json = b""
        self._num_announced = 0
        self._closed = False

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:  # dist.DistError, or gloo's plain RuntimeError
            if "timeout" in str(e).lower() or "timed out" in str(e).lower():
                raise SyncTimeout(self.name, f"{what} (rank {self.rank}, src {self.src})",
                                  self.config.timeout_s) from e
            raise

    def _broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=self.src, group=self._group)

    # -- writer ----------------------------------------------------------------------------------
    def _publish(self, version: int, weights: Mapping[str, torch.Tensor], step: int) -> int:
        if self._closed:
            raise ValueError(f"torch_dist: publish of version {version} on a closed channel")
        if self._layout is None:
            self._layout = WeightLayout.of(weights)
            self._layout_json = self._layout.to_json().encode()
        layout = self._layout
        layout.check(weights, self.name)
        ranges = list(layout.buckets(self.config.bucket_bytes))
        self._num_announced += 1
        self._store.set(f"sync/{self._num_announced}", str(version))
        weight_bytes = {name: as_bytes(t) for name, t in weights.items()}
        if self._bucket is None:
            self._bucket = torch.zeros(max(end - start for start, end in ranges), dtype=torch.uint8, device=self.device)
        header = torch.tensor([version, step, len(self._layout_json), layout.nbytes, len(ranges),
                               int(self.config.checksum)],
                              dtype=torch.int64, device=self.device)
        sums = []
        with self._collective(f"readers to join the broadcast of version {version}"):
            self._broadcast(header)
            self._broadcast(torch.frombuffer(bytearray(self._layout_json), dtype=torch.uint8).to(self.device))
            for i, (start, end) in enumerate(ranges):
                bucket = self._bucket[:end - start]
                layout.pack_range(weight_bytes, start, end, bucket)
                if self.config.checksum:
                    sums.append(checksum(bucket))
                self._broadcast(bucket)
            if self.config.checksum:
                self._broadcast(torch.tensor(sums, dtype=torch.int64, device=self.device))
        return layout.nbytes

    # -- reader ----------------------------------------------------------------------------------
    def _receive(self, after: int, timeout: float) -> PolicyVersion | None:
        key = f"sync/{self._num_announced + 1}"
        deadline = time.monotonic() + timeout
        poll = self.config.poll_s
        while not self._store.check([key]):
            if self._closed or time.monotonic() >= deadline:
                return None
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(poll * 2, 0.005)
        self._num_announced += 1
        announced = int(self._store.get(key))
        what = f"version {announced} from rank {self.src}"
        header = torch.empty(HEADER_WORDS, dtype=torch.int64, device=self.device)
        with self._collective(f"the header of {what}"):
            self._broadcast(header)
        version, step, layout_len, nbytes, num_buckets, with_sums = (int(x) for x in header.tolist())
        assert version == announced, f"announced version {announced}, broadcast header says {version}"
        layout_bytes = torch.empty(layout_len, dtype=torch.uint8, device=self.device)
        with self._collective(f"the layout of {what}"):
            self._broadcast(layout_bytes)
        layout = WeightLayout.from_json(bytes(layout_bytes.cpu().numpy()).decode())
        assert layout.nbytes == nbytes
        ranges = list(layout.buckets(self.config.bucket_bytes))
        if len(ranges) != num_buckets:
            raise ValueError(f"torch_dist: rank {self.rank} splits version {version} into {len(ranges)} buckets, "
                             f"the writer into {num_buckets}: every rank must use the same sync.bucket_mb")
        flat = self._pool.acquire(version, nbytes)
        for i, (start, end) in enumerate(ranges):
            with self._collective(f"bucket {i + 1}/{num_buckets} of {what}"):
                self._broadcast(flat[start:end])
        if with_sums:
            sums = torch.empty(num_buckets, dtype=torch.int64, device=self.device)
            with self._collective(f"the checksums of {what}"):
                self._broadcast(sums)
            for i, ((start, end), want) in enumerate(zip(ranges, sums.tolist())):
                got = checksum(flat[start:end])
                if got != want:
                    self._pool.release(version)
                    raise ChecksumError(f"torch_dist: checksum mismatch in bucket {i + 1}/{num_buckets} of "
                                        f"version {version} (expected {want:#x}, got {got:#x})")
        return PolicyVersion(version=version, weights=layout.views(flat), step=step)

    def release(self, version: int) -> None:
        self._pool.release(version)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_world:
            if dist.is_initialized():
                dist.destroy_process_group()
        elif self._group is not None:
            dist.destroy_process_group(self._group)
        self._bucket = None

"""The weight-sync channel interface, its config and the rules every channel keeps.

Flow: Trainer --publish(version, weights)--> channel --receive()--> SyncReceiver --> Engine.add_version.

A channel has a writer side (the trainer: `publish`) and a reader side (each engine: `receive`).
Rules shared by every channel (checked here, once, not in each channel):

- **Versions only increase.** Publishing a version <= the last published one is a ValueError.
  A reader never delivers a version <= one it already delivered. A reader that was busy while
  several versions were published may skip straight to the newest one (shm, ray: they keep only
  the newest; torch_dist is a collective and delivers every version, in order).
- **Atomic visibility.** `receive` returns a complete version or nothing, never a mix of two.
- **Every wait has a timeout** whose error (`SyncTimeout`) names the channel, what was waited for
  and for how long. `receive(timeout)` returning None just means "nothing newer yet".
- **Ownership.** By default a delivered `PolicyVersion` owns its tensors (a staging copy the
  writer never touches again). `release(version)` tells the channel the reader no longer uses
  them, so it can recycle the staging buffer (or, in shm's zero-copy mode, unpin the slot).
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from dora.registry import Registry
from dora.types import PolicyVersion

CHANNELS: Registry[type[WeightChannel]] = Registry("sync channel")


class ReadMode(str, enum.Enum):
    copy = "copy"
    """The reader copies each version into a staging buffer it owns (default, every channel)."""
    view = "view"
    """shm only: the reader gets zero-copy views of the shared segment, valid until `release`."""


class SyncRole(str, enum.Enum):
    writer = "writer"
    reader = "reader"
    both = "both"
    """One object used by both sides (the in-process channel)."""


@dataclass(slots=True)
class SyncConfig:
    """`sync:` config group. Hydra-friendly: plain types and enums, validated on construction."""

    channel: str = "inprocess"
    """A registered channel (inprocess, shm, torch_dist, ray) or an import path 'pkg.module:Class'."""
    bucket_mb: float = 64.0
    """torch_dist: bytes per broadcast; ray: bytes per object-store blob."""
    timeout_s: float = 120.0
    """Bound on every blocking wait (attach, collective, pinned slot, object fetch)."""
    checksum: bool = False
    """Writer stores a CRC-32 per bucket/tensor; the reader verifies it and raises on mismatch."""
    device: str = "cpu"
    """Where the reader stages received weights (torch_dist broadcasts on it: cuda means NCCL)."""
    read_mode: ReadMode = ReadMode.copy
    name: str = "dora"
    """Run-unique name: prefix of shm segments, name of the Ray board actor. Two runs on one machine
    must use different names."""
    poll_s: float = 0.001
    """shm, torch_dist: first polling interval while waiting for a new version (doubles up to a few ms)."""

    def __post_init__(self) -> None:
        if not isinstance(self.channel, str) or not self.channel:
            raise ValueError(f"sync.channel must be a channel name, got {self.channel!r}")
        if self.channel not in CHANNELS and "." not in self.channel and ":" not in self.channel:
            raise ValueError(f"sync.channel: unknown channel {self.channel!r}; registered: "
                             f"{', '.join(CHANNELS.names())} (or an import path 'pkg.module:Class')")
        if not self.bucket_mb > 0:
            raise ValueError(f"sync.bucket_mb must be > 0, got {self.bucket_mb}")
        if not self.timeout_s > 0:
            raise ValueError(f"sync.timeout_s must be > 0, got {self.timeout_s}")
        if not self.poll_s > 0:
            raise ValueError(f"sync.poll_s must be > 0, got {self.poll_s}")
        try:
            self.read_mode = ReadMode(self.read_mode)
        except ValueError:
            raise ValueError(f"sync.read_mode must be one of {[m.value for m in ReadMode]}, "
                             f"got {self.read_mode!r}") from None
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"sync.device must be a torch device ('cpu', 'cuda', 'cuda:1'), "
                             f"got {self.device!r}") from None
        if not self.name or "/" in self.name or not self.name.isprintable():
            raise ValueError(f"sync.name must be a non-empty file-name-safe string, got {self.name!r}")

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self.bucket_mb * (1 << 20)))


class SyncTimeout(TimeoutError):
    """A sync wait ran out of time. The message names the channel, what it waited for and how long."""

    def __init__(self, channel: str, what: str, seconds: float) -> None:
        super().__init__(f"{channel}: timed out after {seconds:g} s waiting for {what}")
        self.channel = channel
        self.what = what
        self.seconds = seconds


class ChecksumError(RuntimeError):
    pass


@dataclass(slots=True, frozen=True)
class PublishReceipt:
    version: int
    nbytes: int
    seconds: float
    """Time the writer spent in publish (not the readers' receive)."""

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


class WeightChannel(ABC):
    """Base of every channel: version bookkeeping here, transport in `_publish` / `_receive`."""

    name: ClassVar[str]

    def __init__(self, config: SyncConfig, role: SyncRole) -> None:
        self.config = config
        self.role = SyncRole(role)
        self._last_published = -1
        self._last_delivered = -1

    # -- writer side ---------------------------------------------------------------------------
    def publish(self, version: int, weights: Mapping[str, torch.Tensor], step: int = 0) -> PublishReceipt:
        """Make `version` available to every reader. Returns once the writer may mutate `weights`
        again (the channel holds its own copy or the readers have theirs)."""
        if self.role == SyncRole.reader:
            raise ValueError(f"{self.name}: publish called on a reader-side channel")
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"{self.name}: version must be an int >= 0, got {version!r}")
        if version <= self._last_published:
            raise ValueError(f"{self.name}: versions only increase: cannot publish version {version} "
                             f"after version {self._last_published}")
        if not weights:
            raise ValueError(f"{self.name}: publish of version {version} has no weights")
        start = time.perf_counter()
        nbytes = self._publish(version, weights, step)
        self._last_published = version
        return PublishReceipt(version, nbytes, time.perf_counter() - start)

    # -- reader side ---------------------------------------------------------------------------
    def receive(self, timeout: float | None = None) -> PolicyVersion | None:
        """The newest version not yet delivered, waiting up to `timeout` seconds (default
        `config.timeout_s`) for one to be published; None when none came in time."""
        if self.role == SyncRole.writer:
            raise ValueError(f"{self.name}: receive called on a writer-side channel")
        timeout = self.config.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            pv = self._receive(self._last_delivered, remaining)
            if pv is None:
                return None
            if pv.version > self._last_delivered:
                self._last_delivered = pv.version
                return pv
            # A channel may hand back a version it already delivered (e.g. re-attaching after the
            # writer restarted); never go back, keep waiting for a newer one.
            self.release(pv.version)
            if time.monotonic() >= deadline:
                return None

    def wait_for(self, version: int, timeout: float | None = None) -> PolicyVersion:
        """Receive until a version >= `version` is delivered; SyncTimeout otherwise."""
        timeout = self.config.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            pv = self.receive(max(0.0, deadline - time.monotonic()))
            if pv is not None and pv.version >= version:
                return pv
            if pv is not None:
                self.release(pv.version)
            if time.monotonic() >= deadline:
                raise SyncTimeout(self.name, f"version {version} (newest delivered: "
                                  f"{self._last_delivered})", timeout)

    @property
    def last_delivered(self) -> int:
        return self._last_delivered

    def release(self, version: int) -> None:
        """The reader no longer uses the tensors of `version` (callable from any thread). Channels
        that recycle staging buffers or pin shared memory override this; for the others there is
        nothing to give back."""

    def close(self) -> None:
        """Free the channel's resources (idempotent)."""

    def __enter__(self) -> WeightChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _publish(self, version: int, weights: Mapping[str, torch.Tensor], step: int) -> int:
        """Transport one version; returns the bytes moved."""

    @abstractmethod
    def _receive(self, after: int, timeout: float) -> PolicyVersion | None:
        """A complete version newer than `after` if one is (or becomes, within `timeout`) available."""


class StagingPool:
    """Reader-side staging buffers: one flat uint8 buffer per delivered version, recycled after
    `release` so steady-state receives write into memory that is already faulted in.

    The pool remembers at most `max_tracked` unreleased versions: a reader that never calls
    `release` only loses recycling (its tensors keep their memory alive), it never leaks.
    Thread-safe: the engine may release from another thread than the receiver's."""

    def __init__(self, device: str, max_free: int = 2, max_tracked: int = 8) -> None:
        self.device = torch.device(device)
        self.max_free = max_free
        self.max_tracked = max_tracked
        self._free: list[torch.Tensor] = []
        self._in_use: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def acquire(self, version: int, nbytes: int) -> torch.Tensor:
        with self._lock:
            buf = next((b for b in self._free if b.numel() == nbytes), None)
            if buf is not None:
                self._free.remove(buf)
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with self._lock:
            self._in_use[version] = buf
            while len(self._in_use) > self.max_tracked:
                del self._in_use[next(iter(self._in_use))]  # oldest: never recycled, owned by the reader
        return buf

    def release(self, version: int) -> None:
        with self._lock:
            buf = self._in_use.pop(version, None)
            if buf is not None and len(self._free) < self.max_free:
                self._free.append(buf)


def build_channel(config: SyncConfig, role: SyncRole | str, **kwargs: object) -> WeightChannel:
    """The channel `config.channel` names, for `role`; channel-specific arguments in kwargs
    (torch_dist: rank, world_size, src, init_method)."""
    cls = CHANNELS.get(config.channel)
    if not (isinstance(cls, type) and issubclass(cls, WeightChannel)):
        raise ValueError(f"sync.channel {config.channel!r} is not a WeightChannel subclass")
    return cls(config, SyncRole(role), **kwargs)

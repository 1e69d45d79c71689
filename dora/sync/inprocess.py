"""In-process channel: trainer and engines share one Python process (the `inline` runtime, tests).

`publish` takes a detached copy of every tensor (on `config.device`) and swaps it in as the newest
version under a lock, so a reader sees the old version or the new one, never a mix. With
`copy=False` the channel hands over the trainer's tensors themselves: only correct when the
trainer never mutates published tensors in place (e.g. it publishes fresh tensors each step);
an optimizer step on the live parameters would change a version the engine is decoding with.

Readers share the delivered tensors (one copy for all engines of the process) and must treat
them as read-only. Only the newest version is kept: a slow reader skips to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import torch

from dora.sync.base import CHANNELS, SyncConfig, SyncRole, WeightChannel
from dora.types import PolicyVersion


@CHANNELS.register("inprocess")
class InProcessChannel(WeightChannel):
    name = "inprocess"

    def __init__(self, config: SyncConfig, role: SyncRole = SyncRole.both, *, copy: bool = True) -> None:
        super().__init__(config, role)
        self.copy = copy
        self._device = torch.device(config.device)
        self._cond = threading.Condition()
        self._newest: PolicyVersion | None = None
        self._closed = False

    def _publish(self, version: int, weights: Mapping[str, torch.Tensor], step: int) -> int:
        if self.copy:
            owned = {name: t.detach().to(self._device, copy=True, memory_format=torch.contiguous_format)
                     for name, t in weights.items()}
        else:
            owned = {name: t.detach() for name, t in weights.items()}
        pv = PolicyVersion(version=version, weights=owned, step=step)
        with self._cond:
            if self._closed:
                raise ValueError(f"{self.name}: publish of version {version} on a closed channel")
            self._newest = pv
            self._cond.notify_all()
        return pv.num_bytes

    def _receive(self, after: int, timeout: float) -> PolicyVersion | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._newest is None or self._newest.version <= after:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._newest

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._newest = None
            self._cond.notify_all()

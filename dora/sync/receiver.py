"""Engine-side background receiver: waits for new versions on a channel in a daemon thread and
hands each one to `on_version` (normally `engine.add_version`), so the engine keeps decoding
while weights arrive.

Why a thread and not asyncio: receiving is blocking copy work, and DESIGN.md keeps torch work off
event-loop threads. torch's copy_ and zlib's crc32 release the GIL, so the decode loop keeps
running during a receive; between copies (chunks of `layout.COPY_CHUNK_BYTES`) the receive path
holds the GIL only for microseconds at a time. What a receive does take from the decode loop on a
small machine is a core and memory bandwidth (see tools/bench_sync.py).

Errors (a checksum mismatch, a timed-out collective, an exception in `on_version`) stop the
thread and are kept in `error`; `raise_if_failed()` re-raises them in the caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from dora.sync.base import SyncTimeout, WeightChannel
from dora.types import PolicyVersion


class SyncReceiver:
    def __init__(self, channel: WeightChannel, on_version: Callable[[PolicyVersion], None], *,
                 poll_s: float = 0.2, release_after_delivery: bool = False, name: str = "dora-sync-receiver") -> None:
        """`poll_s`: longest single wait inside the thread (bounds how long `stop` takes).
        `release_after_delivery`: call `channel.release(version)` as soon as `on_version` returns;
        set it when `on_version` copies the weights (e.g. into its own parameters), so the
        channel can recycle its staging buffer."""
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.channel = channel
        self.on_version = on_version
        self.poll_s = poll_s
        self.release_after_delivery = release_after_delivery
        self.delivered: list[int] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> SyncReceiver:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                pv = self.channel.receive(timeout=self.poll_s)
                if pv is None:
                    continue
                self.on_version(pv)
                self.delivered.append(pv.version)
                if self.release_after_delivery:
                    self.channel.release(pv.version)
        except BaseException as e:  # kept for the owner thread; a daemon thread has nobody to raise to
            self.error = e

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"sync receiver on {self.channel.name} failed: {self.error}") from self.error

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread (after the delivery in progress, if any) and re-raise its error."""
        self._stop.set()
        if self._thread.is_alive():
            wait_s = self.poll_s + self.channel.config.timeout_s if timeout is None else timeout
            self._thread.join(wait_s)
            if self._thread.is_alive():
                raise SyncTimeout(self.channel.name, "the receiver thread to stop", wait_s)
        self.raise_if_failed()

    def __enter__(self) -> SyncReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

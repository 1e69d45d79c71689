"""The Ray actors of the Ray runtime: thin process wrappers around the same classes the inline
runtime uses (the engines, `Trainer`, the sync channels). Nothing here knows the scheduler; the
driver-side proxies in ray_runtime.py make these actors look like an `Engine` and a `TrainerHandle`.

Where they sit in the flow:

    TrainerActor --publish(v)--> sync channel (shm / Ray object store) --receive--> EngineActor (staging)
    driver: LoadVersion(v) -> EngineActor.add_version(v): the staged copy becomes live on the engine

An `EngineActor` receives every published version in a background thread (`SyncReceiver`) while its
engine keeps decoding, and keeps it staged; `add_version(v)` from the driver only turns the staged
copy into a live version (the engine's own prepared copy), waiting for it if it has not arrived yet.

Concurrency inside an engine actor: Ray runs its methods on threads of their concurrency group, one
thread per group, so a long `poll_finished` or a load waiting for weights never blocks `submit`:
- default group: `command` (submit / abort / drop_version, applied in the driver's order by a
  sequence number, whatever order Ray delivers them in), `stats`, `close`;
- "load": `add_version`;  "sync": `wait_received`;  "poll": `poll_finished`.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from typing import Any

import ray
import torch

from dora.config import RunConfig
from dora.engines.base import Engine, EngineStats
from dora.engines.config import EngineConfig
from dora.models.config import ModelConfig
from dora.runtime import allocator
from dora.runtime.components import build_engine
from dora.runtime.local import TrainerService
from dora.sync.base import SyncConfig, SyncRole, SyncTimeout, build_channel
from dora.sync.receiver import SyncReceiver
from dora.types import PolicyVersion, Trajectory

ENGINE_CONCURRENCY_GROUPS = {"load": 1, "sync": 1, "poll": 1}
MAX_STAGED = 3
"""Versions an engine actor keeps staged. Loads target the newest version, so one staged version is
the steady state; the others cover a load request racing the next publish."""
COMMANDS = ("submit", "abort", "drop_version")
_END = object()  # end of the engine's finished() stream


class EngineActor:
    """One engine (`engine.kind`) in its own process, fed with weights by the sync channel."""

    def __init__(self, engine_config: EngineConfig, sync: SyncConfig, num_threads: int,
                 tune_malloc: bool = True) -> None:
        if tune_malloc:
            allocator.tune_malloc()
        torch.set_num_threads(num_threads)
        self.engine_config = engine_config
        self.engine_id = engine_config.engine_id
        self.sync = sync
        self.engine: Engine | None = None
        self.channel = build_channel(sync, SyncRole.reader)
        self.receiver = SyncReceiver(self.channel, self._stage, name=f"dora-sync-engine-{self.engine_id}")
        self._staged: dict[int, PolicyVersion] = {}
        self._newest_received = -1
        self._to_release: list[int] = []
        self._versions = threading.Condition()
        self._finished: queue.Queue[Any] = queue.Queue()
        self._pump: threading.Thread | None = None
        self._pump_error: BaseException | None = None
        self._next_seq = 0
        self._pending: dict[int, tuple[str, tuple[Any, ...]]] = {}
        self._commands = threading.Condition()
        """Guards the command sequence; notified whenever commands were applied."""
        self.load_s: dict[int, float] = {}
        """version -> seconds `add_version` took (waiting for the weights + preparing them)."""

    def build(self, model_config: ModelConfig, model_path: str = "") -> int:
        """Build the engine (KV cache) and start receiving weights. Returns this process's pid."""
        self.engine = build_engine(self.engine_config, model_config, model_path)
        self.receiver.start()
        return os.getpid()

    def start(self) -> EngineStats:
        """Start decoding (a worker thread) and the pump that moves finished trajectories from the
        engine's async stream into a queue `poll_finished` reads."""
        engine = self._engine()
        engine.start()
        self._pump = threading.Thread(target=self._run_pump, name=f"dora-engine-pump-{self.engine_id}", daemon=True)
        self._pump.start()
        return engine.stats()

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError(f"engine actor {self.engine_id}: build() was not called")
        return self.engine

    def _run_pump(self) -> None:
        async def pump() -> None:
            async for traj in self._engine().finished():
                self._finished.put(traj)

        try:
            asyncio.run(pump())
        except BaseException as e:  # the worker failed: poll_finished re-raises it in the driver
            self._pump_error = e
        self._finished.put(_END)

    # ---- weights --------------------------------------------------------------------------------

    def _stage(self, pv: PolicyVersion) -> None:
        """Receiver thread: keep `pv` staged until the driver asks for it. Buffers of versions the
        engine has loaded (or that were passed over) go back to the channel here, in the thread
        that also acquires them, so the channel's staging pool is only touched by one thread."""
        with self._versions:
            for version in self._to_release:
                self.channel.release(version)
            self._to_release.clear()
            self._staged[pv.version] = pv
            self._newest_received = pv.version
            while len(self._staged) > MAX_STAGED:
                self.channel.release(self._staged.pop(min(self._staged)).version)
            self._versions.notify_all()

    @ray.method(concurrency_group="sync")
    def wait_received(self, version: int, timeout_s: float) -> int:
        """Block until a version >= `version` was received; returns the newest received."""
        deadline = time.monotonic() + timeout_s
        with self._versions:
            while self._newest_received < version:
                self.receiver.raise_if_failed()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SyncTimeout(self.channel.name, f"engine {self.engine_id} to receive version {version} "
                                      f"(newest received: {self._newest_received})", timeout_s)
                self._versions.wait(min(remaining, 0.5))
            return self._newest_received

    @ray.method(concurrency_group="load")
    def add_version(self, version: int, after_commands: int = 0) -> float:
        """Make the staged `version` live on the engine, waiting up to `sync.timeout_s` for it to
        arrive, and first for the driver's first `after_commands` commands to be applied (a
        `drop_version` the driver sent before this load must free its place first, as it would in
        one process). Returns the seconds it took."""
        start = time.monotonic()
        deadline = start + self.sync.timeout_s
        with self._commands:
            if not self._commands.wait_for(lambda: self._next_seq >= after_commands, self.sync.timeout_s):
                raise TimeoutError(f"engine {self.engine_id}: loading version {version} waited "
                                   f"{self.sync.timeout_s:g} s for the driver's commands before it "
                                   f"(applied {self._next_seq} of {after_commands})")
        with self._versions:
            while version not in self._staged:
                self.receiver.raise_if_failed()
                if self._newest_received > version:
                    raise ValueError(f"engine {self.engine_id}: asked to load version {version}, but the "
                                     f"{self.channel.name} channel delivered version {self._newest_received} "
                                     f"instead (staged: {sorted(self._staged)}); a reader keeps only the newest")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SyncTimeout(self.channel.name, f"version {version} to arrive at engine {self.engine_id} "
                                      f"(newest received: {self._newest_received})", self.sync.timeout_s)
                self._versions.wait(min(remaining, 0.5))
            pv = self._staged.pop(version)
        self._engine().add_version(version, pv.weights)  # copies into the engine's own layout
        with self._versions:
            # Older staged versions will not be asked for: loads always target the newest version.
            older = [v for v in self._staged if v < version]
            for v in older:
                del self._staged[v]
            self._to_release.extend([version, *older])
        self.load_s[version] = time.monotonic() - start
        return self.load_s[version]

    # ---- rollout --------------------------------------------------------------------------------

    def command(self, seq: int, op: str, args: tuple[Any, ...]) -> None:
        """Apply submit / abort / drop_version calls strictly in the driver's order (`seq` counts
        from 0): a call that arrives early waits here until the ones before it came."""
        if op not in COMMANDS:
            raise ValueError(f"engine actor {self.engine_id}: unknown command {op!r}; known: {COMMANDS}")
        engine = self._engine()
        error: BaseException | None = None
        with self._commands:
            self._pending[seq] = (op, args)
            while self._next_seq in self._pending:
                name, call_args = self._pending.pop(self._next_seq)
                self._next_seq += 1
                try:
                    getattr(engine, name)(*call_args)
                except Exception as e:  # keep applying the ones queued behind it; report the first
                    error = error or e
            self._commands.notify_all()
        if error is not None:
            raise error

    @ray.method(concurrency_group="poll")
    def poll_finished(self, max_wait_s: float) -> tuple[list[Trajectory], EngineStats, bool]:
        """The trajectories finished since the last call (waiting up to `max_wait_s` for the first),
        the engine's stats, and whether its stream ended."""
        self.receiver.raise_if_failed()
        out: list[Trajectory] = []
        ended = False
        try:
            item = self._finished.get(timeout=max_wait_s)
            while True:
                if item is _END:
                    ended = True
                    break
                out.append(item)
                item = self._finished.get_nowait()
        except queue.Empty:
            pass
        if ended and self._pump_error is not None:
            raise RuntimeError(f"engine {self.engine_id} failed") from self._pump_error
        return out, self._engine().stats(), ended

    def stats(self) -> EngineStats:
        return self._engine().stats()

    def close(self) -> list[int]:
        """Stop decoding and receiving, give the channel back. Returns the versions received."""
        try:
            self.receiver.stop()
        finally:
            if self.engine is not None:
                self.engine.close()
            if self._pump is not None:
                self._pump.join(timeout=self.sync.timeout_s)
            self.channel.close()
        return list(self.receiver.delivered)


class TrainerActor(TrainerService):
    """The model, the `Trainer` and the writer side of the sync channel, in their own process."""

    def __init__(self, cfg: RunConfig, sync: SyncConfig) -> None:
        super().__init__(cfg)
        self.channel = build_channel(sync, SyncRole.writer)

    def publish(self, version: int) -> dict[str, float]:
        receipt = self.channel.publish(version, self.trainer.publish_weights(), step=version)
        return {"version": receipt.version, "nbytes": receipt.nbytes, "seconds": receipt.seconds}

    def close(self) -> None:
        self.channel.close()

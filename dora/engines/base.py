"""The Engine protocol: what the rollout pool needs from any inference engine (DESIGN.md, "Engines").

An engine holds one or more live policy versions, samples whole groups on the version it is told,
and streams back finished trajectories. It never changes the weights under a running sequence.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from dora.types import PromptGroup, SamplingParams, Trajectory


@dataclass(slots=True)
class EngineStats:
    tokens_per_s: float = 0.0
    """Generated tokens per second over the engine's recent window."""
    num_generated_tokens: int = 0
    running_per_version: dict[int, int] = field(default_factory=dict)
    """version -> number of running sequences."""
    waiting: int = 0
    """Sequences submitted but not yet holding a KV slot."""
    kv_occupancy: float = 0.0
    """Fraction of the KV cache in use, 0..1."""
    live_versions: list[int] = field(default_factory=list)
    busy_s: float = 0.0
    """Seconds spent in forward passes since start (idle time = wall - busy)."""
    capabilities: dict[str, bool] = field(default_factory=dict)
    """e.g. {"routing_record": True, "multi_version_forward": True}."""


@dataclass(slots=True)
class GroupHandle:
    group_id: int
    version: int
    engine_id: int


@runtime_checkable
class Engine(Protocol):
    engine_id: int
    max_live_versions: int

    def add_version(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Make `version` available for new groups. Loading happens off the decode loop and the
        version becomes visible atomically."""

    def drop_version(self, version: int) -> None:
        """Forget `version`; an error if sequences of it are still running."""

    def submit(self, group: PromptGroup, version: int, sampling: SamplingParams) -> GroupHandle:
        """Queue all `group.num_samples` samples of `group` on `version` (which must be live)."""

    def finished(self) -> AsyncIterator[Trajectory]:
        """Async stream of finished trajectories (one per sample)."""

    def abort(self, group_id: int) -> None:
        """Stop every sample of `group_id`; they come back with FinishReason.ABORT."""

    def stats(self) -> EngineStats: ...


class TrajectoryStream:
    """Thread-safe hand-off of finished trajectories to the asyncio loop that consumes them (an engine's
    `finished()`): `put` from any thread; `get` on the consuming loop. `None` ends the stream; an
    exception put in it is raised by `get`, so a failed request reaches the consumer instead of vanishing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque[Trajectory | BaseException | None] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def put(self, items: list[Trajectory | BaseException | None]) -> None:
        if not items:
            return
        with self._lock:
            self._items.extend(items)
            loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    async def get(self) -> Trajectory | None:
        with self._lock:
            if self._loop is None:
                self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
            elif self._loop is not asyncio.get_running_loop():
                raise RuntimeError("the finished() stream is bound to another event loop")
        assert self._event is not None
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    if isinstance(item, BaseException):
                        raise item
                    return item
                self._event.clear()
            await self._event.wait()


def check_request(group: PromptGroup, sampling: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """The checks every engine makes on `submit`: the prompt leaves room for a response and all token
    ids are in the vocabulary. Errors name the group and prompt."""
    prompt = group.prompt_ids
    where = f"group {group.group_id} (prompt {group.prompt_id})"
    if len(prompt) >= max_model_len:
        raise ValueError(f"{where}: prompt of {len(prompt)} tokens leaves no room for a response in "
                         f"engine.max_model_len={max_model_len}")
    bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"{where}: prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    bad_stop = [t for t in sampling.stop_token_ids if not 0 <= t < vocab_size]
    if bad_stop:
        raise ValueError(f"{where}: stop_token_ids {bad_stop} are outside the vocabulary [0, {vocab_size})")

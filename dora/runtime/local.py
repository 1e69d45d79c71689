"""The local runtime: the inline runtime's stages, with the trainer in a child process.

    this process: TrainLoop + RolloutDriver + RewardPool + engines (worker threads) + eval engine
        ProcessTrainer --train_step / weights / save / restore (a pipe)-->  child: TrainerService

Why a process: in one process the engines' decode loops and the train step share one interpreter
lock. With the tiny model on two cores, an engine thread beside the trainer made a train step
0.79 s instead of 0.52 s and decoded 10.7K tokens/s; with the engine in another process the step
took 0.54 s and the engine 12.9K tokens/s. Nothing else changes: the same `TrainLoop`, scheduler,
engines and rewards as `inline`, no Ray (no cluster start-up, no extra processes beyond the child).

Batches go to the child pickled by value (tensors as raw bytes); weights come back with each step's
reply as one flat buffer in shared memory (`dora.sync.layout`; `torch.multiprocessing` passes its
file descriptor), viewed here without a copy, and the engines copy them when they load a version,
as in `inline`. An exception in the child is raised again here with the child's traceback; a child
that dies is reported with its exit code and the call it was serving; every wait has a timeout that
names what it waited for. As with any spawned process, a script that starts a local run must do so
under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import asyncio
import copyreg
import io
import multiprocessing
import pickle
import time
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions for tensors)

from dora.config import RunConfig
from dora.data.prompt_source import PromptSource
from dora.models.config import ModelConfig
from dora.models.io import save_model
from dora.runtime import checkpoint as ckpt
from dora.runtime.allocator import tune_malloc
from dora.runtime.components import build_engines, build_model, build_rewards, build_scheduler, build_tokenizer
from dora.runtime.loop import Stages, TrainLoop, TrainSummary
from dora.sync.layout import WeightLayout, as_bytes, dtype_from_name, dtype_name
from dora.trainer.trainer import Trainer
from dora.types import Batch

START_TIMEOUT_S = 300.0
"""Child start-up: importing torch and building the model."""


class TrainerService:
    """The model and the `Trainer` of a process of their own (the local runtime's child, a Ray actor)."""

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.runtime.tune_malloc:
            tune_malloc()
        torch.set_num_threads(cfg.runtime.trainer_threads)
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer(cfg)
        self.model = build_model(cfg, self.tokenizer)
        self.trainer = Trainer(self.model, cfg.algorithm, cfg.trainer)

    def model_config(self) -> ModelConfig:
        return self.model.config

    def train_step(self, batch: Batch) -> dict[str, Any]:
        return self.trainer.train_step(batch).to_dict()

    def weights(self) -> dict[str, torch.Tensor]:
        return self.trainer.publish_weights()

    def packed_weights(self) -> tuple[WeightLayout, torch.Tensor]:
        """The weights in one flat uint8 buffer in shared memory: one segment to hand over, not one per tensor."""
        weights = self.trainer.publish_weights()
        layout = WeightLayout.of(weights)
        flat_N = torch.empty(layout.nbytes, dtype=torch.uint8).share_memory_()
        layout.pack(weights, flat_N)
        return layout, flat_N

    def train_step_and_pack(self, batch: Batch) -> tuple[dict[str, Any], WeightLayout, torch.Tensor]:
        """A train step and the weights it made, in one reply (the loop publishes after every step)."""
        return self.train_step(batch), *self.packed_weights()

    def save(self, folder: str) -> None:
        save_model(self.model, Path(folder) / "model", tokenizer=self.tokenizer)
        ckpt.save_state(Path(folder), "trainer", self.trainer.state_dict())

    def restore(self, folder: str) -> None:
        state, _ = ckpt.load_state(Path(folder), "trainer")
        self.trainer.load_state_dict(state)


def _rebuild_tensor(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(raw).view(dtype_from_name(dtype)).reshape(shape)


def _reduce_tensor(tensor: torch.Tensor) -> tuple:
    return _rebuild_tensor, (as_bytes(tensor.cpu()).numpy(), dtype_name(tensor.dtype), tuple(tensor.shape))


class _RequestPickler(pickle.Pickler):
    """Requests (batches) by value, tensors as raw bytes: torch's own pickling costs ~65 us a tensor
    (12 ms to write and 17 ms to read a 128-trajectory batch, against 2.5 ms here); sharing each one
    through shared memory would cost a segment and a file descriptor per tensor."""

    dispatch_table = copyreg.dispatch_table.copy()
    dispatch_table[torch.Tensor] = _reduce_tensor
    dispatch_table[torch.nn.Parameter] = _reduce_tensor


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _RequestPickler(buffer, protocol=4).dump(obj)  # protocol 4: arrays come back writable
    return buffer.getvalue()


def _serve(conn: Connection, cfg: RunConfig) -> None:
    """The child: build the service, then answer ("ok", result) or ("error", exception, traceback)."""
    try:
        service = TrainerService(cfg)
        conn.send(("ok", service.model_config()))
    except BaseException as e:
        conn.send(("error", e, traceback.format_exc()))
        return
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except EOFError:  # the parent is gone (killed): nothing left to serve
            return
        if method == "close":
            conn.send(("ok", None))
            return
        try:
            reply = ("ok", getattr(service, method)(*args))
        except Exception as e:
            reply = ("error", e, traceback.format_exc())
        conn.send(reply)  # torch's reductions: tensors of the reply travel through shared memory


class ProcessTrainer:
    """`TrainerHandle` whose `TrainerService` runs in a child process (spawned: no forked threads)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.step_timeout_s = cfg.rollout.wait_timeout_s
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child_conn, cfg), name="dora-trainer", daemon=True)
        self._process.start()
        child_conn.close()
        self._lock = asyncio.Lock()
        self._model_config: ModelConfig | None = None
        self._stepped: dict[str, torch.Tensor] | None = None

    @property
    def model_config(self) -> ModelConfig:
        """Waits for the child to finish building the model (the first call only)."""
        if self._model_config is None:
            # A spawned child imports the parent's main script again: one whose run is not under
            # `if __name__ == "__main__":` starts it a second time, which multiprocessing refuses.
            self._model_config = self._receive(START_TIMEOUT_S, "the trainer process to start (its own error is "
                                               "printed above; a script that starts a run must guard it with "
                                               "`if __name__ == \"__main__\":`)")
        return self._model_config

    async def train_step(self, batch: Batch) -> dict[str, Any]:
        metrics, layout, flat_N = await self._call("train_step_and_pack", (batch,), self.step_timeout_s,
                                                   f"train step {batch.step}")
        self._stepped = layout.views(flat_N)  # what publish() hands out next: saves it a round trip
        return metrics

    async def publish(self, version: int) -> Mapping[str, torch.Tensor]:
        weights, self._stepped = self._stepped, None
        return weights if weights is not None else await self._weights(f"the weights of version {version}")

    async def weights(self) -> Mapping[str, torch.Tensor]:
        return await self._weights("the trainer's weights")

    async def _weights(self, what: str) -> dict[str, torch.Tensor]:
        layout, flat_N = await self._call("packed_weights", (), self.step_timeout_s, what)
        return layout.views(flat_N)  # alias the shared segment, which lives as long as they do

    async def save(self, folder: Path) -> None:
        await self._call("save", (str(folder),), self.step_timeout_s, f"the trainer to save {folder}")

    async def restore(self, folder: Path) -> None:
        self._stepped = None
        await self._call("restore", (str(folder),), self.step_timeout_s, f"the trainer to restore {folder}")

    def close(self) -> None:
        if not self._process.is_alive():
            return
        try:
            self._conn.send_bytes(_dumps(("close", ())))
            self._receive(30.0, "the trainer process to close")
        except (RuntimeError, TimeoutError, OSError):
            pass  # already failed or dying: it is terminated below either way
        finally:
            self._process.join(timeout=30.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._conn.close()

    async def _call(self, method: str, args: tuple, timeout_s: float, what: str) -> Any:
        _ = self.model_config  # started (normally long done: the stages were built meanwhile)
        async with self._lock:  # one request at a time on the pipe
            payload = _dumps((method, args))
            return await asyncio.to_thread(self._roundtrip, payload, timeout_s, what)

    def _roundtrip(self, payload: bytes, timeout_s: float, what: str) -> Any:
        try:
            self._conn.send_bytes(payload)
        except OSError as e:
            raise self._died(what) from e
        return self._receive(timeout_s, what)

    def _receive(self, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
            if not self._process.is_alive():
                raise self._died(what)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"local runtime: timed out after {timeout_s:g} s waiting for {what}")
        try:
            status, *rest = self._conn.recv()
        except (EOFError, OSError) as e:
            raise self._died(what) from e
        if status == "error":
            error, child_traceback = rest
            raise error from RuntimeError(f"in the trainer process:\n{child_traceback}")
        return rest[0]

    def _died(self, what: str) -> RuntimeError:
        self._process.join(timeout=5.0)
        return RuntimeError(f"local runtime: the trainer process (pid {self._process.pid}) exited with code "
                            f"{self._process.exitcode} while serving {what}")


def build_local_stages(cfg: RunConfig) -> Stages:
    start = time.monotonic()
    if cfg.runtime.tune_malloc:
        tune_malloc()  # before any stage starts a thread
    trainer = ProcessTrainer(cfg)  # the child builds the model while this process builds the rest
    torch.set_num_threads(cfg.runtime.engine_threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg)
    source = PromptSource(cfg.data, tokenizer)
    try:
        model_config = trainer.model_config
        return Stages(tokenizer=tokenizer, model_config=model_config, source=source,
                      scheduler=build_scheduler(cfg, source), engines=build_engines(cfg, model_config),
                      rewards=build_rewards(cfg, tokenizer), trainer=trainer, setup_s=time.monotonic() - start)
    except BaseException:
        trainer.close()
        raise


def train_local(cfg: RunConfig, run_dir: Path) -> TrainSummary:
    return asyncio.run(TrainLoop(cfg, run_dir, build_local_stages(cfg)).run())

"""The vLLM engine: vLLM's async engine (V1 `AsyncLLM`) behind dora's Engine protocol.

Where it sits: the rollout pool drives it exactly like the torch engine (dora/engines/base.py):
`submit` a group on a live version, read trajectories from `finished()`, `abort` a group, load and
drop versions. What differs is how versions live:

- One full-weight version at a time (`max_live_versions = 1`). Several versions are live across
  engine *replicas*: the pool drains a replica (no new groups; running ones finish) and then loads
  the new version on it while the other replicas keep generating (DESIGN.md, "Engines").
- `add_version` refuses while any request runs, so a trajectory never mixes versions. (vLLM would
  happily apply weights under running requests, which continue on the new weights over KV computed
  by the old ones.) An idle live version is replaced only once the new weights have loaded.
- Weights go through vLLM's own loading path: converted to Hugging Face checkpoint names, checked
  against the model's shapes (a mismatch fails before anything is sent, so the engine keeps serving
  the previous version), written as safetensors bucket files in shared memory and loaded by the worker
  extension in dora/engines/vllm_worker.py, which reads them memory-mapped; then the prefix cache is
  reset (its KV belongs to the old weights).

Sampling follows dora's conventions: requests carry token ids (vLLM's tokenizer is not used), the
group's stop tokens are its only stop condition, sample i of a group uses seed + i, and behavior
log-probs are vLLM's `processed_logprobs`, i.e. `log_softmax(logits / temperature)` of the sampled
token -- dora's convention (dora.types.SamplingParams) as long as top-p and top-k are off, the RL
default; with truncation on, vLLM reports log-probs after truncation.

Routing record: vLLM returns the routed experts of MoE models with `enable_return_routed_experts`,
which needs its Model Runner V2 (GPU). Where the installed vLLM refuses it (the CPU build), the engine
starts without it, trajectories carry `routing=None` and `stats().capabilities["routing_record"]` is
False; the trainer then routes with its own router (no replay).

Threads: vLLM's `AsyncLLM` lives on a private asyncio loop in a background thread; every protocol
method may be called from any thread and hands work to that loop. vLLM starts its engine core in a
spawned process, so a script that builds this engine needs the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import torch

from dora.engines import ENGINES
from dora.engines.base import EngineStats, GroupHandle, TrajectoryStream, check_request
from dora.engines.config import EngineConfig, EngineKind
from dora.models.config import ModelConfig
from dora.models.io import check_hf_shapes, load_config, to_hf_state_dict
from dora.types import FinishReason, PromptGroup, SamplingParams, Trajectory

WORKER_EXTENSION = "dora.engines.vllm_worker.DoraWorkerExtension"
_CPU_KV_CACHE_BYTES = 256 << 20
_SHM = Path("/dev/shm")
_STATS_WINDOW_S = 5.0
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


@ENGINES.register("vllm")
class VllmEngine:
    """Implements `dora.engines.base.Engine` on vLLM; one live version (see the module docstring)."""

    max_live_versions = 1

    def __init__(self, model_path: str | os.PathLike, config: EngineConfig | None = None,
                 model_config: ModelConfig | None = None) -> None:
        config = config or EngineConfig(kind=EngineKind.vllm, max_live_versions=1)
        if config.max_live_versions != 1:
            raise ValueError(f"engine.max_live_versions must be 1 for the vLLM engine, got {config.max_live_versions}")
        self.config = config
        self.engine_id = config.engine_id
        self.model_path = str(Path(model_path).resolve())
        self.model_config = model_config or load_config(self.model_path)
        self._seed_rng = random.Random(config.seed)
        self._lock = threading.Lock()
        self._stream = TrajectoryStream()
        self._live: int | None = None
        self._loading = False
        self._groups: dict[int, list[str]] = {}  # group_id -> request ids still running
        self._aborted: set[int] = set()  # running groups abort() was called for
        self._running = 0
        self._busy_since: float | None = None
        self._busy_s = 0.0
        self._num_generated = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.load_seconds: list[float] = []
        """Wall time of every `add_version` (the replica's generation gap during an update)."""
        self.routing_note = ""
        self._closed = False

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"dora-vllm-engine-{self.engine_id}",
                                        daemon=True)
        self._thread.start()
        try:
            self._llm, self.routing_record = self._call(self._start())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            raise

    # ------------------------------------------------------------------ start-up

    def _engine_args(self, routed_experts: bool) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        cfg, opts = self.config, self.config.vllm
        on_cpu = torch.device(cfg.device).type == "cpu"
        kv_bytes = opts.kv_cache_memory_bytes
        if kv_bytes is None and on_cpu:
            kv_bytes = _CPU_KV_CACHE_BYTES
        args: dict[str, Any] = dict(
            model=self.model_path, skip_tokenizer_init=True, dtype=cfg.dtype, seed=cfg.seed,
            max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=max(cfg.max_num_batched_tokens, cfg.max_model_len),
            enforce_eager=opts.enforce_eager, enable_prefix_caching=opts.enable_prefix_caching,
            logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
            kv_cache_memory_bytes=kv_bytes, enable_return_routed_experts=routed_experts,
        )
        if on_cpu:
            # vLLM's CPU runner rewinds a seeded request's generator after a partial (chunked) prefill
            # step, which CPU generators cannot do ("CPU Generator does not use offset"): whole prompts only.
            args["enable_chunked_prefill"] = False
        else:
            args["gpu_memory_utilization"] = opts.gpu_memory_utilization
        args.update(opts.engine_args)
        return AsyncEngineArgs(**args)

    async def _start(self) -> tuple[Any, bool]:
        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise ImportError("engine.kind=vllm needs vLLM: `pip install '.[vllm]'` on a GPU machine, "
                              "`make vllm-venv` for the CPU build") from e
        want_routing = self.config.vllm.return_routed_experts
        if want_routing is None:
            want_routing = self.model_config.is_moe
        if want_routing:
            try:
                return AsyncLLM.from_engine_args(self._engine_args(routed_experts=True)), True
            except Exception as e:  # vLLM refuses unsupported options with a pydantic ValidationError
                if "routed" not in str(e).lower() and "Model Runner V2" not in str(e):
                    raise self._load_error(e) from e
                if self.config.vllm.return_routed_experts:
                    raise ValueError(f"engine.vllm.return_routed_experts=true, but this vLLM cannot return routed "
                                     f"experts: {str(e).splitlines()[-2:]}") from e
                self.routing_note = " ".join(str(e).split())[:300]
        try:
            return AsyncLLM.from_engine_args(self._engine_args(routed_experts=False)), False
        except Exception as e:
            raise self._load_error(e) from e

    def _load_error(self, error: BaseException) -> RuntimeError:
        return RuntimeError(f"vLLM could not serve the model folder {self.model_path} "
                            f"({type(error).__name__}: {' '.join(str(error).split())[:500]})")

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run `coro` on the engine's loop from another thread and wait for its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking engine call from the engine's own loop would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ versions

    @property
    def live_versions(self) -> list[int]:
        with self._lock:
            return self._live_list()

    def add_version(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Load `weights` (dora naming) into vLLM and make `version` the live one. Blocking: call it
        from a worker thread in asyncio code. Refused while any request runs (drain the replica first);
        replaces an idle live version only when the new weights loaded."""
        with self._lock:
            if self._running:
                raise RuntimeError(f"engine {self.engine_id}: cannot load version {version} while {self._running} "
                                   f"requests of version {self._live} run (a vLLM engine holds one version; "
                                   f"drain it first)")
            if self._loading:
                raise RuntimeError(f"engine {self.engine_id}: another version is loading")
            self._loading = True
        folder = None
        try:
            t0 = time.perf_counter()
            folder = tempfile.mkdtemp(prefix=f"dora-vllm-{self.engine_id}-v{version}-",
                                      dir=_SHM if _SHM.is_dir() else None)
            buckets, names = self._write_buckets(version, weights, Path(folder))
            self._call(self._load(buckets, names))
            self.load_seconds.append(time.perf_counter() - t0)
            with self._lock:
                self._live = version
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            with self._lock:
                self._loading = False

    def _write_buckets(self, version: int, weights: Mapping[str, torch.Tensor],
                       folder: Path) -> tuple[list[str], list[str]]:
        """Hugging Face names, shapes checked, written as safetensors files of about `update_bucket_mb`."""
        from safetensors.torch import save_file

        hf = to_hf_state_dict(dict(weights), self.model_config)
        check_hf_shapes({k: tuple(v.shape) for k, v in hf.items()}, self.model_config,
                        source=f"version {version} for vLLM engine {self.engine_id}")
        dtype = getattr(torch, self.config.dtype)
        limit = self.config.vllm.update_bucket_mb << 20
        paths: list[str] = []
        current: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal current, size
            paths.append(str(folder / f"bucket_{len(paths):04d}.safetensors"))
            save_file(current, paths[-1])
            current, size = {}, 0

        for name, tensor in hf.items():
            current[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
            size += current[name].numel() * current[name].element_size()
            if size >= limit:
                flush()
        if current:
            flush()
        return paths, list(hf)

    async def _load(self, buckets: list[str], names: list[str]) -> None:
        llm = self._llm
        await llm.collective_rpc("dora_begin_update")
        for path in buckets:
            await llm.collective_rpc("dora_load_bucket", args=(path,))
        await llm.collective_rpc("dora_finish_update", args=(names,))
        await llm.reset_prefix_cache()

    def drop_version(self, version: int) -> None:
        with self._lock:
            if self._live != version:
                raise ValueError(f"engine {self.engine_id}: version {version} is not live (live: {self._live})")
            if self._running:
                raise RuntimeError(f"engine {self.engine_id}: cannot drop version {version}: {self._running} "
                                   f"requests still run")
            self._live = None

    # ------------------------------------------------------------------ requests

    def submit(self, group: PromptGroup, version: int, sampling: SamplingParams) -> GroupHandle:
        check_request(group, sampling, self.model_config.vocab_size, self.config.max_model_len)
        where = f"group {group.group_id} (prompt {group.prompt_id})"
        with self._lock:
            if self._closed:
                raise RuntimeError(f"engine {self.engine_id} is closed")
            if self._loading or self._live != version:
                raise ValueError(f"{where}: version {version} is not live on engine {self.engine_id}; "
                                 f"live: {self._live_list()}")
            if group.group_id in self._groups:
                raise ValueError(f"{where}: group_id {group.group_id} is already running on this engine")
            base_seed = sampling.seed if sampling.seed is not None else self._seed_rng.getrandbits(62)
            request_ids = [f"{self.engine_id}-{group.group_id}-{i}" for i in range(group.num_samples)]
            self._groups[group.group_id] = list(request_ids)
            if not self._running:
                self._busy_since = time.monotonic()
            self._running += group.num_samples
        queued_at = time.monotonic()
        for i, request_id in enumerate(request_ids):
            params = self._sampling_params(sampling, base_seed + i)
            asyncio.run_coroutine_threadsafe(
                self._run_sample(group, i, version, request_id, params, queued_at), self._loop)
        return GroupHandle(group_id=group.group_id, version=version, engine_id=self.engine_id)

    def _live_list(self) -> list[int]:  # under self._lock
        return [] if self._live is None else [self._live]

    def _sampling_params(self, sampling: SamplingParams, seed: int) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
            max_tokens=sampling.max_new_tokens, stop_token_ids=list(sampling.stop_token_ids), ignore_eos=True,
            seed=seed, logprobs=0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)

    async def _run_sample(self, group: PromptGroup, sample_idx: int, version: int, request_id: str,
                          params: Any, queued_at: float) -> None:
        final, error = None, None
        try:
            collector = await self._llm.add_request(request_id, {"prompt_token_ids": list(group.prompt_ids)}, params)
            with self._lock:
                aborted = group.group_id in self._aborted
            if aborted:  # abort() ran before the request existed in vLLM
                await self._llm.abort(request_id)
            while final is None or not final.finished:
                final = collector.get_nowait() or await collector.get()
        except Exception as e:  # noqa: BLE001 -- handed to the consumer of finished(), never dropped
            error = e
        traj = None if error is not None or final is None else self._trajectory(group, sample_idx, version, final,
                                                                                  queued_at)
        now = time.monotonic()
        with self._lock:
            self._running -= 1
            remaining = self._groups.get(group.group_id)
            if remaining is not None:
                remaining.remove(request_id)
                if not remaining:
                    del self._groups[group.group_id]
                    self._aborted.discard(group.group_id)
            if not self._running and self._busy_since is not None:
                self._busy_s += now - self._busy_since
                self._busy_since = None
            if traj is not None:
                self._num_generated += traj.num_tokens
                self._recent.append((now, traj.num_tokens))
                while self._recent and self._recent[0][0] < now - _STATS_WINDOW_S:
                    self._recent.popleft()
        if traj is None:
            self._stream.put([RuntimeError(f"engine {self.engine_id}: request {request_id} (group "
                                                f"{group.group_id}, sample {sample_idx}) failed: {error!r}")])
        else:
            self._stream.put([traj])

    def _trajectory(self, group: PromptGroup, sample_idx: int, version: int, out: Any, queued_at: float) -> Trajectory:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = torch.tensor([step[token].logprob for step, token in zip(completion.logprobs or [], tokens)],
                                dtype=torch.float32)
        if len(logprobs) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(tokens)} tokens")
        routing = None
        experts = getattr(completion, "routed_experts", None)
        if self.routing_record and experts is not None and tokens:
            fed = len(group.prompt_ids) + len(tokens) - 1
            routing = torch.from_numpy(experts[:fed].copy())
            routing = routing.to(torch.uint8 if self.model_config.num_experts <= 256 else torch.int16)
        reason = FinishReason.ABORT if completion.finish_reason is None else _FINISH[completion.finish_reason]
        now = time.monotonic()
        latency = getattr(out.metrics, "first_token_latency", None) if out.metrics is not None else None
        return Trajectory(
            group_id=group.group_id, sample_idx=sample_idx, prompt_id=group.prompt_id,
            prompt_ids=list(group.prompt_ids), response_ids=tokens, behavior_logprobs=logprobs, version=version,
            min_version=version, max_version=version, finish_reason=reason, routing=routing,
            engine_id=self.engine_id, queued_at=queued_at,
            first_token_at=queued_at + latency if latency else 0.0, finished_at=now)

    def abort(self, group_id: int) -> None:
        """Samples come back with FinishReason.ABORT and their partial responses; a group this engine
        does not hold is ignored."""
        with self._lock:
            request_ids = list(self._groups.get(group_id, ()))
            if request_ids:
                self._aborted.add(group_id)
        if request_ids:
            asyncio.run_coroutine_threadsafe(self._llm.abort(request_ids), self._loop)

    async def finished(self) -> AsyncIterator[Trajectory]:
        while True:
            item = await self._stream.get()
            if item is None:
                return
            yield item

    # ------------------------------------------------------------------ life cycle, stats

    def start(self) -> None:
        """The engine runs from construction (vLLM's own loop); here for the runtime's uniform start/close."""

    def close(self) -> None:
        """Shut vLLM down (its engine process exits) and end the `finished()` stream."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._stream.put([None])

    async def _shutdown(self) -> None:
        llm, self._llm = self._llm, None  # collected now, not at interpreter exit (vLLM's __del__ shuts down again)
        llm.shutdown()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def stats(self) -> EngineStats:
        with self._lock:
            recent = list(self._recent)
            span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
            busy = self._busy_s + (time.monotonic() - self._busy_since if self._busy_since is not None else 0.0)
            return EngineStats(
                tokens_per_s=sum(n for _, n in recent[1:]) / span if span > 0 else 0.0,
                num_generated_tokens=self._num_generated,
                running_per_version={} if self._live is None or not self._running else {self._live: self._running},
                live_versions=self._live_list(), busy_s=busy,
                capabilities={"routing_record": self.routing_record, "multi_version_forward": False,
                              "behavior_logprobs": True, "kv_occupancy": False})

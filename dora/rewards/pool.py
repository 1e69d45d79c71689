"""RewardPool: scores finished trajectories between the engines and the trajectory buffer.

Engine -> `Trajectory` -> RewardPool (sets `reward`, `reward_info`) -> TrajectoryBuffer.

Cheap, trusted verifiers (registered with `inline=True`: the synthetic tasks, exact match, math)
run in the calling thread. Every other reward — users' functions named by import path — runs in a
pool of worker processes (forkserver or spawn) with a per-call timeout: a worker whose call runs
past `timeout_s` is killed and replaced, so a hung reward never starves the others. A reward that
raises, times out, returns a non-number or kills its worker gives the sample `failure_value`, a
`reward_info["failure"]` and a `RewardFailure` record with its (group_id, sample_idx) — it is never
lost and never crashes the run. `score()` is the blocking API; `score_async()` awaits the same work
without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import multiprocessing
import pickle
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from dora.data.tokenizer import Tokenizer
from dora.rewards.registry import RewardResult, get_reward, is_inline, to_result
from dora.rewards.worker import worker_main
from dora.types import PromptGroup, Trajectory

START_METHODS = ("forkserver", "spawn")


class RewardExecution(str, enum.Enum):
    # Lower-case member names: OmegaConf matches enum values by name, so `reward.execution=pool` works.
    auto = "auto"  # inline if the reward is registered inline=True, else worker processes
    inline = "inline"
    pool = "pool"


class FailureKind(str, enum.Enum):
    EXCEPTION = "exception"  # the reward raised
    TIMEOUT = "timeout"  # no result within timeout_s; the worker was killed
    INVALID = "invalid"  # returned a non-number / non-finite score, or unpicklable data
    CRASH = "crash"  # the worker process died (or could not start)


@dataclass(slots=True)
class RewardConfig:
    name: str = "synthetic"
    """A registered reward (see dora.rewards.registry) or an import path 'package.module:fn'."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the reward function (e.g. partial_credit)."""
    execution: RewardExecution = RewardExecution.auto
    max_workers: int = 2
    timeout_s: float = 10.0
    """Per call, from the moment a worker receives it; then the worker is killed and replaced."""
    startup_timeout_s: float = 60.0
    failure_value: float = 0.0
    """Reward given to a sample whose reward failed."""
    start_method: str = "forkserver"
    max_failure_records: int = 1000
    """How many recent RewardFailure records to keep (counts are kept for all)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("reward.name must name a reward or an import path")
        try:
            self.execution = RewardExecution(self.execution)
        except ValueError:
            raise ValueError(f"reward.execution must be one of {[e.value for e in RewardExecution]},"
                             f" got {self.execution!r}") from None
        if self.max_workers < 1:
            raise ValueError(f"reward.max_workers must be >= 1, got {self.max_workers}")
        for key in ("timeout_s", "startup_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"reward.{key} must be > 0, got {getattr(self, key)}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"reward.start_method must be one of {list(START_METHODS)}, got {self.start_method!r}")
        if self.max_failure_records < 0:
            raise ValueError(f"reward.max_failure_records must be >= 0, got {self.max_failure_records}")
        self.options = dict(self.options)


@dataclass(slots=True, frozen=True)
class RewardFailure:
    group_id: int
    sample_idx: int
    prompt_id: int
    kind: FailureKind
    message: str


@dataclass(slots=True)
class RewardStats:
    num_calls: int
    num_failures: dict[str, int]
    """FailureKind value -> count."""
    mean_latency_s: float
    """Mean seconds per call (worker calls: from hand-off to result; failures included)."""
    num_workers_started: int
    num_workers_killed: int


# ---- worker processes ----------------------------------------------------------------------

@dataclass(slots=True)
class _Job:
    job_id: int
    payload: tuple[str, Any, dict[str, Any]]  # (response, answer, meta)
    future: Future = field(default_factory=Future)
    sent_at: float = 0.0
    attempts: int = 0


@dataclass(slots=True)
class _Worker:
    process: Any  # multiprocessing.Process of the chosen context
    conn: Connection
    start_deadline: float
    ready: bool = False
    job: _Job | None = None
    deadline: float = 0.0


class _WorkerPool:
    """Runs jobs on up to `max_workers` killable processes; one dispatcher thread owns them all.

    Each future resolves to (status, payload, latency_s) where status is "ok" (payload a
    RewardResult) or a FailureKind value (payload a message)."""

    def __init__(self, fn: Any, config: RewardConfig) -> None:
        self._fn, self._config = fn, config
        self._ctx = multiprocessing.get_context(config.start_method)
        self._pending: deque[_Job] = deque()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closing = False
        self._wake_pending = False
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._job_ids = itertools.count()
        self.num_started = 0
        self.num_killed = 0
        self._thread = threading.Thread(target=self._run, name="dora-reward-dispatcher", daemon=True)
        self._thread.start()

    def submit(self, response: str, answer: Any, meta: dict[str, Any]) -> Future:
        job = _Job(next(self._job_ids), (response, answer, meta))
        with self._lock:
            if self._closing:
                raise RuntimeError("the reward pool is closed")
            self._pending.append(job)
            self._wake_locked()
        return job.future

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake_locked()
        self._thread.join()
        self._wake_r.close()
        self._wake_w.close()

    def _wake_locked(self) -> None:
        if not self._wake_pending:  # one byte in flight is enough; the pipe never fills
            self._wake_pending = True
            self._wake_w.send_bytes(b"!")

    # -- dispatcher thread --

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        break
                self._assign()
                ready = wait([self._wake_r, *(w.conn for w in self._workers)], self._seconds_to_next_deadline())
                for conn in ready:
                    if conn is self._wake_r:
                        with self._lock:
                            self._wake_r.recv_bytes()
                            self._wake_pending = False
                    else:
                        self._on_message(next(w for w in self._workers if w.conn is conn))
                self._enforce_deadlines()
        finally:
            self._shutdown()

    def _assign(self) -> None:
        with self._lock:
            jobs = len(self._pending)
        idle = [w for w in self._workers if w.ready and w.job is None]
        starting = sum(not w.ready for w in self._workers)
        for _ in range(min(jobs - len(idle) - starting, self._config.max_workers - len(self._workers))):
            self._start_worker()
        for worker in idle:
            with self._lock:
                if not self._pending:
                    return
                job = self._pending.popleft()
            self._send(worker, job)

    def _start_worker(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=worker_main, args=(child, self._fn, self._config.options),
                                    name="dora-reward-worker", daemon=True)
        process.start()
        child.close()
        self.num_started += 1
        self._workers.append(_Worker(process, parent, time.monotonic() + self._config.startup_timeout_s))

    def _send(self, worker: _Worker, job: _Job) -> None:
        job.attempts += 1
        job.sent_at = time.monotonic()
        try:
            worker.conn.send((job.job_id, *job.payload))
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # pickled before writing: pipe intact
            self._finish(job, FailureKind.INVALID.value, f"answer/meta cannot be sent to a worker: {e}")
            return
        except OSError:  # the worker died between jobs: the job never ran, give it to another
            self._discard(worker)
            if job.attempts < 2:
                with self._lock:
                    self._pending.appendleft(job)
            else:
                self._finish(job, FailureKind.CRASH.value, "reward workers keep dying before taking the job")
            return
        worker.job = job
        worker.deadline = job.sent_at + self._config.timeout_s

    def _on_message(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=1.0)  # it closed its end: let it exit so its code is known
            self._discard(worker)
            code = worker.process.exitcode
            if worker.job is not None:
                self._finish(worker.job, FailureKind.CRASH.value, f"reward worker exited (code {code}) during the call")
            elif not worker.ready:
                self._fail_pending(f"reward worker could not start (exit code {code}); see its stderr")
            return
        if message[0] == "ready":
            worker.ready = True
            return
        job_id, status, payload = message
        assert worker.job is not None and worker.job.job_id == job_id, "worker answered a job it was not given"
        job, worker.job = worker.job, None
        self._finish(job, status, payload)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.job is not None and now >= worker.deadline:
                self._discard(worker)
                self._finish(worker.job, FailureKind.TIMEOUT.value,
                             f"no result within {self._config.timeout_s} s; worker pid {worker.process.pid} killed")
            elif not worker.ready and now >= worker.start_deadline:
                self._discard(worker)
                self._fail_pending(f"reward worker did not start within {self._config.startup_timeout_s} s")

    def _seconds_to_next_deadline(self) -> float | None:
        deadlines = [w.deadline for w in self._workers if w.job is not None]
        deadlines += [w.start_deadline for w in self._workers if not w.ready]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _discard(self, worker: _Worker) -> None:
        self._workers.remove(worker)
        if worker.process.is_alive():
            worker.process.kill()
            self.num_killed += 1
        worker.process.join(timeout=5)
        worker.conn.close()

    def _finish(self, job: _Job, status: str, payload: Any) -> None:
        latency = time.monotonic() - job.sent_at if job.sent_at else 0.0
        job.future.set_result((status, payload, latency))

    def _fail_pending(self, message: str) -> None:
        with self._lock:
            jobs, self._pending = list(self._pending), deque()
        for job in jobs:
            self._finish(job, FailureKind.CRASH.value, message)

    def _shutdown(self) -> None:
        with self._lock:
            self._closing = True
            jobs, self._pending = list(self._pending), deque()
        jobs += [w.job for w in self._workers if w.job is not None]
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass  # already gone
        for worker in list(self._workers):
            worker.process.join(timeout=1)
            self._discard(worker)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the reward pool was closed before this reward finished"))


# ---- the pool ------------------------------------------------------------------------------

class RewardPool:
    def __init__(self, config: RewardConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.fn = get_reward(config.name)
        self.inline = config.execution is RewardExecution.inline or (
            config.execution is RewardExecution.auto and is_inline(self.fn))
        self._workers: _WorkerPool | None = None
        if not self.inline:
            try:
                pickle.dumps(self.fn)
            except Exception as e:
                raise ValueError(f"reward {config.name!r} runs in worker processes, so it must be a module-level"
                                 f" function importable by path ({e}); or set reward.execution=inline") from None
            self._workers = _WorkerPool(self.fn, config)
        self._lock = threading.Lock()
        self._num_calls = 0
        self._latency_sum = 0.0
        self._failure_counts: Counter[str] = Counter()
        self._failures: deque[RewardFailure] = deque(maxlen=config.max_failure_records)
        self._closed = False

    def score(self, trajectories: Sequence[Trajectory],
              groups: PromptGroup | Mapping[int, PromptGroup] | Iterable[PromptGroup]) -> list[Trajectory]:
        """Set `reward` and `reward_info` of every trajectory (in place); returns them in order."""
        inputs = self._inputs(trajectories, groups)
        if self._workers is None:
            for traj, args in zip(trajectories, inputs):
                self._apply(traj, *self._call_inline(*args))
        else:
            futures = [self._workers.submit(*args) for args in inputs]
            for traj, future in zip(trajectories, futures):
                self._apply(traj, *future.result())
        return list(trajectories)

    async def score_async(self, trajectories: Sequence[Trajectory],
                          groups: PromptGroup | Mapping[int, PromptGroup] | Iterable[PromptGroup]) -> list[Trajectory]:
        """`score` for an event loop: the caller's loop keeps running while rewards are computed."""
        if self._workers is None:
            return await asyncio.to_thread(self.score, trajectories, groups)
        inputs = self._inputs(trajectories, groups)
        futures = [asyncio.wrap_future(self._workers.submit(*args)) for args in inputs]
        for traj, result in zip(trajectories, await asyncio.gather(*futures)):
            self._apply(traj, *result)
        return list(trajectories)

    def stats(self) -> RewardStats:
        with self._lock:
            return RewardStats(
                num_calls=self._num_calls,
                num_failures={kind.value: self._failure_counts[kind.value] for kind in FailureKind},
                mean_latency_s=self._latency_sum / self._num_calls if self._num_calls else 0.0,
                num_workers_started=self._workers.num_started if self._workers else 0,
                num_workers_killed=self._workers.num_killed if self._workers else 0,
            )

    @property
    def failures(self) -> list[RewardFailure]:
        """The most recent failures (up to reward.max_failure_records), oldest first."""
        with self._lock:
            return list(self._failures)

    def close(self) -> None:
        """Stop the workers (idempotent). Rewards still running fail with RuntimeError."""
        if self._closed:
            return
        self._closed = True
        if self._workers is not None:
            self._workers.close()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --

    def _inputs(self, trajectories: Sequence[Trajectory],
                groups: PromptGroup | Mapping[int, PromptGroup] | Iterable[PromptGroup]) -> list[tuple[str, Any, dict]]:
        if self._closed:
            raise RuntimeError("the reward pool is closed")
        if isinstance(groups, PromptGroup):
            by_id = {groups.group_id: groups}
        elif isinstance(groups, Mapping):
            by_id = groups
        else:
            by_id = {g.group_id: g for g in groups}
        inputs = []
        for traj in trajectories:
            group = by_id.get(traj.group_id)
            if group is None:
                raise ValueError(f"trajectory (group {traj.group_id}, sample {traj.sample_idx}) has no PromptGroup"
                                 " among the groups passed to score()")
            response = self.tokenizer.decode(traj.response_ids, skip_special_tokens=True)
            inputs.append((response, group.answer, group.meta))
        return inputs

    def _call_inline(self, response: str, answer: Any, meta: dict[str, Any]) -> tuple[str, Any, float]:
        start = time.perf_counter()
        try:
            value = self.fn(response, answer, meta, **self.config.options)
        except Exception as e:
            return FailureKind.EXCEPTION.value, f"{type(e).__name__}: {e}", time.perf_counter() - start
        try:
            return "ok", to_result(value), time.perf_counter() - start
        except (TypeError, ValueError) as e:
            return FailureKind.INVALID.value, str(e), time.perf_counter() - start

    def _apply(self, traj: Trajectory, status: str, payload: Any, latency_s: float) -> None:
        if status == "ok":
            result: RewardResult = payload
            traj.reward = result.score
            traj.reward_info = dict(result.info)
        else:
            traj.reward = self.config.failure_value
            traj.reward_info = {"failure": status, "error": payload}
        with self._lock:
            self._num_calls += 1
            self._latency_sum += latency_s
            if status != "ok":
                self._failure_counts[status] += 1
                self._failures.append(RewardFailure(traj.group_id, traj.sample_idx, traj.prompt_id,
                                                    FailureKind(status), payload))

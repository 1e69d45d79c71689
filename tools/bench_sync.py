"""Weight-sync benchmark: bandwidth of each channel next to this machine's memcpy bandwidth, and the
decode stall of an engine that keeps decoding while a version arrives.

    python tools/bench_sync.py --json sync.json          # >= 512 MiB payload, median of 5
    python tools/bench_sync.py --quick                   # ~90 MiB smoke run

Payload: the state dict of a ~137M-parameter Qwen3-MoE-style model (fp32, 8 layers, 8 experts,
vocab 32k: ~520 MiB in 75 tensors of realistic shapes), built by `dora.models`.

Per channel, a writer process (the trainer; the in-process channel publishes from this process)
publishes version after version; this process (the engine side) runs a `SyncReceiver` whose
callback loads each version into the engine (`add_version`, then `drop_version`: decoding stays on
version 0 throughout). One repetition is two syncs:
1. with the engine idle: `bytes_per_s` = payload bytes / (publish start -> `receive` returned a
   complete, staged version), next to a memcpy of the same bytes taken just before (the machine is
   shared, so its bandwidth drifts; `memcpy_bytes_per_s` is the median of these samples). For shm
   that is two copies (trainer -> segment, segment -> staging); `shm_view` hands the engine views
   of the segment: one copy. Clocks are CLOCK_MONOTONIC, common to all processes.
2. with the engine decoding: `decode_step_ms` is the median interval between decode-step
   completions in the second before the sync; `max_decode_gap_ms` the longest interval from
   publish start until the version is staged (plus the step straddling that moment), and as a
   control (table only) the longest interval in an equally long window just before, without a
   sync: on a shared machine the scheduler alone stretches steps. The table
   also shows this sync's bandwidth, and the engine's own `add_version` (it copies the weights
   into its layout) with the decode gap during it: engine cost, not part of the sync figures.
Reported: medians of `--reps` repetitions after one warm-up repetition.

Threads: the machine this was written on has 2 cores. torch runs 1 intra-op thread in every
process: 1 for the decode loop, 1 for the receiver copy, 1 for the trainer (which is idle here
except while it publishes). More threads would oversubscribe the cores and measure the scheduler,
not the channel. torch's copy_ releases the GIL and copies are chunked, so decode steps interleave
with a receive. The memcpy reference is torch `copy_` of the same bytes into a warm buffer with
the same 1 thread (the 2-thread figure is printed too).

Decode workload: the real `TorchEngine` (4 sequences of the payload model, 1 thread) when
`dora.engines.torch_engine` imports; otherwise a fixed decode-like matmul loop. The output says which.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dora.sync import SyncConfig, SyncReceiver, build_channel  # noqa: E402
from dora.sync.layout import WeightLayout  # noqa: E402
from dora.types import PolicyVersion  # noqa: E402

CHANNEL_NAMES = ("inprocess", "shm", "shm_view", "torch_dist", "ray")
MiB = 1 << 20


# ----------------------------------------------------------------------------------- payload
def model_config(quick: bool):
    from dora.models.config import ModelConfig

    if quick:
        return ModelConfig(vocab_size=8000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=64, intermediate_size=1024, moe_intermediate_size=256,
                           num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)
    return ModelConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                       num_key_value_heads=4, head_dim=64, intermediate_size=2048, moe_intermediate_size=512,
                       num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)


def payload(quick: bool) -> dict[str, torch.Tensor]:
    from dora.models.model import DecoderLM

    model = DecoderLM.from_config(model_config(quick), seed=0)
    return {name: t.detach() for name, t in model.state_dict().items()}


# ----------------------------------------------------------------------------------- writer
def _channel_config(name: str, run: str) -> SyncConfig:
    return SyncConfig(channel="shm" if name == "shm_view" else name, name=run, timeout_s=120, bucket_mb=64,
                      read_mode="view" if name == "shm_view" else "copy")


def writer_main(name: str, run: str, quick: bool, extra: dict, commands, results) -> None:
    """The trainer process: publish each version number it is sent; report (version, t0, t1)."""
    torch.set_num_threads(1)
    if name == "ray":
        import ray

        ray.init(address=extra["address"], namespace=extra["namespace"], log_to_driver=False,
                 configure_logging=False)
    config = _channel_config(name, run)
    weights = payload(quick)
    kwargs = {"rank": 0, "world_size": 2, "src": 0, "init_method": extra["init"]} if name == "torch_dist" else {}
    channel = build_channel(config, "writer", **kwargs)
    marker = next(iter(weights))
    results.put(("ready", 0, 0.0, 0.0))
    while (version := commands.get()) is not None:
        weights[marker].view(-1)[0] = float(version)  # the reader checks it got this version's bytes
        t0 = time.monotonic()
        channel.publish(version, weights)
        results.put(("published", version, t0, time.monotonic()))
    channel.close()


# ----------------------------------------------------------------------------------- decode
class EngineWorkload:
    """The real torch engine decoding 4 sequences of the payload model on version 0."""

    def __init__(self, quick: bool, weights: Mapping[str, torch.Tensor]) -> None:
        from dora.engines.config import EngineConfig
        from dora.engines.torch_engine import TorchEngine

        self.engine = TorchEngine(model_config(quick), EngineConfig(
            max_num_seqs=4, max_model_len=512, max_num_batched_tokens=32, max_live_versions=2))
        self.engine.add_version(0, weights)
        self.label = "TorchEngine, 4 sequences of the payload model"
        self._next_group = 0

    def step(self) -> None:
        from dora.types import PromptGroup, SamplingParams

        if not self.engine.has_work():
            gid = self._next_group
            self._next_group += 1
            self.engine.submit(PromptGroup(group_id=gid, prompt_id=gid, prompt_ids=[1, 2, 3, 4, 5, 6, 7, 8],
                                           num_samples=4),
                               0, SamplingParams(max_new_tokens=480, temperature=1.0, seed=gid))
        self.engine.step()

    def load(self, pv: PolicyVersion) -> None:
        self.engine.add_version(pv.version, pv.weights)
        self.engine.drop_version(pv.version)


class MatmulWorkload:
    """Fallback: a fixed decode-like step (4 rows through 8 square 1024 fp32 layers)."""

    def __init__(self, quick: bool, weights: Mapping[str, torch.Tensor]) -> None:
        g = torch.Generator().manual_seed(0)
        self.layers = [torch.randn(1024, 1024, generator=g) / 32 for _ in range(8)]
        self.x = torch.randn(4, 1024, generator=g)
        self.label = "fixed matmul decode step (dora.engines.torch_engine unavailable)"

    def step(self) -> None:
        x = self.x
        for w in self.layers:
            x = torch.tanh(x @ w)

    def load(self, pv: PolicyVersion) -> None:
        """Nothing to load: the weights stay staged in the channel's buffer."""


@dataclass(slots=True)
class DecodeLoop:
    workload: EngineWorkload | MatmulWorkload
    ends: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    running: threading.Event = field(default_factory=threading.Event)
    """Cleared while bandwidth is measured alone (the loop idles between steps)."""
    error: list[BaseException] = field(default_factory=list)

    def run(self) -> None:
        try:
            with torch.inference_mode():
                while not self.stop.is_set():
                    if not self.running.wait(0.05):
                        continue
                    self.workload.step()
                    self.ends.append(time.monotonic())
        except BaseException as e:  # reported by the main thread
            self.error.append(e)

    def intervals(self, start: float, end: float) -> list[float]:
        """Intervals between consecutive step ends, for the steps ending in (start, end] plus the
        first one after `end` (the step a sync could have delayed)."""
        ends = list(self.ends)
        out = []
        for prev, cur in zip(ends, ends[1:]):
            if cur > start:
                out.append(cur - prev)
            if cur > end:
                break
        return out


# ----------------------------------------------------------------------------------- measuring
def median_rate(nbytes: int, fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up (page faults, allocator)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def memcpy_rates(nbytes: int, reps: int) -> tuple[float, float]:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
    dst = torch.empty_like(src)
    rates = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rates.append(median_rate(nbytes, lambda: dst.copy_(src), reps))
    torch.set_num_threads(1)
    return rates[0], rates[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(slots=True)
class Sync:
    """Timestamps (CLOCK_MONOTONIC) of one published version."""

    t0: float  # publish started (trainer)
    published: float  # publish returned (trainer)
    received: float  # receive returned a complete, staged version (engine side)
    loaded: float  # engine.add_version returned

    @property
    def seconds(self) -> float:
        return self.received - self.t0


def bench_channel(name: str, args, loop: DecodeLoop, workload, nbytes: int, marker: str,
                  memcpy_samples: list[float]) -> tuple[dict, dict]:
    run = f"bench-{uuid.uuid4().hex[:8]}"
    config = _channel_config(name, run)
    delivered: dict[int, tuple[float, float]] = {}
    arrived = threading.Condition()
    extra: dict = {}
    if name == "torch_dist":
        extra["init"] = f"tcp://127.0.0.1:{_free_port()}"
    if name == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, namespace=run, log_to_driver=False, configure_logging=False)
        extra.update(address=ray.get_runtime_context().gcs_address, namespace=run)

    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    proc = None
    if name == "inprocess":
        channel = build_channel(config, "both")
    else:
        proc = ctx.Process(target=writer_main, args=(name, run, args.quick, extra, commands, results), daemon=True)
        proc.start()
        kwargs = {"rank": 1, "world_size": 2, "src": 0, "init_method": extra["init"]} if name == "torch_dist" else {}
        channel = build_channel(config, "reader", **kwargs)
        assert results.get(timeout=300)[0] == "ready"

    def on_version(pv: PolicyVersion) -> None:
        t_received = time.monotonic()
        got = float(pv.weights[marker].reshape(-1)[0])
        if got != float(pv.version):
            raise AssertionError(f"{name}: version {pv.version} carries the marker of version {got}")
        workload.load(pv)
        with arrived:
            delivered[pv.version] = (t_received, time.monotonic())
            arrived.notify_all()

    def sync(version: int) -> Sync:
        if proc is None:
            t0 = time.monotonic()
            channel.publish(version, weights_inprocess(marker, version))
            published = time.monotonic()
        else:
            commands.put(version)
            kind, _, t0, published = results.get(timeout=600)
            assert kind == "published"
        with arrived:
            if not arrived.wait_for(lambda: version in delivered, timeout=600):
                raise TimeoutError(f"{name}: version {version} not delivered within 600 s")
        receiver.raise_if_failed()
        return Sync(t0, published, *delivered[version])

    receiver = SyncReceiver(channel, on_version, poll_s=0.1, release_after_delivery=True).start()
    alone, decoding, steps, gaps, control_gaps, load_gaps = [], [], [], [], [], []
    scratch_src = torch.ones(nbytes, dtype=torch.uint8)
    scratch_dst = torch.zeros(nbytes, dtype=torch.uint8)
    try:
        for rep in range(args.reps + 1):  # repetition 0 warms up pages, buffers and connections
            # Bandwidth alone: the decode loop idles, memcpy measured right before (same conditions).
            loop.running.clear()
            time.sleep(0.2)
            memcpy = median_rate(nbytes, lambda: scratch_dst.copy_(scratch_src), 1)
            quiet_sync = sync(2 * rep + 1)
            # The same with the engine decoding: its normal step time, then its steps during a sync.
            loop.running.set()
            time.sleep(1.2)
            s = sync(2 * rep + 2)
            time.sleep(0.3)  # let the step that straddles the end of the load complete
            if rep:
                memcpy_samples.append(memcpy)
                alone.append(quiet_sync)
                decoding.append(s)
                steps.append(statistics.median(loop.intervals(s.t0 - 1.0, s.t0)[:-1] or [float("nan")]))
                gaps.append(max(loop.intervals(s.t0, s.received)))
                # Control: the longest interval in an equally long window just before, without a sync
                # (on a shared machine the scheduler alone makes gaps).
                window = min(s.seconds, 1.0)
                control_gaps.append(max(loop.intervals(s.t0 - window, s.t0)[:-1] or [float("nan")]))
                load_gaps.append(max(loop.intervals(s.received, s.loaded)))
    finally:
        loop.running.set()
        receiver.stop()
        if proc is not None:
            commands.put(None)
            proc.join(120)
        channel.close()
        if name == "ray":
            import ray

            ray.shutdown()
    result = {"bytes_per_s": nbytes / statistics.median(a.seconds for a in alone),
              "decode_step_ms": 1e3 * statistics.median(steps),
              "max_decode_gap_ms": 1e3 * statistics.median(gaps)}
    extra = {"publish_ms": 1e3 * statistics.median(a.published - a.t0 for a in alone),
             "decoding_bytes_per_s": nbytes / statistics.median(d.seconds for d in decoding),
             "load_ms": 1e3 * statistics.median(d.loaded - d.received for d in decoding),
             "load_gap_ms": 1e3 * statistics.median(load_gaps),
             "control_gap_ms": 1e3 * statistics.median(control_gaps)}
    return result, extra


_INPROCESS_WEIGHTS: dict[str, torch.Tensor] = {}


def weights_inprocess(marker: str, version: int) -> dict[str, torch.Tensor]:
    _INPROCESS_WEIGHTS[marker].view(-1)[0] = float(version)
    return _INPROCESS_WEIGHTS


# ----------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="~90 MiB payload (smoke run)")
    parser.add_argument("--reps", type=int, default=5, help="measured repetitions per channel (median)")
    parser.add_argument("--channels", default=",".join(CHANNEL_NAMES), help="comma-separated subset")
    parser.add_argument("--decode", choices=["auto", "engine", "matmul"], default="auto")
    args = parser.parse_args()
    names = [n for n in args.channels.split(",") if n]
    unknown = sorted(set(names) - set(CHANNEL_NAMES))
    if unknown:
        parser.error(f"--channels: unknown {unknown}; known: {', '.join(CHANNEL_NAMES)}")
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    torch.set_num_threads(1)

    weights = payload(args.quick)
    _INPROCESS_WEIGHTS.update(weights)
    marker = next(iter(weights))
    nbytes = WeightLayout.of(weights).nbytes
    memcpy_1, memcpy_2 = memcpy_rates(nbytes, args.reps)
    memcpy_samples = [memcpy_1]  # plus one before every measured repetition (the load drifts)

    workload = None
    if args.decode in ("auto", "engine"):
        try:
            workload = EngineWorkload(args.quick, weights)
        except ImportError:
            if args.decode == "engine":
                raise
    workload = workload or MatmulWorkload(args.quick, weights)
    loop = DecodeLoop(workload)
    thread = threading.Thread(target=loop.run, name="decode", daemon=True)
    thread.start()

    results, loads = {}, {}
    try:
        for name in names:
            print(f"[bench_sync] {name} ...", flush=True)
            results[name], loads[name] = bench_channel(name, args, loop, workload, nbytes, marker, memcpy_samples)
            if loop.error:
                raise loop.error[0]
    finally:
        loop.stop.set()
        thread.join()
    memcpy = statistics.median(memcpy_samples)
    report(results, loads, memcpy, memcpy_2, nbytes, workload.label, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memcpy_bytes_per_s": memcpy, "channels": results}, f, indent=2)
        print(f"[bench_sync] wrote {args.json}")


def report(results: dict, extra: dict, memcpy: float, memcpy_2: float, nbytes: int, label: str, args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"weight sync: {nbytes / MiB:.0f} MiB payload, median of {args.reps}; memcpy "
                        f"{memcpy / 1e9:.2f} GB/s (1 thread; {memcpy_2 / 1e9:.2f} GB/s with 2 at start)")
    for col in ("channel", "GB/s", "x memcpy", "target", "publish ms", "GB/s decoding", "decode step ms",
                "max gap ms", "gap / step", "gap no sync ms", "add_version ms", "gap in add_version ms"):
        table.add_column(col, justify="left" if col == "channel" else "right")
    targets = {"shm": 0.4, "shm_view": 0.8}
    for name, r in results.items():
        e = extra[name]
        ratio = r["bytes_per_s"] / memcpy
        target = targets.get(name)
        target_txt = "" if target is None else f"{'ok' if ratio >= target else 'MISS'} >= {target}"
        gap_steps = r["max_decode_gap_ms"] / r["decode_step_ms"]
        table.add_row(name, f"{r['bytes_per_s'] / 1e9:.2f}", f"{ratio:.2f}", target_txt, f"{e['publish_ms']:.0f}",
                      f"{e['decoding_bytes_per_s'] / 1e9:.2f}", f"{r['decode_step_ms']:.1f}",
                      f"{r['max_decode_gap_ms']:.1f}", f"{gap_steps:.2f} ({'ok' if gap_steps <= 2 else 'MISS'} <= 2)",
                      f"{e['control_gap_ms']:.1f}",
                      f"{e['load_ms']:.0f}", f"{e['load_gap_ms']:.1f}")
    console = Console(width=180)
    console.print(table)
    console.print(f"decode workload: {label}; torch threads: 1 per process (decode, receiver, trainer). "
                  "GB/s: publish start -> version staged, engine idle; GB/s decoding: the same while it decodes.")


if __name__ == "__main__":
    main()

"""Throughput of dora's torch engine against Hugging Face `generate` on the same MoE model.

    python tools/bench_engine.py --threads 2 --json bench_engine.json
    python tools/bench_engine.py --quick            # < 2 minutes
    python tools/bench_engine.py --threads 1 --clock thread   # CPU time: steadier on a busy machine

One model (`ModelConfig.bench7m()`, ~7M parameters, random weights) is saved with
`dora.models.io.save_model` and loaded by transformers' `AutoModelForCausalLM`, so both run the same
weights, dtype and thread count. Greedy tokens of both are asserted identical before timing; warm-up
runs are excluded. Two workloads, at batch 1, 16 and 64:
- fixed: every sequence generates `--fixed-tokens` (64) new tokens;
- variable: `--requests` (256) requests whose new-token counts are drawn (seeded) from a long-tailed
  log-normal; EOS is ignored. HF runs them in static batches of `batch` that generate to the longest
  request of the batch; dora keeps its `batch` slots full (continuous batching). Only requested
  tokens count.
Fixed-length cells are the best of `--repeats` runs. Reports generated tokens per second; `--json` writes
{"tokens_per_s": {"dora": {"fixed": {"1": ..}, "variable": {..}}, "hf": {..}}, "ratio": {..}}.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dora.engines.experts import MOE_IMPLS
from dora.engines.config import EngineConfig
from dora.engines.torch_engine import TorchEngine
from dora.models.config import ModelConfig
from dora.models.io import save_model
from dora.models.model import DecoderLM
from dora.types import PromptGroup, SamplingParams

BATCHES = (1, 16, 64)


@dataclass(slots=True)
class Workload:
    name: str
    prompts: list[list[int]]
    new_tokens: list[int]


def make_prompts(cfg: ModelConfig, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (count, length), generator=gen).tolist()


def long_tailed_lengths(count: int, median: int, cap: int, seed: int) -> list[int]:
    """Log-normal new-token counts (sigma 0.9: the longest requests are ~10x the median)."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randn(count, generator=gen) * 0.9 + math.log(median)
    return draws.exp().round().clamp(4, cap).long().tolist()


# ---------------------------------------------------------------------- the two generators

def hf_generate(hf_model, prompts: list[list[int]], new_tokens: list[int], batch: int) -> tuple[list[list[int]], int]:
    """Static batches in request order, each generating to its longest request -> (tokens, counted)."""
    outputs, counted = [], 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        want = new_tokens[start:start + batch]
        ids = torch.tensor(chunk, device=hf_model.device)
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max(want), min_new_tokens=max(want), pad_token_id=0)
        for row, n in zip(out[:, ids.shape[1]:].tolist(), want):
            outputs.append(row[:n])
            counted += n
    return outputs, counted


def dora_generate(engine: TorchEngine, prompts: list[list[int]], new_tokens: list[int],
                  first_id: int) -> tuple[list[list[int]], int]:
    """All requests submitted at once; the engine keeps its slots full -> (tokens, counted)."""
    for i, (p, n) in enumerate(zip(prompts, new_tokens)):
        engine.submit(PromptGroup(group_id=first_id + i, prompt_id=i, prompt_ids=p), 0,
                      SamplingParams(max_new_tokens=n, temperature=0.0))
    done = {}
    while engine.has_work():
        for t in engine.step():
            done[t.group_id - first_id] = t.response_ids
    outputs = [done[i] for i in range(len(prompts))]
    return outputs, sum(len(o) for o in outputs)


def make_engine(cfg: ModelConfig, model: DecoderLM, batch: int, max_len: int, device: str,
                moe_impl: str = "auto") -> TorchEngine:
    engine = TorchEngine(cfg, EngineConfig(device=device, max_num_seqs=batch, max_model_len=max_len,
                                                max_num_batched_tokens=max(512, batch), moe_impl=moe_impl))
    engine.add_version(0, model.state_dict())
    return engine


# ---------------------------------------------------------------------- benchmark

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
"""`thread` counts the CPU time of the calling thread only: steadier than wall time on a shared
machine, and exact with --threads 1 (torch then computes on the calling thread)."""


def timed(fn, clock=time.perf_counter) -> tuple[float, object]:
    t0 = clock()
    result = fn()
    return clock() - t0, result


def run_benchmark(cfg: ModelConfig, *, batches=BATCHES, prompt_len: int = 32, fixed_tokens: int = 64,
                  requests: int = 256, median_tokens: int = 24, max_tokens: int = 256, quick: bool = False,
                  device: str = "cpu", seed: int = 0, clock: str = "wall", repeats: int = 3,
                  moe_impl: str = "auto", log=print) -> dict:
    from transformers import AutoModelForCausalLM

    model = DecoderLM.from_config(cfg, seed=seed).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=cfg.torch_dtype).eval()
    model = model.to(device)
    hf_model = hf_model.to(device)
    max_len = prompt_len + max(fixed_tokens, max_tokens) + 1
    first_id = 0

    # Parity first: identical greedy tokens on a batch of the fixed workload.
    check_prompts = make_prompts(cfg, max(2, min(batches[-1], 16)), prompt_len, seed + 1)
    check_tokens = [min(fixed_tokens, 32)] * len(check_prompts)
    engine = make_engine(cfg, model, len(check_prompts), max_len, device, moe_impl)
    ours, _ = dora_generate(engine, check_prompts, check_tokens, first_id)
    theirs, _ = hf_generate(hf_model, check_prompts, check_tokens, len(check_prompts))
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if mismatched:
        raise AssertionError(f"greedy tokens differ between dora and HF for prompts {mismatched}")
    log(f"parity: identical greedy tokens on {len(check_prompts)} prompts x {check_tokens[0]} tokens")

    results: dict[str, dict[str, dict[str, float]]] = {"dora": {"fixed": {}, "variable": {}},
                                                      "hf": {"fixed": {}, "variable": {}}}
    for batch in batches:
        workloads = [Workload("fixed", make_prompts(cfg, batch, prompt_len, seed + 2), [fixed_tokens] * batch)]
        num_requests = requests if batch > 1 or not quick else max(8, requests // 16)
        if batch == 1 and not quick:
            num_requests = max(16, requests // 4)  # batch 1 gains nothing from more requests, only time
        workloads.append(Workload("variable", make_prompts(cfg, num_requests, prompt_len, seed + 3),
                                  long_tailed_lengths(num_requests, median_tokens, max_tokens, seed + 4)))
        engine = make_engine(cfg, model, batch, max_len, device, moe_impl)
        warm_prompts = make_prompts(cfg, batch, prompt_len, seed + 5)
        first_id += 10_000
        dora_generate(engine, warm_prompts, [8] * batch, first_id)
        hf_generate(hf_model, warm_prompts, [8] * batch, batch)
        for w in workloads:
            # Fixed-length runs are short: best of `repeats` (alternating) smooths out a busy machine.
            dora_s = hf_s = math.inf
            for _ in range(repeats if w.name == "fixed" else 1):
                first_id += 10_000
                seconds, (_, dora_n) = timed(lambda: dora_generate(engine, w.prompts, w.new_tokens, first_id),
                                             CLOCKS[clock])
                dora_s = min(dora_s, seconds)
                seconds, (_, hf_n) = timed(lambda: hf_generate(hf_model, w.prompts, w.new_tokens, batch), CLOCKS[clock])
                hf_s = min(hf_s, seconds)
            assert dora_n == hf_n == sum(w.new_tokens), (dora_n, hf_n, sum(w.new_tokens))
            results["dora"][w.name][str(batch)] = dora_n / dora_s
            results["hf"][w.name][str(batch)] = hf_n / hf_s
            log(f"batch {batch:>3} {w.name:>8}: {len(w.prompts)} requests, {dora_n} tokens; "
                f"dora {dora_n / dora_s:8.0f} tok/s ({dora_s:.2f} s), HF {hf_n / hf_s:8.0f} tok/s ({hf_s:.2f} s)")
    top = str(batches[-1])
    ratio = {name: {top: results["dora"][name][top] / results["hf"][name][top]} for name in ("fixed", "variable")}
    return {"tokens_per_s": results, "ratio": ratio}


def print_table(report: dict, batches, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("workload", "batch", "dora tok/s", "HF tok/s", "dora / HF"):
        table.add_column(col, justify="right")
    tps = report["tokens_per_s"]
    for name in ("fixed", "variable"):
        for b in map(str, batches):
            d, h = tps["dora"][name][b], tps["hf"][name][b]
            table.add_row(name, b, f"{d:,.0f}", f"{h:,.0f}", f"{d / h:.2f}x")
    Console().print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both engines")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="fewer variable-length requests (< 2 minutes)")
    parser.add_argument("--fixed-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="fixed-length runs: best of this many")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall time, or CPU time of the calling thread (shared machines; needs --threads 1)")
    parser.add_argument("--moe-impl", default="auto", choices=MOE_IMPLS, help="dora's MoE experts (engine.moe_impl)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread needs --threads 1 (other threads' CPU time is not counted)")
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.bench7m(dtype=args.dtype)
    requests = min(args.requests, 96) if args.quick else args.requests
    report = run_benchmark(cfg, fixed_tokens=args.fixed_tokens, requests=requests, quick=args.quick,
                           device=args.device, seed=args.seed, clock=args.clock,
                           repeats=1 if args.quick else args.repeats, moe_impl=args.moe_impl)
    print_table(report, BATCHES, f"bench7m, {args.dtype}, {args.threads} threads, {args.device}, {args.clock} clock")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

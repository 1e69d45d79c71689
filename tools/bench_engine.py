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
{"tokens_per_s": {"dora": {"fixed": {"1": ..}, "variable": {..}}, "hf": {..}, "vllm": {..}}, "ratio": {..},
"ratio_vs_vllm": {..}}.

Where vLLM is importable (`make vllm-venv`, then run this with .venv-vllm/bin/python), vLLM runs the same
folder and workloads after dora and HF (its engine process bound to `--threads` cores, whole batches
submitted at once, `max_num_seqs` = batch, so it batches continuously like dora), after the same
greedy-parity check. `--no-vllm` skips it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dora.engines.config import EngineConfig
from dora.engines.experts import MOE_IMPLS
from dora.engines.torch_engine import TorchEngine
from dora.engines.vllm_engine import vllm_available
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


def make_vllm(folder: str, batch: int, max_len: int, dtype: str, threads: int):
    """vLLM's offline engine on `folder`, its engine process bound to the first `threads` cores."""
    from vllm import LLM

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
    return LLM(model=folder, skip_tokenizer_init=True, dtype=dtype, max_model_len=max_len, max_num_seqs=batch,
               max_num_batched_tokens=max(512, batch, max_len), kv_cache_memory_bytes=1 << 28, enforce_eager=True,
               seed=0)


def vllm_generate(llm, prompts: list[list[int]], new_tokens: list[int]) -> tuple[list[list[int]], int]:
    """All requests at once, exactly `n` new tokens each (EOS ignored) -> (tokens, counted)."""
    from vllm import SamplingParams as VllmSamplingParams

    params = [VllmSamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
              for n in new_tokens]
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    outputs = [list(o.outputs[0].token_ids) for o in out]
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
                  moe_impl: str = "auto", with_vllm: bool = False, threads: int = 1, log=print) -> dict:
    folder = tempfile.mkdtemp(prefix="dora-bench-engine-")
    try:
        return _run_benchmark(cfg, folder, batches=batches, prompt_len=prompt_len, fixed_tokens=fixed_tokens,
                              requests=requests, median_tokens=median_tokens, max_tokens=max_tokens, quick=quick,
                              device=device, seed=seed, clock=clock, repeats=repeats, moe_impl=moe_impl,
                              with_vllm=with_vllm, threads=threads, log=log)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_benchmark(cfg: ModelConfig, folder: str, *, batches, prompt_len, fixed_tokens, requests, median_tokens,
                   max_tokens, quick, device, seed, clock, repeats, moe_impl, with_vllm, threads, log) -> dict:
    from transformers import AutoModelForCausalLM

    model = DecoderLM.from_config(cfg, seed=seed).eval()
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

    def workloads_of(batch: int) -> list[Workload]:
        workloads = [Workload("fixed", make_prompts(cfg, batch, prompt_len, seed + 2), [fixed_tokens] * batch)]
        num_requests = requests if batch > 1 or not quick else max(8, requests // 16)
        if batch == 1 and not quick:
            num_requests = max(16, requests // 4)  # batch 1 gains nothing from more requests, only time
        workloads.append(Workload("variable", make_prompts(cfg, num_requests, prompt_len, seed + 3),
                                  long_tailed_lengths(num_requests, median_tokens, max_tokens, seed + 4)))
        return workloads

    for batch in batches:
        workloads = workloads_of(batch)
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
    report = {"tokens_per_s": results, "ratio": ratio}
    if with_vllm:  # last: vLLM binds its engine process's threads to cores, and nothing else runs then
        results["vllm"] = {"fixed": {}, "variable": {}}
        for batch in batches:
            llm = make_vllm(folder, batch, max_len, cfg.dtype, threads)
            try:
                if batch == batches[-1]:
                    theirs, _ = vllm_generate(llm, check_prompts, check_tokens)
                    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
                    if mismatched:
                        raise AssertionError(f"greedy tokens differ between dora and vLLM for prompts {mismatched}")
                    log(f"parity: identical greedy tokens in vLLM on {len(check_prompts)} prompts")
                vllm_generate(llm, make_prompts(cfg, batch, prompt_len, seed + 5), [8] * batch)
                for w in workloads_of(batch):
                    best = math.inf
                    for _ in range(repeats if w.name == "fixed" else 1):
                        seconds, (_, n) = timed(lambda: vllm_generate(llm, w.prompts, w.new_tokens))
                        best = min(best, seconds)
                    assert n == sum(w.new_tokens), (n, sum(w.new_tokens))
                    results["vllm"][w.name][str(batch)] = n / best
                    log(f"batch {batch:>3} {w.name:>8}: vLLM {n / best:8.0f} tok/s ({best:.2f} s)")
            finally:
                del llm
        report["ratio_vs_vllm"] = {name: {b: results["dora"][name][b] / results["vllm"][name][b]
                                          for b in map(str, batches)} for name in ("fixed", "variable")}
    return report


def print_table(report: dict, batches, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    tps = report["tokens_per_s"]
    vllm = "vllm" in tps
    columns = ["workload", "batch", "dora tok/s", "HF tok/s", "dora / HF"]
    for col in columns + (["vLLM tok/s", "dora / vLLM"] if vllm else []):
        table.add_column(col, justify="right")
    for name in ("fixed", "variable"):
        for b in map(str, batches):
            d, h = tps["dora"][name][b], tps["hf"][name][b]
            row = [name, b, f"{d:,.0f}", f"{h:,.0f}", f"{d / h:.2f}x"]
            if vllm:
                v = tps["vllm"][name][b]
                row += [f"{v:,.0f}", f"{d / v:.2f}x"]
            table.add_row(*row)
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
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM even where it is importable")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread needs --threads 1 (other threads' CPU time is not counted)")
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.bench7m(dtype=args.dtype)
    requests = min(args.requests, 96) if args.quick else args.requests
    report = run_benchmark(cfg, fixed_tokens=args.fixed_tokens, requests=requests, quick=args.quick,
                           device=args.device, seed=args.seed, clock=args.clock,
                           repeats=1 if args.quick else args.repeats, moe_impl=args.moe_impl,
                           with_vllm=not args.no_vllm and args.device == "cpu" and vllm_available(),
                           threads=args.threads)
    print_table(report, BATCHES, f"bench7m, {args.dtype}, {args.threads} threads, {args.device}, {args.clock} clock")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

"""How long a vLLM engine replica stops generating to take a new policy version.

    .venv-vllm/bin/python tools/bench_vllm_update.py                                   # the tiny MoE
    .venv-vllm/bin/python tools/bench_vllm_update.py --model models/smollm2-135m-instruct

A vLLM replica holds one version, so an update is: drain (no new groups; running ones finish -- the
rollout pool sends new groups to the other replicas meanwhile), then `add_version`: convert to Hugging
Face names, check shapes, serialise safetensors buckets, load them in vLLM's engine process through
the worker extension, reset the prefix cache. The replica generates nothing during `add_version`, so
its wall time is the replica's generation gap; other replicas keep generating. Each update here loads
different weights (a perturbed copy), checked to change the greedy output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

import torch

from dora.engines.config import EngineConfig
from dora.engines.vllm_engine import VllmEngine
from dora.models.config import ModelConfig
from dora.models.io import load_model, save_model, to_hf_state_dict
from dora.models.model import DecoderLM
from dora.types import PromptGroup, SamplingParams


def greedy(engine: VllmEngine, version: int, loop: asyncio.AbstractEventLoop, stream, group_id: int) -> list[int]:
    engine.submit(PromptGroup(group_id=group_id, prompt_id=0, prompt_ids=[1, 2, 3, 4, 5, 6, 7, 8]), version,
                  SamplingParams(max_new_tokens=16, temperature=0.0))
    return loop.run_until_complete(anext(stream)).response_ids


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="a model folder (default: a fresh tiny MoE)")
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or tmp
        model = load_model(folder) if args.model else DecoderLM.from_config(ModelConfig.tiny(), seed=0)
        if not args.model:
            save_model(model, folder)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        nbytes = sum(v.numel() * v.element_size() for v in to_hf_state_dict(weights, model.config).values())
        engine = VllmEngine(folder, EngineConfig(kind="vllm", max_live_versions=1, max_model_len=256,
                                                 max_num_seqs=8, max_num_batched_tokens=256), model.config)
        loop = asyncio.new_event_loop()
        stream = engine.finished()
        try:
            engine.add_version(0, weights)
            previous = greedy(engine, 0, loop, stream, 0)
            gen = torch.Generator().manual_seed(0)
            changed = 0
            for version in range(1, args.updates + 1):
                new = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                       for k, v in weights.items()}
                engine.drop_version(version - 1)
                engine.add_version(version, new)
                tokens = greedy(engine, version, loop, stream, version)
                changed += tokens != previous
                previous = tokens
        finally:
            engine.close()
            loop.run_until_complete(stream.aclose())
            loop.close()
    seconds = engine.load_seconds[1:]  # the first load also warms up
    report = {"model": args.model or "tiny MoE (fresh)", "weight_bytes": nbytes, "updates": len(seconds),
              "load_s_p50": statistics.median(seconds), "load_s_max": max(seconds),
              "gib_per_s": nbytes / statistics.median(seconds) / 2**30, "greedy_changed": changed}
    print(f"{report['model']}: {nbytes / 2**20:.1f} MiB of weights; replica gap per update p50 "
          f"{report['load_s_p50'] * 1000:.0f} ms, max {report['load_s_max'] * 1000:.0f} ms "
          f"({report['gib_per_s']:.2f} GiB/s); greedy output changed after {changed}/{len(seconds)} updates")
    if changed != len(seconds):
        raise AssertionError("an update did not change the greedy output: the new weights were not served")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

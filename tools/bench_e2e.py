"""End-to-end throughput of dora's rollout modes on this machine: same model, warm start, prompts,
seeds and number of trained samples in every mode; only the rollout configuration differs.

    python tools/bench_e2e.py --json bench_e2e.json            # 3 seeds per mode
    python tools/bench_e2e.py --quick                          # 1 seed, fewer steps (< 5 minutes)

Modes (each in its best arrangement of this machine's 2 cores):
- sync / sync_2threads / sync_local: k = 0, generation and training alternate: in one process with
  one torch thread per phase, with both cores per phase (at this model size a second intra-op
  thread makes both phases slower), and with the trainer in a process of its own (`runtime=local`).
  Ratios are reported against `sync` and against the fastest of the three (`best_sync`);
- one_step_off: k = 1, one version per engine, whole-batch admission waves (generation of the next
  batch overlaps training);
- dora_k1 / dora_k2: multi-version streaming, k = 1 / 2.
The overlapped modes run with `runtime=local` (engine in this process, trainer in a child process,
one torch thread each): in one process the engine's decode loop and the train step share the
interpreter lock, which `dora_k2_inline` measures beside them.
Partial rollout needs an engine that swaps weights under running sequences, which dora's engines
refuse by design (one version per trajectory); it is measured in `tools/simulate.py` only.

Reports trained tokens/s (response tokens trained on, per second of the training loop, without the
final evaluation), rollout tokens/s, engine and trainer idle fractions, the staleness histogram and
held-out greedy accuracy after the run (mean over seeds), with ratios against sync and against the
fastest synchronous arrangement of the run (`best_sync`, `ratios_vs_best_sync`); the diff of the
resolved configs of each mode against sync; and a timeline PNG per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dora.cli import compose_config, run
from dora.config import config_to_dict
from dora.telemetry.metrics import read_jsonl

# The recipe (grpo_tiny) pins k and versions per engine in its body, so every mode states both.
SYNC = ["rollout=synchronous", "rollout.max_staleness=0", "rollout.max_live_versions=1"]
DORA_K2 = ["rollout=multi_version", "rollout.max_staleness=2", "rollout.max_live_versions=2"]
MODES: dict[str, list[str]] = {
    "sync": SYNC,
    "sync_2threads": [*SYNC, "runtime.engine_threads=2", "runtime.trainer_threads=2"],
    "sync_local": [*SYNC, "runtime=local"],
    "one_step_off": ["rollout=one_step_off", "rollout.max_staleness=1", "rollout.max_live_versions=1", "runtime=local"],
    "dora_k1": ["rollout=multi_version", "rollout.max_staleness=1", "rollout.max_live_versions=2", "runtime=local"],
    "dora_k2": [*DORA_K2, "runtime=local"],
    "dora_k2_inline": DORA_K2,
}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_diff(base: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    a, b = flatten(base), flatten(other)
    ignore = ("logging.run_dir", "seed", "model.seed", "data.seed", "trainer.seed")
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in ignore}


def run_mode(mode: str, seed: int, common: list[str], out_dir: Path) -> dict[str, Any]:
    run_dir = out_dir / f"{mode}_seed{seed}"
    cfg = compose_config("grpo_tiny", [*common, *MODES[mode], f"seed={seed}", f"data.seed={seed}",
                                       f"trainer.seed={seed}", f"logging.run_dir={run_dir}"])
    summary = run(cfg, run_dir)  # the runtime the mode's config names
    rows = read_jsonl(summary.metrics_path)
    loop_s = rows[-1]["elapsed_s"]  # end of the last step, before the final evaluation
    engine_busy = sum(summary.extra["engine_busy_s"])
    return {
        "config": config_to_dict(cfg),
        "trained_tokens_per_s": summary.trained_tokens / loop_s,
        "rollout_tokens_per_s": rows[-1]["rollout_tokens"] / loop_s,
        "engine_idle_frac": max(0.0, 1 - engine_busy / (loop_s * len(summary.extra["engine_busy_s"]))),
        "trainer_idle_frac": max(0.0, 1 - summary.extra["trainer_busy_s"] / loop_s),
        "trainer_wait_s": sum(r["wait_s"] for r in rows),
        "staleness": {str(k): v for k, v in summary.staleness.items()},
        "final_accuracy": summary.final_eval.accuracy if summary.final_eval else float("nan"),
        "initial_accuracy": summary.initial_eval.accuracy if summary.initial_eval else float("nan"),
        "loop_s": loop_s,
        "timeline": str(run_dir / "timeline.json"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="train steps per run (default 60, quick 20)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per mode (default 3, quick 1)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=None, help="run folders and timelines (default: a temp dir)")
    args = parser.parse_args()
    steps = args.steps or (20 if args.quick else 60)
    seeds = args.seeds or (1 if args.quick else 3)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; known: {list(MODES)}")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="dora_bench_e2e_"))
    common = [f"steps={steps}", "eval.every=0", "logging.wandb=false", "logging.progress=false"]
    console = Console(width=160, markup=False, highlight=False)

    per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for seed in range(seeds):
        for mode in modes:  # interleaved, so slow drift of the machine hits every mode alike
            console.print(f"[bench_e2e] {mode} seed {seed} ...")
            per_seed[mode].append(run_mode(mode, seed, common, out_dir))

    base_config = per_seed[modes[0]][0]["config"]
    for mode in modes[1:]:
        console.print(f"[bench_e2e] config {mode} vs {modes[0]}: {config_diff(base_config, per_seed[mode][0]['config'])}")

    result: dict[str, Any] = {"steps": steps, "seeds": seeds, "modes": {}}
    for mode, runs in per_seed.items():
        staleness: dict[str, int] = {}
        for r in runs:
            for k, v in r["staleness"].items():
                staleness[k] = staleness.get(k, 0) + v
        result["modes"][mode] = {
            key: statistics.mean(r[key] for r in runs)
            for key in ("trained_tokens_per_s", "rollout_tokens_per_s", "engine_idle_frac", "trainer_idle_frac",
                        "trainer_wait_s", "final_accuracy", "initial_accuracy", "loop_s")}
        result["modes"][mode]["final_accuracy_per_seed"] = [r["final_accuracy"] for r in runs]
        result["modes"][mode]["staleness"] = staleness
    if "sync" in result["modes"]:
        base = result["modes"]["sync"]["trained_tokens_per_s"]
        result["ratios_vs_sync"] = {m: v["trained_tokens_per_s"] / base for m, v in result["modes"].items()}
        # The synchronous baseline at its best: whichever of its arrangements was fastest in this run.
        best_sync = max((m for m in result["modes"] if m.startswith("sync")),
                        key=lambda m: result["modes"][m]["trained_tokens_per_s"])
        best = result["modes"][best_sync]["trained_tokens_per_s"]
        result["best_sync"] = best_sync
        result["ratios_vs_best_sync"] = {m: v["trained_tokens_per_s"] / best for m, v in result["modes"].items()}
    _plot_timelines(per_seed, out_dir)

    table = Table(title=f"bench_e2e: {steps} steps x {seeds} seed(s) per mode, same trained samples")
    for column in ("mode", "trained tok/s", "x sync", "x best sync", "rollout tok/s", "engine idle", "trainer idle",
                   "accuracy", "staleness"):
        table.add_column(column, justify="right")
    for mode, v in result["modes"].items():
        table.add_row(mode, f"{v['trained_tokens_per_s']:.0f}", f"{result.get('ratios_vs_sync', {}).get(mode, 0):.2f}",
                      f"{result.get('ratios_vs_best_sync', {}).get(mode, 0):.2f}",
                      f"{v['rollout_tokens_per_s']:.0f}", f"{v['engine_idle_frac']:.2f}", f"{v['trainer_idle_frac']:.2f}",
                      f"{v['initial_accuracy']:.3f}->{v['final_accuracy']:.3f}",
                      " ".join(f"{k}:{n}" for k, n in sorted(v["staleness"].items())))
    console.print(table)
    console.print(f"[bench_e2e] runs and timelines in {out_dir}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        console.print(f"[bench_e2e] wrote {args.json}")


def _plot_timelines(per_seed: dict[str, list[dict[str, Any]]], out_dir: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_timeline", Path(__file__).with_name("plot_timeline.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    for mode, runs in per_seed.items():
        module.plot(Path(runs[0]["timeline"]), out_dir / f"timeline_{mode}.png", title=f"bench_e2e: {mode}")


if __name__ == "__main__":
    main()

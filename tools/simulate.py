"""Cluster-scale simulator: dora's rollout modes on a simulated cluster, driven through the shipped
scheduler core (`dora.rollout.scheduler.Scheduler`, via `dora.rollout.sim.simulate`).

    python tools/simulate.py --preset dora_paper --json sim.json
    python tools/simulate.py --preset dora_paper --tp 4             # engines of 4 accelerators
    python tools/simulate.py --calibrate bench_e2e.json        # this machine's measured costs

Each mode runs in its best arrangement (synchronous may be colocated; every overlapping mode splits
the cluster between generation and training, and the split is searched). Costs come from hardware
specifications and published model sizes (`dora.rollout.cluster_sim`) or from a bench_e2e report
(`--calibrate`, keys listed in `dora.rollout.sim_runs.CALIBRATION_KEYS`); none is fitted to a speedup.

JSON (`--json PATH`): {"scenario": .., "modes": {MODE: {"trained_tokens_per_s": .., ...}}, "best": MODE,
"ratios": {"vs_sync": .., "vs_one_step_off": .., "vs_partial_rollout": ..}, ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dora.rollout.sim_runs import (BASELINES, MODES, PRESETS, ModeRun, ModeSearch, Scenario, best_arrangement,
                                   load_calibration, overlap_ceiling, run_calibrated, run_mode)

DEFAULT_MODES = ("sync", "one_step_off", "partial_rollout", "dora_k1", "dora_k2", "dora_k1:m1", "dora_k2:m1")


def _search(args: tuple[Scenario, str, dict[str, Any]]) -> ModeSearch:
    scenario, mode, overrides = args
    return best_arrangement(scenario, mode, **overrides)


def parse_mode(spec: str) -> tuple[str, dict[str, Any]]:
    """`dora_k2` or `dora_k2:m1` (one live version per engine, the DORA paper's engines)."""
    name, _, variant = spec.partition(":")
    if name not in MODES:
        raise SystemExit(f"unknown mode {name!r}; known: {', '.join(MODES)}")
    if not variant:
        return name, {}
    if variant.startswith("m") and variant[1:].isdigit():
        return name, {"max_live_versions": int(variant[1:])}
    raise SystemExit(f"mode {spec!r}: the variant after ':' must be mN (N versions per engine)")


def report(scenario: Scenario, runs: dict[str, ModeRun], searches: dict[str, ModeSearch],
           elapsed_s: float) -> dict[str, Any]:
    dora = {m: r for m, r in runs.items() if m.startswith("dora")}
    best = max(dora, key=lambda m: dora[m].trained_tokens_per_s) if dora else None
    ratios = {}
    if best is not None:
        for b in BASELINES:
            if b in runs:
                ratios[f"vs_{b}"] = runs[best].trained_tokens_per_s / runs[b].trained_tokens_per_s
    c = scenario.cluster
    bounds = overlap_ceiling(scenario)
    if "sync" in runs:
        bounds["overlap_ceiling_vs_sync"] = bounds["overlap_ceiling_tokens_per_s"] / runs["sync"].trained_tokens_per_s
    return {
        "scenario": {"name": scenario.name, "description": scenario.description,
                     "accelerators": c.num_accelerators, "accelerator": c.accelerator.name, "tp": c.tp,
                     "model": c.model.name, "batch_groups": scenario.batch_groups,
                     "group_size": scenario.group_size, "max_tokens": scenario.lengths.max_tokens,
                     "mean_response_tokens": scenario.lengths.moments(group_size=scenario.group_size)[0],
                     "num_steps": scenario.num_steps, "warmup_steps": scenario.warmup_steps,
                     "efficiency": {k: getattr(c.eff, k) for k in c.eff.__slots__}},
        "modes": {m: r.summary() for m, r in runs.items()},
        "bounds": bounds,
        "best": best,
        "ratios": ratios,
        "search": {m: [{"arrangement": "colocated" if r.arrangement.colocated else "split",
                        "rollout_engines": r.arrangement.rollout_engines,
                        "trained_tokens_per_s": r.trained_tokens_per_s} for r in s.tried]
                   for m, s in searches.items()},
        "sim_seconds": elapsed_s,
    }


def print_table(console: Console, title: str, runs: dict[str, ModeRun], tp: int, accelerators: int,
                measured: dict[str, float] | None = None) -> None:
    table = Table(title=title)
    for col in ("mode", "k", "ver/eng", "arrangement (gen/train accel.)", "trained tok/s", "× sync", "step s",
                "engine idle", "trainer idle", "decode batch", "staleness"):
        table.add_column(col, justify="left" if col in ("mode", "arrangement (gen/train accel.)") else "right")
    if measured is not None:
        table.add_column("measured tok/s", justify="right")
    sync = runs["sync"].trained_tokens_per_s if "sync" in runs else None
    for mode, r in runs.items():
        gen = r.arrangement.rollout_engines * tp
        where = f"colocated {gen}/{accelerators}" if r.arrangement.colocated else f"split {gen}/{accelerators - gen}"
        row = [mode, str(r.config.k), str(r.config.max_live_versions), where, f"{r.trained_tokens_per_s:,.0f}",
               f"{r.trained_tokens_per_s / sync:.2f}" if sync else "-", f"{r.step_time_s:,.0f}",
               f"{r.engine_idle_frac:.2f}", f"{r.trainer_idle_frac:.2f}",
               f"{r.mean_batch:.0f}/{r.config.max_seqs_per_engine}", f"{r.staleness_mean:.2f}"]
        if measured is not None:
            row.append(f"{measured[mode]:,.2f}" if mode in measured else "-")
        table.add_row(*row)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dora_paper", choices=sorted(PRESETS))
    p.add_argument("--calibrate", type=Path, help="bench_e2e JSON with a `calibration` block (this machine)")
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES),
                   help="modes to simulate (a dora mode may carry :mN, e.g. dora_k2:m1)")
    p.add_argument("--steps", type=int, help="train steps simulated per run (default: the preset's)")
    p.add_argument("--warmup", type=int, help="steps left out of the steady-state measurement")
    p.add_argument("--tp", type=int, help="accelerators per engine, for every mode (default: the preset's)")
    p.add_argument("--workers", type=int, default=2, help="processes simulating modes in parallel")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    console = Console(width=170)
    modes = [parse_mode(m) for m in args.modes]
    labels = [spec for spec in args.modes]
    start = time.perf_counter()
    if args.calibrate is not None:
        return _calibrated(console, args, modes, labels)

    kwargs = {k: v for k, v in (("num_steps", args.steps), ("warmup_steps", args.warmup), ("tp", args.tp))
              if v is not None}
    try:
        scenario = PRESETS[args.preset](**kwargs)
        scenario.cluster.max_seqs(2, scenario.tokens_per_running_seq(), scenario.group_size)
    except ValueError as e:
        raise SystemExit(f"--preset {args.preset}: {e}") from None
    jobs = [(scenario, name, overrides) for name, overrides in modes]
    if args.workers > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            searches = list(pool.map(_search, jobs))
    else:
        searches = [_search(job) for job in jobs]
    runs = {label: s.best for label, s in zip(labels, searches)}
    out = report(scenario, runs, dict(zip(labels, searches)), time.perf_counter() - start)
    best = out["best"]
    if best is not None and "sync" in runs and not runs[best].arrangement.colocated:
        # Context for published comparisons: synchronous RL on the same disaggregated split as dora.
        same = run_mode(scenario, "sync", runs[best].arrangement)
        runs["sync (dora's split)"] = same
        out["modes"]["sync_same_split"] = same.summary()
        out["ratios_same_split"] = {"vs_sync": runs[best].trained_tokens_per_s / same.trained_tokens_per_s}
        out["sim_seconds"] = time.perf_counter() - start
    c = scenario.cluster
    print_table(console, f"{scenario.name}: {scenario.description}", runs, c.tp, c.num_accelerators)
    if out["best"] is not None:
        console.print(f"best dora mode: {out['best']}  " + "  ".join(f"{k} {v:.2f}x" for k, v in out["ratios"].items()))
    b = out["bounds"]
    sync = runs["sync"].trained_tokens_per_s if "sync" in runs else None
    console.print(f"per step at best: generate {b['gen_s']:,.0f} s on all accelerators + train {b['train_s']:,.0f} s on all;"
                  f" any overlapped split <= {b['overlap_ceiling_tokens_per_s']:,.0f} trained tok/s"
                  + (f" = {b['overlap_ceiling_tokens_per_s'] / sync:.2f}x sync" if sync else ""))
    if "ratios_same_split" in out:
        console.print(f"best dora mode vs synchronous on the same split: {out['ratios_same_split']['vs_sync']:.2f}x")
    console.print(f"simulated in {out['sim_seconds']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def _calibrated(console: Console, args: argparse.Namespace, modes: list[tuple[str, dict[str, Any]]],
                labels: list[str]) -> int:
    """Simulate the benchmark's own modes with its measured costs, next to its measured throughput."""
    try:
        bench = load_calibration(args.calibrate)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        return 2
    steps, warmup = args.steps or 8, args.warmup or 2
    runs = {label: run_calibrated(bench, name, steps, warmup) for label, (name, _) in zip(labels, modes)}
    measured = {m: v["trained_tokens_per_s"] for m, v in bench.get("modes", {}).items()
                if isinstance(v, dict) and "trained_tokens_per_s" in v}
    print_table(console, f"calibrated from {args.calibrate}", runs, 1, 2 * bench["calibration"]["num_engines"],
                measured)
    if args.json is not None:
        out = {"scenario": {"name": "calibrated", "source": str(args.calibrate)},
               "modes": {m: r.summary() | ({"measured_trained_tokens_per_s": measured[m]} if m in measured else {})
                         for m, r in runs.items()}}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

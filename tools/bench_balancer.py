"""dora's replay-guided expert balancer against no balancing, EPLB and the ideal, on routing traces.

    python tools/bench_balancer.py --json bench_balancer.json --png bench_balancer.png
    python tools/bench_balancer.py --quick            # < 2 minutes

Reference trace (the issue's targets): 256 experts, top-8, 64 ranks in 8 nodes of 8, 4 experts + 1
spare slot per rank, 131,072 tokens per micro-batch, 8 micro-batches per step, 16 hot experts with
12% of the traffic moving every 2 micro-batches, Qwen3-30B-A3B-like experts; counts drawn directly
(see dora.moe.traces). Each trace has one extra warm-up step first that only feeds EPLB's history;
every figure is over the steps after it.

Policies: none (contiguous experts, no replicas); eplb_history (EPLB from a moving average of past
steps, replicas get even shares); eplb_oracle_step (EPLB from the step's own total loads, even
shares); dora (the default BalancerConfig: placement across nodes per step, replicas and uneven
quotas per micro-batch inside each node, a node more than 5% over the mean sheds to other nodes);
dora_intra_node (never crosses nodes); dora_cross_node (sheds any node excess above 0.5%); ideal
(every rank at the mean).

Per policy: imbalance (max / mean rank load per layer and micro-batch) p50/p99/max, simulated step
time (dora.moe.cost_model, seconds, summed over layers and micro-batches), bytes moved per step
(weight copies + replica gradients reduced to their home, also reported apart), speedups. Planner
latency: dora's plan for one layer and micro-batch, with the step placement's time spread over the
step's micro-batches, on one core; timed in passes of its own over the reference trace after the
simulation, each call keeping its fastest pass (`time_planner`). Run it pinned to one core with one
thread per library (OMP_NUM_THREADS=1 ... taskset -c 1).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from dora.moe import cost_model
from dora.moe.balancer import (
    BalancerConfig,
    contiguous_plan,
    place_nodes,
    plan_microbatch,
)
from dora.moe.baselines import EplbHistory, eplb_placement, even_split_plan
from dora.moe.plan import Plan, Topology, imbalance
from dora.moe.traces import (
    TraceConfig,
    counts_from_ids,
    record_engine_trace,
    save_trace,
    synthetic_counts,
)

POLICIES = ("none", "eplb_history", "eplb_oracle_step", "dora", "dora_intra_node", "dora_cross_node", "ideal")


@dataclass(slots=True)
class Workload:
    name: str
    counts_MLE: np.ndarray
    topo: Topology
    microbatches_per_step: int
    expert: cost_model.ExpertShape
    ids_TLK: np.ndarray | None = None
    """The per-token routing, for traces recorded from the engine."""
    tokens_per_microbatch: int = 131_072


@dataclass(slots=True)
class PolicyResult:
    imbalance: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    bytes_moved: list[float] = field(default_factory=list)
    weight_bytes: list[float] = field(default_factory=list)
    grad_bytes: list[float] = field(default_factory=list)
    series: list[float] = field(default_factory=list)
    """Imbalance averaged over layers, per micro-batch, for the plot."""


def reference_trace(layers: int, steps: int, seed: int, **overrides) -> TraceConfig:
    return TraceConfig(num_layers=layers, num_steps=steps + 1, seed=seed, **overrides)


def workloads(quick: bool, seed: int) -> list[Workload]:
    layers, steps = (8, 2) if quick else (48, 4)
    ref_topo = Topology(num_experts=256, num_ranks=64, ranks_per_node=8, slots_per_rank=5)
    qwen = cost_model.QWEN3_30B_A3B
    out = []
    for name, overrides in (("reference", {}),
                            ("adversarial_one_expert_30pct_tokens", {"dominant_token_share": 0.3}),
                            ("adversarial_one_expert_95pct_tokens", {"dominant_token_share": 0.95}),
                            ("adversarial_top2_one_expert_30pct_slots",
                             {"top_k": 2, "dominant_token_share": 0.6, "hot_share": 0.03}),
                            ("hot_moves_every_microbatch", {"hot_move_every": 1}),
                            ("no_hot_experts_skew_only", {"num_hot": 0, "hot_share": 0.0})):
        cfg = reference_trace(layers, steps, seed, **overrides)
        out.append(Workload(name, synthetic_counts(cfg), ref_topo, cfg.microbatches_per_step, qwen))
    cfg = reference_trace(layers, steps, seed)
    out.append(Workload("reference_deepseek_v3_experts", synthetic_counts(cfg), ref_topo,
                        cfg.microbatches_per_step, cost_model.DEEPSEEK_V3))
    out.append(engine_workload(quick, seed))
    return out


def engine_workload(quick: bool, seed: int) -> Workload:
    """Routing recorded from dora's torch engine on a tiny MoE (64 experts, top-8, random weights,
    16-token prompts + 32 sampled tokens per sequence), on 16 ranks in 4 nodes of 4 with 4 experts + 1
    spare slot each; micro-batches of 4096 tokens (2048 with --quick), 4 per step."""
    import torch

    from dora.models.config import ModelConfig

    torch.set_num_threads(1)
    cfg = ModelConfig.tiny(num_experts=64, num_experts_per_tok=8)
    ids = record_engine_trace(cfg, num_sequences=384 if quick else 1536, seed=seed)
    tokens_per_mb, mbs = (2048 if quick else 4096), 4
    counts = counts_from_ids(ids, cfg.num_experts, tokens_per_mb)
    counts = counts[: len(counts) // mbs * mbs]
    return Workload("engine_tiny_moe_64x8", counts, Topology(64, 16, 4, 5), mbs, cost_model.QWEN3_30B_A3B,
                    ids_TLK=ids, tokens_per_microbatch=tokens_per_mb)


@dataclass(slots=True)
class Timing:
    placement: list[float] = field(default_factory=list)
    """Seconds of `place_nodes` per layer and step (one entry per micro-batch, for pairing)."""
    microbatch: list[float] = field(default_factory=list)
    """Seconds of `plan_microbatch` per layer and micro-batch."""
    spread: list[float] = field(default_factory=list)
    """Slowest / fastest of the timed passes of each `plan_microbatch`: how noisy the machine was."""

    def per_layer_ms(self, microbatches_per_step: int) -> np.ndarray:
        """Per layer and micro-batch: its plan plus its share of the step's placement."""
        return (np.asarray(self.microbatch) + np.asarray(self.placement) / microbatches_per_step) * 1e3


def time_planner(w: Workload, timing: Timing, repeats: int) -> None:
    """The dora planner's wall time on a workload, into `timing`: the whole trace is replayed
    `repeats` times (placement per layer and step, then the chain of micro-batch plans; every pass
    makes the same plans) with each call timed alone, and each call keeps its fastest pass. The
    passes are a trace apart, so a burst of other work on a shared machine rarely hits one call in
    every pass, and no call is timed again right after itself with its data still in cache. Step 0
    is left out, as in the simulation."""
    topo, M = w.topo, w.microbatches_per_step
    config = BalancerConfig(move_cost_tokens=cost_model.move_cost_tokens(topo, w.expert))
    num_steps, L = w.counts_MLE.shape[0] // M, w.counts_MLE.shape[1]
    place_s, plan_s = [], []
    for _ in range(max(1, repeats)):
        places, plans, last = [], [], [None] * L
        for step in range(num_steps):
            for layer in range(L):
                c_ME = w.counts_MLE[step * M:(step + 1) * M, layer]
                t0 = time.perf_counter()
                placement = place_nodes(c_ME, topo)
                t_place = time.perf_counter() - t0
                prev = last[layer]
                for c in c_ME:
                    t0 = time.perf_counter()
                    prev = plan_microbatch(c, placement, topo, config=config, prev=prev)
                    t_plan = time.perf_counter() - t0
                    if step > 0:
                        places.append(t_place)
                        plans.append(t_plan)
                last[layer] = prev
        place_s.append(places)
        plan_s.append(plans)
    place, plan = np.asarray(place_s), np.asarray(plan_s)
    timing.placement.extend(place.min(0).tolist())
    timing.microbatch.extend(plan.min(0).tolist())
    timing.spread.extend((plan.max(0) / plan.min(0)).tolist())


def run_workload(w: Workload, timing: Timing | None = None, timing_repeats: int = 1) -> dict[str, PolicyResult]:
    topo, M = w.topo, w.microbatches_per_step
    num_steps = w.counts_MLE.shape[0] // M
    L = w.counts_MLE.shape[1]
    results = {p: PolicyResult() for p in POLICIES}
    history = EplbHistory(topo, L)
    move_cost = cost_model.move_cost_tokens(topo, w.expert)
    configs = {"dora": BalancerConfig(move_cost_tokens=move_cost),
               "dora_intra_node": BalancerConfig(cross_node=False, move_cost_tokens=move_cost),
               "dora_cross_node": BalancerConfig(min_shed=0.005, move_cost_tokens=move_cost)}
    last: dict[str, list[Plan | None]] = {p: [None] * L for p in POLICIES}
    for step in range(num_steps):
        counts_MLE = w.counts_MLE[step * M:(step + 1) * M]
        measured = step > 0  # step 0 only warms EPLB's history
        plans: dict[str, list[list[Plan]]] = {p: [] for p in POLICIES if p != "ideal"}
        for layer in range(L):
            c_ME = counts_MLE[:, layer]
            plans["none"].append([contiguous_plan(c, topo) for c in c_ME])
            hist = history.placement(layer)
            plans["eplb_history"].append([even_split_plan(c, hist, topo) for c in c_ME])
            oracle = eplb_placement(c_ME.sum(0), topo)
            plans["eplb_oracle_step"].append([even_split_plan(c, oracle, topo) for c in c_ME])
            placement = place_nodes(c_ME, topo)
            for policy, config in configs.items():
                prev, layer_plans = last[policy][layer], []
                for c in c_ME:
                    prev = plan_microbatch(c, placement, topo, config=config, prev=prev)
                    layer_plans.append(prev)
                plans[policy].append(layer_plans)
        history.observe(counts_MLE)
        for policy, by_layer in plans.items():
            res = results[policy]
            step_time, moved, weights, grads = 0.0, 0.0, 0.0, 0.0
            per_mb = np.zeros(M)
            for layer, layer_plans in enumerate(by_layer):
                prev = last[policy][layer]
                for m, plan in enumerate(layer_plans):
                    nxt = layer_plans[m + 1] if m + 1 < M else None
                    move = cost_model.movement(prev, plan, nxt, topo, w.expert)
                    load = plan.rank_load()
                    step_time += cost_model.layer_time(load, move, topo, w.expert)
                    moved += move.total
                    weights += move.weight_bytes
                    grads += move.grad_bytes
                    per_mb[m] += imbalance(load)
                    if measured:
                        res.imbalance.append(imbalance(load))
                    prev = plan
                last[policy][layer] = prev
            if measured:
                res.step_time.append(step_time)
                res.bytes_moved.append(moved)
                res.weight_bytes.append(weights)
                res.grad_bytes.append(grads)
                res.series.extend((per_mb / L).tolist())
        if measured:
            ideal = results["ideal"]
            total = 0.0
            for layer in range(L):
                for c in counts_MLE[:, layer]:
                    load = np.full(topo.num_ranks, c.sum() / topo.num_ranks)
                    total += cost_model.layer_time(load, None, topo, w.expert)
                    ideal.imbalance.append(1.0)
            ideal.step_time.append(total)
            ideal.bytes_moved.append(0.0)
            ideal.weight_bytes.append(0.0)
            ideal.grad_bytes.append(0.0)
            ideal.series.extend([1.0] * M)
    if timing is not None:
        time_planner(w, timing, timing_repeats)
    return results


def summarize(results: dict[str, PolicyResult]) -> dict:
    policies = {}
    for name, r in results.items():
        imb = np.asarray(r.imbalance)
        policies[name] = {
            "imbalance_p50": float(np.percentile(imb, 50)), "imbalance_p99": float(np.percentile(imb, 99)),
            "imbalance_max": float(imb.max()), "step_time": float(np.mean(r.step_time)),
            "bytes_moved": float(np.mean(r.bytes_moved)),
            "weight_bytes_copied": float(np.mean(r.weight_bytes)),
            "grad_bytes_reduced": float(np.mean(r.grad_bytes)),
        }
    ideal = policies["ideal"]["step_time"]
    for p in policies.values():
        p["efficiency_vs_ideal"] = ideal / p["step_time"]
    dora = policies["dora"]["step_time"]
    return {"policies": policies,
            "speedup_vs_eplb_oracle_step": policies["eplb_oracle_step"]["step_time"] / dora,
            "speedup_vs_none": policies["none"]["step_time"] / dora,
            "speedup_vs_eplb_history": policies["eplb_history"]["step_time"] / dora,
            "cross_node_speedup_vs_eplb_oracle_step": policies["eplb_oracle_step"]["step_time"]
            / policies["dora_cross_node"]["step_time"]}


def print_table(name: str, summary: dict) -> None:
    print(f"\n== {name}")
    print(f"{'policy':<18}{'imb p50':>9}{'imb p99':>9}{'imb max':>9}{'step s':>10}{'eff':>7}{'GB moved':>10}")
    for policy, p in summary["policies"].items():
        print(f"{policy:<18}{p['imbalance_p50']:>9.3f}{p['imbalance_p99']:>9.3f}{p['imbalance_max']:>9.3f}"
              f"{p['step_time']:>10.3f}{p['efficiency_vs_ideal']:>7.3f}{p['bytes_moved'] / 1e9:>10.2f}")
    print(f"dora speedup vs eplb_oracle_step {summary['speedup_vs_eplb_oracle_step']:.3f}x, "
          f"vs none {summary['speedup_vs_none']:.3f}x, vs eplb_history {summary['speedup_vs_eplb_history']:.3f}x; "
          f"cross-node vs eplb_oracle_step {summary['cross_node_speedup_vs_eplb_oracle_step']:.3f}x")


def plot(results: dict[str, PolicyResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, r in results.items():
        ax.plot(r.series, label=name, linewidth=1.2)
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("max / mean rank load (mean over layers)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 layers, 2 measured steps (< 2 minutes)")
    ap.add_argument("--json", help="write the reference trace's results (plus the other traces) here")
    ap.add_argument("--png", default=None, help="plot of imbalance over micro-batches (reference trace)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only-reference", action="store_true")
    ap.add_argument("--save-traces", metavar="DIR", help="write every trace as DIR/<name>.npz (dora.moe.traces)")
    ap.add_argument("--timing-repeats", type=int, default=5,
                    help="passes over the reference trace timing the dora planner; each call keeps its fastest")
    args = ap.parse_args()

    all_summaries = {}
    timing = Timing()
    for w in workloads(args.quick, args.seed):
        if args.only_reference and w.name != "reference":
            continue
        if args.save_traces:
            Path(args.save_traces).mkdir(parents=True, exist_ok=True)
            save_trace(Path(args.save_traces) / f"{w.name}.npz", num_experts=w.topo.num_experts,
                       tokens_per_microbatch=w.tokens_per_microbatch, ids_TLK=w.ids_TLK,
                       counts_MLE=None if w.ids_TLK is not None else w.counts_MLE)
        t0 = time.perf_counter()
        is_ref = w.name == "reference"
        results = run_workload(w, timing if is_ref else None, args.timing_repeats if is_ref else 1)
        all_summaries[w.name] = summarize(results)
        print_table(f"{w.name}: {w.topo.num_experts} experts, {w.topo.num_ranks} ranks / {w.topo.num_nodes} nodes, "
                    f"{w.counts_MLE.shape[1]} layers, {w.counts_MLE.shape[0] // w.microbatches_per_step - 1} "
                    f"measured steps ({time.perf_counter() - t0:.0f} s)", all_summaries[w.name])
        if is_ref and args.png:
            plot(results, args.png, "reference trace: imbalance per micro-batch")
    ms = timing.per_layer_ms(8)
    place_ms = np.asarray(timing.placement) * 1e3
    plan_ms = np.asarray(timing.microbatch) * 1e3
    print(f"\ndora planner on the reference trace (256 experts x 64 ranks, 1 core, each call its fastest of "
          f"{args.timing_repeats} passes over the trace):\n  per layer and micro-batch (plan + 1/8 of the step "
          f"placement): p50 {np.percentile(ms, 50):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms over {len(ms)}\n"
          f"  micro-batch plan alone: p50 {np.percentile(plan_ms, 50):.3f} ms, p99 {np.percentile(plan_ms, 99):.3f} ms;"
          f" step placement per layer: p50 {np.percentile(place_ms, 50):.3f} ms, p99 {np.percentile(place_ms, 99):.3f} ms\n"
          f"  pass-to-pass spread (slowest / fastest of the {args.timing_repeats} passes of a plan): "
          f"p50 {np.percentile(timing.spread, 50):.2f}x, p90 {np.percentile(timing.spread, 90):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(build_report(all_summaries, timing), f, indent=2)


def build_report(summaries: dict[str, dict], timing: Timing, microbatches_per_step: int = 8) -> dict:
    """The --json document: the reference trace's figures in the issue's shape, the planner's
    latency, and the other traces under "other_traces"."""
    ms = timing.per_layer_ms(microbatches_per_step)
    place_ms = np.asarray(timing.placement) * 1e3
    plan_ms = np.asarray(timing.microbatch) * 1e3
    out = dict(summaries["reference"])
    out["planner_ms_p50"] = float(np.percentile(ms, 50))
    out["planner_ms_p99"] = float(np.percentile(ms, 99))
    out["planner_microbatch_ms_p50"] = float(np.percentile(plan_ms, 50))
    out["planner_microbatch_ms_p99"] = float(np.percentile(plan_ms, 99))
    out["placement_ms_p50"] = float(np.percentile(place_ms, 50))
    out["placement_ms_p99"] = float(np.percentile(place_ms, 99))
    out["planner_repeat_spread_p50"] = float(np.percentile(timing.spread, 50))
    out["planner_repeat_spread_p90"] = float(np.percentile(timing.spread, 90))
    out["other_traces"] = {k: v for k, v in summaries.items() if k != "reference"}
    return out

if __name__ == "__main__":
    main()

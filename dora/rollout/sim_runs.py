"""Scenarios for the cluster-scale simulator: the rollout modes as configured for real runs, a
steady-state throughput measurement, the search over arrangements, and the `dora_paper` preset.

`tools/simulate.py` is the command line on top of this; `dora.rollout.cluster_sim` holds the cost
models and `dora.rollout.sim` the event loop that drives the shipped `Scheduler`.

Modes are read from `conf/rollout/<mode>.yaml` -- the files real runs compose -- so the simulator
runs exactly the scheduler configurations users run; only the scale (B, n, engine capacity) comes
from the scenario. Throughput is measured in steady state: trained tokens of steps
`warmup_steps..num_steps-1` over the time between the end of step `warmup_steps - 1` and the end of
the last step (the pipeline's fill at the start is excluded, and the prompt source never runs dry).
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dora.rollout.cluster_sim import (H800, QWEN25_32B, Arrangement, Cluster, ClusterWorkload, Efficiency,
                                      LengthModel)
from dora.rollout.config import RolloutConfig
from dora.rollout.sim import DecodeCost, SimResult, SimWorkloadLike, simulate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "rollout"

MODES: dict[str, tuple[str, dict[str, Any]]] = {
    # name -> (conf/rollout/<file>.yaml, overrides)
    "sync": ("synchronous", {}),
    "one_step_off": ("one_step_off", {}),
    "partial_rollout": ("partial_rollout", {}),
    "dora_k1": ("multi_version", {"max_staleness": 1}),
    "dora_k2": ("multi_version", {"max_staleness": 2}),
    "dora_k3": ("multi_version", {"max_staleness": 3}),
}
BASELINES = ("sync", "one_step_off", "partial_rollout")
# Knobs a scenario sets itself (the scale); everything else comes from the mode's YAML.
_SCALE_KEYS = ("batch_groups", "group_size", "max_seqs_per_engine")


def mode_config(mode: str, batch_groups: int, group_size: int, max_seqs_per_engine: int,
                **overrides: Any) -> RolloutConfig:
    """The `RolloutConfig` of `mode` as real runs compose it, at the scenario's scale."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {sorted(MODES)}")
    name, mode_overrides = MODES[mode]
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"mode {mode}: rollout config {path} not found")
    values = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(values, dict)
    values.update(mode_overrides)
    values.update(overrides)
    values.update(batch_groups=batch_groups, group_size=group_size, max_seqs_per_engine=max_seqs_per_engine)
    return RolloutConfig(**values)


@dataclass(slots=True)
class Scenario:
    name: str
    description: str
    cluster: Cluster
    lengths: LengthModel
    batch_groups: int
    group_size: int
    prompt_len: int
    num_steps: int
    warmup_steps: int

    def __post_init__(self) -> None:
        if not 1 <= self.warmup_steps < self.num_steps:
            raise ValueError(f"warmup_steps must be in 1..num_steps-1, got {self.warmup_steps} of {self.num_steps}")

    def tokens_per_running_seq(self) -> float:
        """Mean context of a running sequence: a sequence is in flight for a time proportional to its
        length, so it is length-biased: prompt + E[L^2] / (2 E[L])."""
        mean, second = _moments(self.lengths, self.group_size)
        return self.prompt_len + second / (2 * mean)

    def trained_sq_per_token(self) -> float:
        """E[S^2] / E[S] of trained sequences (S = prompt + response): a batch of `tokens` tokens has
        squared lengths summing to `tokens` times this (the attention term of a train step)."""
        mean, second = _moments(self.lengths, self.group_size)
        p = self.prompt_len
        return (p * p + 2 * p * mean + second) / (p + mean)


@dataclass(slots=True)
class ModeRun:
    mode: str
    arrangement: Arrangement
    config: RolloutConfig
    result: SimResult
    trained_tokens_per_s: float
    step_time_s: float
    """Mean wall time per step in steady state."""
    trainer_idle_frac: float
    engine_idle_frac: float
    mean_batch: float
    """Mean running sequences per engine over the run (decode batch size)."""
    staleness_mean: float
    max_live_versions: int

    def summary(self) -> dict[str, Any]:
        return {"trained_tokens_per_s": self.trained_tokens_per_s, "step_time_s": self.step_time_s,
                "arrangement": "colocated" if self.arrangement.colocated else "split",
                "rollout_engines": self.arrangement.rollout_engines,
                "engine_idle_frac": self.engine_idle_frac, "trainer_idle_frac": self.trainer_idle_frac,
                "mean_decode_batch": self.mean_batch, "max_seqs_per_engine": self.config.max_seqs_per_engine,
                "staleness_mean": self.staleness_mean, "max_live_versions": self.max_live_versions,
                "k": self.config.k, "regenerations": self.result.metrics.num_regenerations,
                "migrations": self.result.metrics.num_migrations}


def measure(mode: str, config: RolloutConfig, arrangement: Arrangement, result: SimResult,
            warmup_steps: int) -> ModeRun:
    steps = result.steps
    if len(steps) <= warmup_steps:
        raise ValueError(f"{mode}: {len(steps)} steps ran, need more than warmup_steps={warmup_steps}")
    window = steps[warmup_steps:]
    t0 = steps[warmup_steps - 1].end
    span = steps[-1].end - t0
    busy = sum(s.end - s.start for s in window)
    samples = sum(result.metrics.staleness.values())
    stale = sum(s * c for s, c in result.metrics.staleness.items()) / samples if samples else 0.0
    engines = len(result.engine_seq_s)
    return ModeRun(mode, arrangement, config, result, sum(s.tokens for s in window) / span, span / len(window),
                   max(0.0, 1.0 - busy / span), result.idle_fraction, sum(result.engine_seq_s) / (engines * result.end_time),
                   stale, max((len(v) for _, v in result.metrics.live_versions), default=0))


def run_mode(scenario: Scenario, mode: str, arrangement: Arrangement, **overrides: Any) -> ModeRun:
    """Simulate `mode` on `arrangement` for `scenario.num_steps` steps."""
    probe = mode_config(mode, scenario.batch_groups, scenario.group_size, scenario.group_size, **overrides)
    versions = probe.max_live_versions or 1
    max_seqs = scenario.cluster.max_seqs(versions, scenario.tokens_per_running_seq(), scenario.group_size)
    config = mode_config(mode, scenario.batch_groups, scenario.group_size, max_seqs, **overrides)
    if arrangement.colocated and config.k > 0:
        raise ValueError(f"{mode}: k={config.k} overlaps generation and training, which a colocated arrangement"
                         " cannot do (the same accelerators would do both at once)")
    workload = ClusterWorkload(scenario.cluster, arrangement, scenario.lengths,
                               num_prompts=scenario.batch_groups * (scenario.num_steps + config.k + 4),
                               prompt_len=scenario.prompt_len, group_size=scenario.group_size)
    return run_workload(mode, config, arrangement, workload, scenario.num_steps, scenario.warmup_steps)


def run_workload(mode: str, config: RolloutConfig, arrangement: Arrangement, workload: SimWorkloadLike,
                 num_steps: int, warmup_steps: int) -> ModeRun:
    result = simulate(config, workload, max_steps=num_steps)
    return measure(mode, config, arrangement, result, warmup_steps)


def balanced_split(scenario: Scenario, versions: int = 1) -> float:
    """Rollout engines at which generation (engines full, one version) and training (the other
    accelerators) would have equal token throughput: the cost model's own first guess for the split."""
    c = scenario.cluster
    seqs = c.max_seqs(versions, scenario.tokens_per_running_seq(), scenario.group_size)
    gen_per_engine = seqs / c.decode_cost().step_s(seqs, 1, seqs * scenario.tokens_per_running_seq())
    train_per_accel = 1.0 / c.train_s(1, 1, scenario.trained_sq_per_token())
    return c.num_accelerators * train_per_accel / (gen_per_engine + c.tp * train_per_accel)


def overlap_ceiling(scenario: Scenario) -> dict[str, float]:
    """Where the time of a step goes at best: generating its tokens with every accelerator decoding
    full batches (`gen_s`), and training on every accelerator (`train_s`). Any split of the cluster
    that overlaps the two runs at most tokens / (gen_s + train_s): with a fraction f generating,
    throughput is min(f * G, (1 - f) * T) <= G * T / (G + T). Approximate: it uses the mean context
    of a running sequence for the decode rate."""
    c = scenario.cluster
    mean, _ = _moments(scenario.lengths, scenario.group_size)
    samples = scenario.batch_groups * scenario.group_size
    tokens = samples * (scenario.prompt_len + mean)
    seqs = c.max_seqs(1, scenario.tokens_per_running_seq(), scenario.group_size)
    gen_per_engine = seqs / c.decode_cost().step_s(seqs, 1, seqs * scenario.tokens_per_running_seq())
    gen_s = samples * mean / (gen_per_engine * c.max_engines)
    train_s = c.train_s(int(tokens), c.num_accelerators, tokens * scenario.trained_sq_per_token())
    return {"tokens_per_step": tokens, "gen_s": gen_s, "train_s": train_s,
            "overlap_ceiling_tokens_per_s": tokens / (gen_s + train_s)}


def arrangements(scenario: Scenario, mode: str, **overrides: Any) -> list[Arrangement]:
    """The first arrangements to try: colocated for a mode without overlap (k = 0), else the splits
    around the balanced one."""
    probe = mode_config(mode, scenario.batch_groups, scenario.group_size, scenario.group_size, **overrides)
    if probe.k == 0:
        return [Arrangement(True, scenario.cluster.max_engines)]
    guess = balanced_split(scenario, probe.max_live_versions or 1)
    rs = sorted({min(max(1, r), scenario.cluster.max_engines - 1) for r in (math.floor(guess), math.ceil(guess))})
    return [Arrangement(False, r) for r in rs]


@dataclass(slots=True)
class ModeSearch:
    best: ModeRun
    tried: list[ModeRun] = field(default_factory=list)


def best_arrangement(scenario: Scenario, mode: str, **overrides: Any) -> ModeSearch:
    """Each mode in its best arrangement: colocated if it does not overlap generation and training,
    else the best split, found by walking from the balanced guess while throughput improves
    (throughput is unimodal in the split: generation-bound on one side, training-bound on the other)."""
    tried = {a.rollout_engines: run_mode(scenario, mode, a, **overrides) for a in arrangements(scenario, mode, **overrides)}
    if not next(iter(tried.values())).arrangement.colocated:
        while True:
            best = max(tried, key=lambda r: tried[r].trained_tokens_per_s)
            nxt = [r for r in (best - 1, best + 1) if r not in tried and 1 <= r < scenario.cluster.max_engines]
            if not nxt:
                break
            for r in nxt:
                tried[r] = run_mode(scenario, mode, Arrangement(False, r), **overrides)
            if max(tried, key=lambda r: tried[r].trained_tokens_per_s) == best:
                break
    runs = sorted(tried.values(), key=lambda r: r.arrangement.rollout_engines)
    return ModeSearch(max(runs, key=lambda r: r.trained_tokens_per_s), runs)


def dora_paper(num_steps: int = 20, warmup_steps: int = 3, tp: int = 8) -> Scenario:
    """The DORA paper's setup (arXiv 2604.26256): 128 accelerators, a 32B dense model, DAPO-Math with
    a 30K maximum output.

    - Cluster: 128 H800 (the paper's group runs H800s), engines of TP8 (one node each, 16 engines),
      Qwen2.5-32B in bf16. `tp=4` (two engines per node, 32 engines; 16 GB of weights per 80 GB
      accelerator, 40 query and 8 KV heads split evenly) is a finer-grained arrangement the model
      also fits; every mode is then searched on it alike.
    - Measurement: 20 steps, the first 3 left out. A group's last sample often runs to the 30K cap
      (about one train step of decoding), so the pipeline breathes over several steps: over 7 measured
      steps the modes moved by up to 3% between 10- and 20-step runs.
    - Batch: DAPO's (arXiv 2503.14476, Sec. 4.1): 512 prompts per step, 16 responses each.
    - Lengths: assumption shaped like DAPO-Math training on a 32B model -- mean response length of a
      few thousand tokens growing over training, a long tail, and a visible share truncated at the
      cap: per-prompt lognormal difficulty (median 4,000 tokens, sigma 0.7) times a per-sample
      lognormal (sigma 0.7), plus 3% of samples that never stop (repetition) and hit 30K; the
      lognormal tail adds ~2% more at the cap. Not fitted to any speedup.
    - Prompts: 256 tokens (a math problem with its instruction).
    """
    return Scenario(
        name="dora_paper",
        description="128 x H800, Qwen2.5-32B, DAPO-Math-like lengths (30K cap), B=512 prompts x 16 samples",
        cluster=Cluster(H800, QWEN25_32B, num_accelerators=128, tp=tp, eff=Efficiency()),
        lengths=LengthModel(median_tokens=4000, prompt_sigma=0.7, sample_sigma=0.7, runaway_frac=0.03,
                            max_tokens=30_000, seed=0),
        batch_groups=512, group_size=16, prompt_len=256, num_steps=num_steps, warmup_steps=warmup_steps,
    )


@functools.lru_cache(maxsize=8)
def _moments(lengths: LengthModel, group_size: int) -> tuple[float, float]:
    return lengths.moments(group_size=group_size)


PRESETS = {"dora_paper": dora_paper}


# ---- calibration from a bench_e2e JSON of this machine ------------------------------------------

CALIBRATION_KEYS = {
    "num_engines": "engines generating in the overlapped (split) arrangement",
    "max_seqs_per_engine": "sequences one engine runs at once",
    "batch_groups": "B of the benchmark", "group_size": "n of the benchmark", "prompt_len": "prompt tokens",
    "decode_step_s": "{colocated|split: {weight_read_s, flop_s_per_seq, overhead_s, kv_read_s_per_token}}: one"
                     " engine's decode-step cost in each arrangement",
    "prefill_s_per_token": "{colocated|split: seconds}",
    "train_s_per_token": "{colocated|split: seconds per trained (prompt + response) token}",
    "weight_sync_s": "{colocated|split: seconds from publish to the version being live}",
    "response_lengths": "observed response lengths (the simulator resamples them per sample)",
}


@dataclass(slots=True)
class CalibratedWorkload:
    """A `SimWorkloadLike` whose costs were measured on this machine by tools/bench_e2e.py."""

    cost: DecodeCost
    train_s_per_token: float
    sync_s: float
    response_lengths: list[int]
    num_prompts: int
    num_engines: int
    prompt_len: int

    def length(self, prompt_id: int, group_id: int, sample_idx: int) -> int:
        rng = random.Random(hash((prompt_id, sample_idx)))
        return self.response_lengths[rng.randrange(len(self.response_lengths))]

    def decode_cost(self, engine_id: int) -> DecodeCost:
        return self.cost

    def step_time(self, step: int, tokens: int, tokens_sq: int) -> float:
        return self.train_s_per_token * tokens  # measured per token: attention is in the average

    def load_time(self, version: int) -> float:
        return self.sync_s

    def migrate_time(self, context_tokens: int) -> float:
        # Engines on one machine: a migration copies KV rows in memory (the tiny model's ~2 KB per
        # token at ~14 GiB/s: well under a millisecond for a group), nothing to measure.
        return 0.0


def _need(block: dict[str, Any], key: str, where: str) -> Any:
    if key not in block:
        raise ValueError(f"{where}: missing key {key!r} ({CALIBRATION_KEYS.get(key, 'required')})")
    return block[key]


def load_calibration(path: Path) -> dict[str, Any]:
    """Read and check the `calibration` block of a bench_e2e JSON (keys: `CALIBRATION_KEYS`)."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--calibrate {path}: cannot read a JSON report ({e})") from None
    where = f"--calibrate {path}"
    calib = _need(report, "calibration", where)
    for key in CALIBRATION_KEYS:
        _need(calib, key, f"{where} calibration")
    for key in ("decode_step_s", "prefill_s_per_token", "train_s_per_token", "weight_sync_s"):
        for arrangement in ("colocated", "split"):
            _need(calib[key], arrangement, f"{where} calibration.{key}")
    lengths = calib["response_lengths"]
    if not lengths or not all(isinstance(x, int) and x > 0 for x in lengths):
        raise ValueError(f"{where} calibration.response_lengths must be a non-empty list of positive ints")
    return report


def run_calibrated(report: dict[str, Any], mode: str, num_steps: int, warmup_steps: int) -> ModeRun:
    """Simulate `mode` with this machine's measured costs: synchronous colocated (both phases use
    the whole machine), every overlapping mode split."""
    c = report["calibration"]
    probe = mode_config(mode, c["batch_groups"], c["group_size"], c["max_seqs_per_engine"])
    key = "colocated" if probe.k == 0 else "split"
    step = c["decode_step_s"][key]
    try:
        cost = DecodeCost(weight_read_s=step.get("weight_read_s", 0.0), flop_s_per_seq=step.get("flop_s_per_seq", 0.0),
                          overhead_s=step.get("overhead_s", 0.0),
                          kv_read_s_per_token=step.get("kv_read_s_per_token", 0.0),
                          prefill_s_per_token=c["prefill_s_per_token"][key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"calibration.decode_step_s.{key}: {e}") from None
    workload = CalibratedWorkload(cost, c["train_s_per_token"][key], c["weight_sync_s"][key],
                                  list(c["response_lengths"]), c["batch_groups"] * (num_steps + probe.k + 4),
                                  c["num_engines"], c["prompt_len"])
    return run_workload(mode, probe, Arrangement(key == "colocated", c["num_engines"]), workload, num_steps,
                        warmup_steps)

"""The cluster-scale simulator: hand-computed makespans on tiny scenarios, the cost models' numbers,
and the direction in which scheduler settings (k, engines, versions per engine) move its output."""

import dataclasses
import json
import math

import pytest

from dora.rollout.cluster_sim import (H800, QWEN25_32B, Arrangement, Cluster, ClusterWorkload, DenseModel, Efficiency,
                                      LengthModel)
from dora.rollout.config import RolloutConfig
from dora.rollout.sim import DecodeCost, SimEngine, SimWorkload, _Seq, simulate
from dora.rollout.sim_runs import (Scenario, balanced_split, best_arrangement, load_calibration, mode_config,
                                   run_calibrated, run_mode)
from dora.types import PromptGroup


@dataclasses.dataclass
class FixedWorkload:
    """Lengths given per (prompt_id, sample_idx); one cost for every engine."""

    lengths: dict[tuple[int, int], int]
    num_prompts: int
    cost: DecodeCost
    train_s: float = 0.0
    train_s_per_token: float = 0.0
    load_s: float = 0.0
    num_engines: int = 1
    prompt_len: int = 4

    def length(self, prompt_id, group_id, sample_idx):
        return self.lengths[(prompt_id, sample_idx)]

    def decode_cost(self, engine_id):
        return self.cost

    def step_time(self, step, tokens, tokens_sq):
        return self.train_s + self.train_s_per_token * tokens

    def load_time(self, version):
        return self.load_s


def sync_config(B=1, n=2, max_seqs=8, **kw):
    return RolloutConfig(mode="synchronous", batch_groups=B, group_size=n, max_seqs_per_engine=max_seqs, **kw)


def test_synchronous_makespan_with_batch_dependent_decode():
    # Step time a + c*b (b running sequences). Prompt 0: lengths 10 and 30; prompt 1: 20 and 20.
    a, c, train, load = 0.01, 0.002, 3.0, 0.5
    w = FixedWorkload({(0, 0): 10, (0, 1): 30, (1, 0): 20, (1, 1): 20}, 2, DecodeCost(overhead_s=a, flop_s_per_seq=c),
                      train_s=train, load_s=load)
    result = simulate(sync_config(), w)
    gen0 = 10 * (a + 2 * c) + 20 * (a + c)  # both decode for 10 steps, then the longer one alone
    gen1 = 20 * (a + 2 * c)
    step0_end = load + gen0 + train
    assert result.steps[0].start == pytest.approx(load + gen0)
    assert result.steps[0].end == pytest.approx(step0_end)
    # Version 1 loads after the publish, then prompt 1 generates and trains.
    assert result.steps[1].end == pytest.approx(step0_end + load + gen1 + train)
    assert result.end_time == pytest.approx(result.steps[1].end + load)  # the last version still reaches the engine
    assert [s.tokens for s in result.steps] == [4 + 10 + 4 + 30, 4 + 20 + 4 + 20]


def test_synchronous_makespan_is_longest_generation_plus_training_per_step():
    # Constant step time: each step lasts its longest sample's length * step time + the train step.
    lengths = {(p, i): 5 + 7 * ((3 * p + i) % 5) for p in range(6) for i in range(2)}
    w = FixedWorkload(lengths, 6, DecodeCost(overhead_s=0.1), train_s_per_token=0.01, num_engines=3)
    result = simulate(sync_config(B=3, n=2, max_seqs=2), w)
    expected = 0.0
    for step in range(2):
        prompts = range(3 * step, 3 * step + 3)
        longest = max(lengths[(p, i)] for p in prompts for i in range(2))
        tokens = sum(4 + lengths[(p, i)] for p in prompts for i in range(2))
        expected += longest * 0.1 + tokens * 0.01
    assert result.end_time == pytest.approx(expected)


def test_context_growth_and_prefill_in_closed_form():
    # One sequence of L tokens after a P-token prompt: prefill P*f, then sum over steps of
    # base + kv*(P + progress) = L*(base + kv*P) + kv*L^2/2 (progress is continuous).
    base, kv, f, L, P, train = 0.02, 1e-4, 1e-3, 50, 8, 1.0
    w = FixedWorkload({(0, 0): L}, 1, DecodeCost(overhead_s=base, kv_read_s_per_token=kv, prefill_s_per_token=f),
                      train_s=train, prompt_len=P)
    result = simulate(sync_config(n=1), w)
    assert result.steps[0].start == pytest.approx(P * f + L * (base + kv * P) + kv * L * L / 2)


def test_engine_reads_weights_once_per_running_version():
    cost = DecodeCost(weight_read_s=1.0, flop_s_per_seq=0.1)
    assert cost.step_s(4, 1, 0) == 1.0 and cost.step_s(4, 2, 0) == 2.0 and cost.step_s(30, 1, 0) == 3.0
    eng = SimEngine(0, cost, max_seqs=8, max_versions=2, partial=False)
    group = PromptGroup(0, 0, [1], 2)
    eng.add(_Seq(group, 0, 0, 0, 10, 0.0, 0.0), 1)
    eng.add(_Seq(group, 1, 1, 1, 10, 0.0, 0.0), 1)
    assert eng.next_finish() == pytest.approx(10 * 2.0)  # both versions' weights every step


def test_k0_multi_version_equals_synchronous():
    w = SimWorkload(num_prompts=24, num_engines=3, tail_alpha=1.1, max_tokens=1000, step_time_s=2.0, seed=5)
    common = dict(batch_groups=4, group_size=2, max_seqs_per_engine=4)
    sync = simulate(RolloutConfig(mode="synchronous", **common), w)
    k0 = simulate(RolloutConfig(mode="multi_version", max_staleness=0, max_live_versions=1, **common), w)
    assert k0.consumed() == sync.consumed() and k0.end_time == pytest.approx(sync.end_time)


# ---- a small cluster: settings move the output in the expected direction --------------------------

SMALL_MODEL = DenseModel("dense-1B", params=1e9, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=64)


def small_scenario(num_accelerators=8, **kw):
    """Single-accelerator engines of a 1B model, 32 sequences each: 128 samples per step need
    several waves, and training takes about as long as generation on a half/half split."""
    values = dict(name="small", description="test",
                  cluster=Cluster(H800, SMALL_MODEL, num_accelerators, tp=1, eff=Efficiency(max_seqs_cap=32)),
                  lengths=LengthModel(median_tokens=300, prompt_sigma=0.5, sample_sigma=0.7, runaway_frac=0.05,
                                      max_tokens=4000),
                  batch_groups=32, group_size=4, prompt_len=32, num_steps=6, warmup_steps=2)
    values.update(kw)
    return Scenario(**values)


def test_more_engines_give_more_throughput():
    # No long tail: a step is several waves of groups, so engines shorten it.
    lengths = LengthModel(median_tokens=300, prompt_sigma=0.2, sample_sigma=0.2, runaway_frac=0.0, max_tokens=4000)
    runs = [run_mode(small_scenario(n, lengths=lengths), "sync", Arrangement(True, n)) for n in (2, 4, 8)]
    assert runs[0].trained_tokens_per_s < runs[1].trained_tokens_per_s < runs[2].trained_tokens_per_s
    assert runs[2].trained_tokens_per_s > 1.3 * runs[0].trained_tokens_per_s


def test_staleness_bound_buys_overlap():
    s = small_scenario()
    split = Arrangement(False, 4)
    k0 = run_mode(s, "dora_k1", split, max_staleness=0)
    k1 = run_mode(s, "dora_k1", split)
    k2 = run_mode(s, "dora_k2", split)
    assert k0.staleness_mean == 0 and 0 < k1.staleness_mean <= 1 < k2.staleness_mean <= 2
    assert k0.trained_tokens_per_s * 1.2 < k1.trained_tokens_per_s
    assert k1.trained_tokens_per_s * 1.1 < k2.trained_tokens_per_s
    assert k0.engine_idle_frac > k1.engine_idle_frac


def test_versions_per_engine_trade_drain_stalls_for_weight_reads():
    # A second live version lets an engine take new groups while old ones drain (less idle time),
    # but a decode step then reads both versions' weights: for a small model, decode is
    # weight-read-bound, so that costs more than the drain stalls it saves.
    s = small_scenario()
    one = run_mode(s, "dora_k2", Arrangement(False, 4), max_live_versions=1)
    two = run_mode(s, "dora_k2", Arrangement(False, 4))
    assert two.config.max_live_versions == 2 and one.config.max_live_versions == 1
    assert two.engine_idle_frac < one.engine_idle_frac
    assert two.trained_tokens_per_s < one.trained_tokens_per_s
    # With a step cost that does not depend on the versions in the batch, the second version is free.
    w = SimWorkload(num_prompts=96, num_engines=3, min_tokens=16, tail_alpha=1.1, max_tokens=2000, step_time_s=2.0,
                    load_s=0.1, seed=2)
    common = dict(mode="multi_version", max_staleness=2, batch_groups=8, group_size=4, max_seqs_per_engine=16)
    one = simulate(RolloutConfig(max_live_versions=1, **common), w)
    two = simulate(RolloutConfig(max_live_versions=2, **common), w)
    assert two.end_time < one.end_time


def test_migration_empties_draining_engines():
    # Single-version engines: without migration an engine moved to the newest version keeps its slots
    # for its last, longest samples; with it, they move to an engine still on that version.
    s = small_scenario()
    on = run_mode(s, "dora_k2", Arrangement(False, 4), max_live_versions=1)
    off = run_mode(s, "dora_k2", Arrangement(False, 4), max_live_versions=1, migrate=False)
    assert on.result.metrics.num_migrations > 0 and off.result.metrics.num_migrations == 0
    assert on.mean_batch > off.mean_batch  # slots that drained empty now hold moved samples
    # Every prompt trained once, on one version, within k, either way.
    for run in (on, off):
        assert all(v == m for step in run.result.steps for v, m in zip(step.versions, step.max_versions))
        assert all(step.step - v <= 2 for step in run.result.steps for v in step.versions)
    # Two versions per engine never drain before a switch: nothing to migrate.
    assert run_mode(s, "dora_k2", Arrangement(False, 4)).result.metrics.num_migrations == 0


def test_best_arrangement_searches_around_the_balanced_split():
    s = small_scenario(16)
    search = best_arrangement(s, "dora_k2")
    tried = [r.arrangement.rollout_engines for r in search.tried]
    assert math.floor(balanced_split(s)) in tried or math.ceil(balanced_split(s)) in tried
    assert search.best.trained_tokens_per_s == max(r.trained_tokens_per_s for r in search.tried)
    assert all(not r.arrangement.colocated for r in search.tried)
    assert best_arrangement(s, "sync").best.arrangement.colocated
    with pytest.raises(ValueError, match="colocated"):
        run_mode(s, "dora_k2", Arrangement(True, 16))


# ---- cost model numbers ----------------------------------------------------------------------------

def test_published_sizes_and_specs_give_the_expected_costs():
    assert QWEN25_32B.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2
    cluster = Cluster(H800, QWEN25_32B, 128, tp=8)
    cost = cluster.decode_cost()
    assert cost.weight_read_s == pytest.approx(65e9 / (8 * 3.35e12 * 0.8))
    assert cluster.train_s(10**6, 128) == pytest.approx(6 * 32.5e9 * 1e6 / (128 * 989.5e12 * 0.35))
    # Causal attention: 6 * layers * query heads * head_dim FLOPs per squared token (64 * 40 * 128).
    one_30k = cluster.train_s(30_000, 128, 30_000**2)
    assert one_30k == pytest.approx((6 * 32.5e9 * 3e4 + 6 * 64 * 40 * 128 * 9e8) / (128 * 989.5e12 * 0.35))
    assert one_30k / cluster.train_s(30_000, 128) == pytest.approx(1.30, abs=0.01)
    assert cluster.max_seqs(1, 7000, 16) % 16 == 0 and cluster.max_seqs(2, 7000, 16) < cluster.max_seqs(1, 7000, 16)
    with pytest.raises(ValueError, match="multiple of tp"):
        Cluster(H800, QWEN25_32B, 100, tp=8)
    lengths = LengthModel(4000, 0.7, 0.7, 0.03, 30_000)
    assert lengths.lengths(3, 16) == lengths.lengths(3, 16)
    assert max(x for p in range(200) for x in lengths.lengths(p, 16)) == 30_000
    w = ClusterWorkload(cluster, Arrangement(False, 10), lengths, num_prompts=4, prompt_len=256)
    assert w.step_time(0, 10**6, 10**9) == pytest.approx(cluster.train_s(10**6, 48, 10**9))


def test_modes_come_from_the_rollout_yaml():
    cfg = mode_config("dora_k2", 8, 4, 16)
    assert cfg.mode.value == "multi_version" and cfg.k == 2 and cfg.max_live_versions == 2
    assert mode_config("one_step_off", 8, 4, 16).waves and mode_config("partial_rollout", 8, 4, 16).partial
    with pytest.raises(ValueError, match="unknown mode"):
        mode_config("dora_k9", 8, 4, 16)


# ---- calibration -----------------------------------------------------------------------------------

def calibration_report():
    step = {"overhead_s": 0.004, "flop_s_per_seq": 0.0005}
    return {"modes": {"sync": {"trained_tokens_per_s": 100.0}},
            "calibration": {"num_engines": 1, "max_seqs_per_engine": 16, "batch_groups": 4, "group_size": 4,
                            "prompt_len": 12, "decode_step_s": {"colocated": step, "split": step},
                            "prefill_s_per_token": {"colocated": 1e-4, "split": 2e-4},
                            "train_s_per_token": {"colocated": 1e-3, "split": 2e-3},
                            "weight_sync_s": {"colocated": 0.01, "split": 0.02},
                            "response_lengths": [10, 20, 40, 300]}}


def test_calibrated_run_and_missing_keys(tmp_path):
    path = tmp_path / "bench.json"
    report = calibration_report()
    path.write_text(json.dumps(report))
    loaded = load_calibration(path)
    sync = run_calibrated(loaded, "sync", 5, 2)
    k2 = run_calibrated(loaded, "dora_k2", 5, 2)
    assert sync.arrangement.colocated and not k2.arrangement.colocated
    assert sync.trained_tokens_per_s > 0 and k2.trained_tokens_per_s > 0
    del report["calibration"]["train_s_per_token"]["split"]
    path.write_text(json.dumps(report))
    with pytest.raises(ValueError, match="train_s_per_token.*'split'"):
        load_calibration(path)
    path.write_text(json.dumps({"modes": {}}))
    with pytest.raises(ValueError, match="'calibration'"):
        load_calibration(path)


def test_decode_step_never_beats_the_weight_read_floor():
    # A 32B dense model in bf16 on TP8 H800: each step reads the 65 GB of weights over 8 x 3.35 TB/s
    # (at the stated HBM efficiency), whatever the batch; compute only takes over past ~220 sequences.
    cluster = Cluster(H800, QWEN25_32B, 128, tp=8)
    cost = cluster.decode_cost()
    floor = QWEN25_32B.weight_bytes / (8 * H800.hbm_bytes_per_s * Efficiency().hbm)
    assert floor == pytest.approx(3.03e-3, rel=0.01)
    for batch in (1, 2, 16, 64, 200):
        assert cost.step_s(batch, 1, 0) == pytest.approx(floor + cost.overhead_s)
    assert cost.step_s(1, 1, 30_000) >= floor + 30_000 * QWEN25_32B.kv_bytes_per_token / (8 * H800.hbm_bytes_per_s)
    assert cost.step_s(256, 1, 0) > floor + cost.overhead_s  # compute-bound


def test_train_step_pays_attention_on_each_sequence():
    # Two trajectories of 4 + 10 and 4 + 30 tokens: the workload sees 48 tokens and 14^2 + 34^2.
    seen = []

    class Recording(FixedWorkload):
        def step_time(self, step, tokens, tokens_sq):
            seen.append((tokens, tokens_sq))
            return 1.0

    w = Recording({(0, 0): 10, (0, 1): 30}, 1, DecodeCost(overhead_s=0.01))
    simulate(sync_config(), w)
    assert seen == [(48, 14 * 14 + 34 * 34)]


def test_one_step_off_engines_switch_together_after_the_wave():
    # Two engines, one group each, 1 s per token, train 1 s, instant loads. Wave 0 = prompt 0 (2 tokens,
    # engine 0) and prompt 1 (10 tokens, engine 1). Step 0 trains prompt 0 at t=2..3 and publishes v1,
    # which admits prompt 2. Engine 0 has been idle since t=2, but one-step-off updates all engines
    # together once the wave in flight is done: prompt 2 starts at t=10, not t=3 (that would be DORA's
    # per-engine rebalancing).
    lengths = {(0, 0): 2, (0, 1): 2, (1, 0): 10, (1, 1): 10, (2, 0): 1, (2, 1): 1}
    w = FixedWorkload(lengths, 3, DecodeCost(overhead_s=1.0), train_s=1.0, num_engines=2)
    result = simulate(RolloutConfig(mode="one_step_off", batch_groups=1, group_size=2, max_seqs_per_engine=2), w)
    starts = {prompt: t for t, _, prompt, _, _ in result.submits}
    assert starts == {0: 0.0, 1: 0.0, 2: pytest.approx(10.0)}
    assert [(s.start, s.end) for s in result.steps] == [(2.0, 3.0), (10.0, 11.0), (11.0, 12.0)]
    assert max(len(v) for _, v in result.metrics.live_versions) == 1

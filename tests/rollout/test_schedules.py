"""Property tests: the scheduler core (controller + pool + buffer) on random simulated schedules.

Every schedule runs to completion on a simulated clock (`dora.rollout.sim`); the assertions are the
constraints of DESIGN.md: every prompt trained exactly once, one version per trajectory (except the
labelled partial-rollout baseline), step - version <= k, at most (k + 1) * B groups in flight, no
deadlock, and k = 0 reproducing the synchronous schedule exactly.
"""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dora.rollout.config import RolloutConfig
from dora.rollout.sim import SimResult, SimWorkload, simulate


@st.composite
def schedules(draw, k=None):
    mode = draw(st.sampled_from(["multi_version", "multi_version", "synchronous", "one_step_off", "partial_rollout"]))
    B = draw(st.integers(1, 4))
    n = draw(st.integers(1, 4))
    kwargs = dict(mode=mode, batch_groups=B, group_size=n,
                  on_stale=draw(st.sampled_from(["wait", "regenerate"])),
                  max_regenerations=draw(st.integers(0, 2)),
                  max_seqs_per_engine=n * draw(st.integers(1, 3)) + draw(st.integers(0, n - 1)),
                  group_placement=draw(st.sampled_from(["whole", "split"])),
                  fill_older_versions=draw(st.booleans()))
    if mode != "synchronous":
        kwargs["max_staleness"] = draw(st.integers(0, 4)) if k is None else k
    elif k not in (None, 0):
        kwargs["mode"] = "multi_version"
        kwargs["max_staleness"] = k
    if kwargs["mode"] == "multi_version":
        kwargs["max_live_versions"] = draw(st.integers(1, 3))
        kwargs["migrate"] = draw(st.booleans())
    config = RolloutConfig(**kwargs)
    workload = SimWorkload(
        num_prompts=draw(st.integers(1, 10)) * B + draw(st.integers(0, B - 1)),
        num_engines=draw(st.integers(1, 4)),
        engine_speeds=tuple(draw(st.lists(st.sampled_from([20.0, 50.0, 100.0, 400.0]), min_size=1, max_size=3))),
        min_tokens=draw(st.sampled_from([1, 8, 32])),
        tail_alpha=draw(st.sampled_from([0.7, 1.1, 2.0, 5.0])),
        max_tokens=draw(st.sampled_from([64, 512, 4096])),
        step_time_s=draw(st.sampled_from([0.01, 0.3, 2.0, 10.0])),
        migrate_s=draw(st.sampled_from([0.0, 0.01, 1.0])),
        step_jitter=draw(st.sampled_from([0.0, 1.0])),
        load_s=draw(st.sampled_from([0.0, 0.05, 1.0])),
        seed=draw(st.integers(0, 2**16)),
    )
    return config, workload


def check_constraints(config: RolloutConfig, workload: SimWorkload, result: SimResult, *, restarts: bool = False):
    k, B = config.k, config.batch_groups
    consumed = [p for s in result.steps for p in s.prompt_ids]
    assert sorted(consumed) == list(range(workload.num_prompts)), "a prompt was lost or trained twice"
    assert [s.step for s in result.steps] == list(range(len(result.steps)))
    assert all(len(s.prompt_ids) == B for s in result.steps[:-1]) and 1 <= len(result.steps[-1].prompt_ids) <= B
    for s in result.steps:
        for version, max_version in zip(s.versions, s.max_versions):
            assert 0 <= s.step - version <= k, f"step {s.step} trained version {version} with k={k}"
            if not config.partial:
                assert max_version == version, "a trajectory mixed versions"
    assert result.max_in_flight <= (k + 1) * B
    assert max(result.metrics.staleness, default=0) <= k
    admissions = Counter(prompt for prompt, _ in {(p, g) for _, g, p, _, _ in result.submits})
    assert sum(admissions.values()) - workload.num_prompts == (result.metrics.num_regenerations
                                                               + result.metrics.num_restarts)
    if not restarts:
        assert max(admissions.values()) - 1 <= config.max_regenerations


@given(schedules())
def test_random_schedules_keep_the_invariants(case):
    config, workload = case
    result = simulate(config, workload)
    check_constraints(config, workload, result)
    # The pool's idle accounting agrees with the engines' own.
    assert result.pool_idle_s == pytest.approx(result.engine_idle_s, abs=1e-6)


def synchronous_reference(num_prompts: int, B: int) -> list[tuple[int, list[int]]]:
    """Synchronous RL written out directly: step s generates the next B prompts with version s and
    trains on them; nothing is generated while a step trains."""
    prompts = list(range(num_prompts))
    return [(s, prompts[s * B:(s + 1) * B]) for s in range((num_prompts + B - 1) // B)]


@given(schedules(k=0))
def test_k0_is_exactly_synchronous(case):
    config, workload = case
    result = simulate(config, workload)
    check_constraints(config, workload, result)
    assert result.consumed() == synchronous_reference(workload.num_prompts, config.batch_groups)
    assert all(v == s.step for s in result.steps for v in s.versions)
    for t, *_ in result.submits:
        assert not any(s.start <= t < s.end for s in result.steps), f"group submitted at {t} while a step ran"
    assert result.metrics.num_regenerations == 0


@given(schedules(), st.integers(1, 8))
def test_save_restore_mid_run(case, at):
    """Restoring from a checkpoint taken after version `at` is published consumes exactly what the
    uninterrupted run does when all engines restart at that moment: the same prompt_ids at the same
    steps, on the same versions (running groups regenerated first in line in both)."""
    config, workload = case
    at = 1 + at % max(1, (workload.num_prompts + config.batch_groups - 1) // config.batch_groups)
    restarted = simulate(config, workload, crash_at_step=at)
    restored = simulate(config, workload, restore_at_step=at)
    check_constraints(config, workload, restarted, restarts=True)
    check_constraints(config, workload, restored, restarts=True)
    assert restored.consumed() == restarted.consumed()
    assert [s.versions for s in restored.steps] == [s.versions for s in restarted.steps]
    assert [s.group_ids for s in restored.steps] == [s.group_ids for s in restarted.steps]
    uninterrupted = simulate(config, workload)
    assert restored.consumed()[:at] == uninterrupted.consumed()[:at]


def test_long_tail_multi_version_keeps_engines_busiest():
    """One long-tail workload, three baselines, idle fractions compared on the simulated clock."""
    workload = SimWorkload(num_prompts=256, num_engines=4, engine_speeds=(100.0,), min_tokens=32, tail_alpha=1.1,
                           max_tokens=4096, step_time_s=2.0, load_s=0.1, seed=3)
    common = dict(batch_groups=8, group_size=4, max_seqs_per_engine=32)
    runs = {mode: simulate(RolloutConfig(mode=mode, **common), workload)
            for mode in ("multi_version", "one_step_off", "synchronous")}
    idle = {mode: r.idle_fraction for mode, r in runs.items()}
    assert idle["multi_version"] < idle["one_step_off"] < idle["synchronous"], idle
    assert runs["multi_version"].end_time < runs["one_step_off"].end_time < runs["synchronous"].end_time

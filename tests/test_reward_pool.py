"""RewardPool: inline verifiers, killable worker processes with timeouts, failure records with
sample ids, async API, clean shutdown."""

import asyncio
import multiprocessing

import pytest
import torch

from dora.data.tokenizer import CharTokenizer
from dora.rewards.pool import FailureKind, RewardConfig, RewardExecution, RewardPool
from dora.types import FinishReason, PromptGroup, Trajectory

TOK = CharTokenizer()
FIXTURE = "reward_fixtures:misbehaving"


def make(group_id, responses, answer="ok", meta=None):
    group = PromptGroup(group_id=group_id, prompt_id=100 + group_id, prompt_ids=[1, 5], num_samples=len(responses),
                        answer=answer, meta=meta or {})
    trajs = [
        Trajectory(group_id=group_id, sample_idx=i, prompt_id=group.prompt_id, prompt_ids=[1, 5],
                   response_ids=[*TOK.encode(text), TOK.eos_token_id], behavior_logprobs=torch.zeros(len(text) + 1),
                   version=0, min_version=0, max_version=0, finish_reason=FinishReason.STOP)
        for i, text in enumerate(responses)
    ]
    return group, trajs


def no_leaked_workers():
    return not [p for p in multiprocessing.active_children() if p.name == "dora-reward-worker"]


def test_inline_synthetic_reward():
    group, trajs = make(0, ["7+5=12,4+8+1=13,3+0+1=4|432", "1+1=2|433", "garbage"], answer="432",
                        meta={"task": "arithmetic", "op": "+", "a": 347, "b": 85})
    with RewardPool(RewardConfig(options={"partial_credit": 0.2}), TOK) as pool:
        assert pool.inline
        pool.score(trajs, group)
        assert [t.reward for t in trajs][0] == 1.0 and 0 < trajs[1].reward <= 0.2 and trajs[2].reward == 0.0
        assert trajs[0].reward_info["result"] == "432"
        assert pool.stats().num_calls == 3


def test_inline_failures_are_recorded():
    group, trajs = make(3, ["x"], meta={"task": "chess"})
    with RewardPool(RewardConfig(name="synthetic", failure_value=-1.0), TOK) as pool:
        pool.score(trajs, [group])
    assert trajs[0].reward == -1.0 and trajs[0].reward_info["failure"] == "exception"
    assert pool.failures[0].kind is FailureKind.EXCEPTION and pool.failures[0].group_id == 3


def test_hung_rewards_do_not_starve_a_healthy_one():
    config = RewardConfig(name=FIXTURE, max_workers=2, timeout_s=1.0, failure_value=-1.0)
    hung_group, hung = make(1, ["hang"] * 3)  # max_workers + 1 hung rewards, queued first
    ok_group, ok = make(2, ["ok"])
    with RewardPool(config, TOK) as pool:
        assert not pool.inline
        pool.score(hung + ok, [hung_group, ok_group])
        stats = pool.stats()
    assert ok[0].reward == 1.0 and ok[0].reward_info == {}
    assert [t.reward for t in hung] == [-1.0] * 3
    assert all(t.reward_info["failure"] == "timeout" for t in hung)
    assert {(f.group_id, f.sample_idx, f.kind) for f in pool.failures} == {(1, i, FailureKind.TIMEOUT) for i in range(3)}
    assert stats.num_failures["timeout"] == 3 and stats.num_calls == 4 and stats.num_workers_killed == 3
    assert no_leaked_workers()


def test_raising_dying_and_invalid_rewards_are_recorded_with_sample_ids():
    group, trajs = make(7, ["ok", "boom", "die", "nan", "meh"])
    with RewardPool(RewardConfig(name=FIXTURE, max_workers=1, timeout_s=5.0, failure_value=0.0), TOK) as pool:
        pool.score(trajs, {7: group})
        stats = pool.stats()
    assert [t.reward for t in trajs] == [1.0, 0.0, 0.0, 0.0, 0.5]
    kinds = {(f.group_id, f.sample_idx): f.kind for f in pool.failures}
    assert kinds == {(7, 1): FailureKind.EXCEPTION, (7, 2): FailureKind.CRASH, (7, 3): FailureKind.INVALID}
    assert "RuntimeError: cannot score 'boom'" in trajs[1].reward_info["error"]
    assert stats.num_failures == {"exception": 1, "timeout": 0, "invalid": 1, "crash": 1}
    assert stats.mean_latency_s > 0
    assert no_leaked_workers()


def test_score_async_from_an_event_loop():
    groups, trajs = zip(*(make(g, ["ok", "no"]) for g in range(3)))
    config = RewardConfig(name=FIXTURE, execution=RewardExecution.pool, max_workers=2, timeout_s=5.0)

    async def main(pool):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(pool.score_async(t, g) for t, g in zip(trajs, groups)))
        task.cancel()
        return results, ticks

    with RewardPool(config, TOK) as pool:
        results, ticks = asyncio.run(main(pool))
    assert [[t.reward for t in r] for r in results] == [[1.0, 0.5]] * 3
    assert ticks > 0  # the loop kept running while the workers scored
    assert no_leaked_workers()


def test_close_is_idempotent_and_rejects_later_calls():
    pool = RewardPool(RewardConfig(name=FIXTURE, max_workers=1, timeout_s=5.0), TOK)
    group, trajs = make(0, ["ok"])
    pool.score(trajs, group)
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(trajs, group)
    assert no_leaked_workers()


def test_bad_config_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown reward 'nope'; registered: arithmetic, countdown, exact_match, math"):
        RewardPool(RewardConfig(name="nope"), TOK)
    with pytest.raises(ValueError, match="reward.execution"):
        RewardConfig(execution="sometimes")
    with pytest.raises(ValueError, match="reward.timeout_s"):
        RewardConfig(timeout_s=0)
    with pytest.raises(ValueError, match="reward.start_method"):
        RewardConfig(start_method="fork")
    group, trajs = make(0, ["ok"])
    with RewardPool(RewardConfig(name="exact_match"), TOK) as pool:
        with pytest.raises(ValueError, match="group 0, sample 0"):
            pool.score(trajs, [])


def test_workers_that_cannot_start_fail_the_calls_not_the_run(monkeypatch):
    monkeypatch.setenv("DORA_TEST_PARENT_PID", str(__import__("os").getpid()))
    group, trajs = make(4, ["a", "b", "c"])
    with RewardPool(RewardConfig(name="reward_fixtures_parent_only:constant", max_workers=2, failure_value=-2.0), TOK) as pool:
        pool.score(trajs, group)
    assert [t.reward for t in trajs] == [-2.0] * 3
    assert all("could not start (exit code 1)" in t.reward_info["error"] for t in trajs)
    assert pool.stats().num_failures["crash"] == 3
    assert no_leaked_workers()


def test_config_composes_with_omegaconf():
    from omegaconf import OmegaConf

    node = OmegaConf.structured(RewardConfig)
    node.execution = "pool"  # how a YAML file or a command-line override spells it
    node.options = {"partial_credit": 0.1}
    config = OmegaConf.to_object(node)
    assert config.execution is RewardExecution.pool and config.options == {"partial_credit": 0.1}
    node.max_workers = 0
    with pytest.raises(ValueError, match="reward.max_workers"):
        OmegaConf.to_object(node)

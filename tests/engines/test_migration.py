"""Request migration between torch engines: a group taken out of one engine mid-generation and put
into another one goes on exactly as if it had stayed (same tokens, log-probs, routing record)."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from dora.engines.scheduler import MigratingGroup
from dora.types import FinishReason, PromptGroup, SamplingParams, Trajectory

from test_torch_engine import ATOL, check_against, make_engine, models, one_thread, prompts, run  # noqa: F401

SAMPLING = SamplingParams(max_new_tokens=24, temperature=1.0, seed=77)


def group(group_id: int = 3, num_samples: int = 3, seed: int = 8) -> PromptGroup:
    return PromptGroup(group_id=group_id, prompt_id=group_id, prompt_ids=prompts(1, seed=seed)[0],
                       num_samples=num_samples)


def assert_same(got: list[Trajectory], ref: list[Trajectory]) -> None:
    got = sorted(got, key=lambda t: t.sample_idx)
    assert [(t.sample_idx, t.response_ids, t.finish_reason) for t in got] == \
        [(t.sample_idx, t.response_ids, t.finish_reason) for t in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.behavior_logprobs, b.behavior_logprobs, atol=ATOL, rtol=0)
        assert torch.equal(a.routing, b.routing)


def reference(model, g: PromptGroup) -> list[Trajectory]:
    engine = make_engine(model)
    engine.submit(g, 0, SAMPLING)
    return run(engine)


@pytest.mark.parametrize("steps_before", [0, 1, 3, 9])
def test_migrated_group_finishes_as_if_it_had_stayed(models, steps_before):
    """0 steps: not admitted yet; 1: prompt prefilled in chunks (24-token budget); later: decoding."""
    g = group()
    ref = reference(models[0], g)
    src, dst = make_engine(models[0], max_num_batched_tokens=8), make_engine(models[0])
    src.submit(g, 0, SAMPLING)
    done = [t for _ in range(steps_before) for t in src.step()]
    moving = src.export_group(g.group_id)
    assert moving is not None and moving.num_samples == g.num_samples - len(done)
    assert not src.has_work() and src.stats().running_per_version == {}
    src.drop_version(0)  # nothing of version 0 is left on the source
    dst.import_group(pickle.loads(pickle.dumps(moving)))  # what crosses a process boundary
    got = done + run(dst)
    assert_same(got, ref)
    for t in got:
        check_against(models[0], t)
    assert src.export_group(g.group_id) is None


def test_some_samples_finished_before_the_move(models):
    g = group(num_samples=4)
    sampling = SamplingParams(max_new_tokens=24, temperature=1.0, seed=77, stop_token_ids=list(range(0, 128, 8)))
    ref_engine = make_engine(models[0])
    ref_engine.submit(g, 0, sampling)
    ref = run(ref_engine)
    lengths = sorted(len(t.response_ids) for t in ref)
    assert lengths[0] < lengths[-1], "the case needs samples of different lengths"
    src, dst = make_engine(models[0]), make_engine(models[0])
    src.submit(g, 0, sampling)
    done: list[Trajectory] = []
    while not done:
        done += src.step()
    moving = src.export_group(g.group_id)
    assert moving is not None and moving.num_samples == 4 - len(done) > 0
    dst.import_group(moving)
    assert_same(done + run(dst), ref)


def test_arrivals_wait_for_free_slots_and_abort_cleanly(models):
    g = group(num_samples=3)
    ref = reference(models[0], g)
    src = make_engine(models[0])
    src.submit(g, 0, SAMPLING)
    for _ in range(4):
        assert not src.step()
    moving = src.export_group(g.group_id)
    dst = make_engine(models[0], max_num_seqs=4)
    dst.submit(PromptGroup(group_id=50, prompt_id=50, prompt_ids=[1, 2, 3], num_samples=2), 0,
               SamplingParams(max_new_tokens=5, seed=1))
    dst.step()  # group 50 holds 2 of the 4 slots: the 3 arriving samples wait for them
    dst.import_group(moving)
    dst.step()
    assert dst.stats().running_per_version == {0: 5}  # 2 decoding, 3 waiting for slots
    out = run(dst)
    assert_same([t for t in out if t.group_id == g.group_id], ref)
    # Aborted while waiting for slots: the samples come back as ABORT records, nothing is left behind.
    again = make_engine(models[0], max_num_seqs=4)
    again.submit(PromptGroup(group_id=50, prompt_id=50, prompt_ids=[1, 2, 3], num_samples=2), 0,
                 SamplingParams(max_new_tokens=5, seed=1))
    again.step()
    src2 = make_engine(models[0])
    src2.submit(g, 0, SAMPLING)
    for _ in range(4):
        src2.step()
    again.import_group(src2.export_group(g.group_id))
    again.abort(g.group_id)
    aborted = [t for t in run(again) if t.group_id == g.group_id]
    assert [t.finish_reason for t in aborted] == [FinishReason.ABORT] * 3
    again.drop_version(0)


def test_import_checks_the_version_and_the_group(models):
    src, dst = make_engine(models[0]), make_engine(models[1], version=1)
    src.submit(group(), 0, SAMPLING)
    src.step()
    moving = src.export_group(3)
    assert isinstance(moving, MigratingGroup)
    with pytest.raises(ValueError, match=r"group 3 \(prompt 3\): migrated on version 0, which is not live on engine 0"):
        dst.import_group(moving)
    same = make_engine(models[0])
    same.submit(group(), 0, SAMPLING)
    with pytest.raises(ValueError, match="already running"):
        same.import_group(moving)


def test_export_with_the_background_worker(models):
    g = group(num_samples=2)
    ref = reference(models[0], g)
    src, dst = make_engine(models[0]), make_engine(models[0])

    async def main() -> list[Trajectory]:
        src.start()
        dst.start()
        try:
            src.submit(g, 0, SAMPLING)
            moving = await asyncio.to_thread(src.export_group, g.group_id)
            if moving is not None:
                dst.import_group(moving)
            got: list[Trajectory] = []

            async def read(engine) -> None:
                async for t in engine.finished():
                    got.append(t)

            readers = [asyncio.ensure_future(read(e)) for e in (src, dst)]
            while len(got) < 2:
                await asyncio.sleep(0.01)
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            return got
        finally:
            src.close()
            dst.close()

    got = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert_same(got, ref)

"""The vLLM engine against dora's torch engine on the same model folder (`make test-vllm`; skipped
where vLLM is not installed). One vLLM engine serves the module: starting one costs ~10-20 s here."""

import asyncio
import json
import uuid

import pytest
import torch

from dora.engines.config import EngineConfig
from dora.engines.torch_engine import TorchEngine
from dora.models.config import ModelConfig
from dora.models.io import save_model
from dora.models.model import DecoderLM
from dora.sync import SyncConfig, build_channel
from dora.types import FinishReason, PromptGroup, SamplingParams

pytestmark = pytest.mark.vllm

CFG = ModelConfig.tiny()
ENGINE = dict(max_model_len=128, max_num_seqs=16, max_num_batched_tokens=128)
PROMPTS = [[1, 2, 3, 4], [9, 8, 7], [5, 50, 17, 60, 11, 2], [120, 3]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(5,))


def _model(seed: int) -> DecoderLM:
    return DecoderLM.from_config(CFG, seed=seed).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_moe")
    save_model(_model(0), path)
    return path


@pytest.fixture(scope="module")
def engine(folder):
    from dora.engines.vllm_engine import VllmEngine

    eng = VllmEngine(folder, EngineConfig(kind="vllm", max_live_versions=1, **ENGINE))
    eng.add_version(0, _model(0).state_dict())
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


_next_group = iter(range(10**6))


def _run(engine, loop, version, sampling, prompts=PROMPTS, num_samples=1):
    groups = [PromptGroup(group_id=next(_next_group), prompt_id=i, prompt_ids=p, num_samples=num_samples)
              for i, p in enumerate(prompts)]
    for g in groups:
        engine.submit(g, version, sampling)
    return _collect(engine, loop, len(groups) * num_samples)


def _collect(engine, loop, count):
    async def take():
        out = []
        async for traj in engine.finished():
            out.append(traj)
            if len(out) == count:
                return sorted(out, key=lambda t: (t.prompt_id, t.sample_idx))
    return loop.run_until_complete(asyncio.wait_for(take(), 120))


def _torch_greedy(model, sampling=GREEDY):
    engine = TorchEngine(CFG, EngineConfig(**ENGINE))
    engine.add_version(0, model.state_dict())
    for i, p in enumerate(PROMPTS):
        engine.submit(PromptGroup(group_id=i, prompt_id=i, prompt_ids=p), 0, sampling)
    out = []
    while len(out) < len(PROMPTS):
        out += engine.step()
    return sorted(out, key=lambda t: t.prompt_id)


def test_greedy_tokens_and_logprobs_equal_the_torch_engine(engine, loop):
    ours = _run(engine, loop, 0, GREEDY)
    ref = _torch_greedy(_model(0))
    assert [t.response_ids for t in ours] == [t.response_ids for t in ref]
    assert [t.finish_reason for t in ours] == [t.finish_reason for t in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.behavior_logprobs, b.behavior_logprobs, atol=1e-4, rtol=0)
        assert a.version == a.min_version == a.max_version == 0


def test_sampled_logprobs_are_the_sampling_distribution(engine, loop):
    """Behavior log-probs = log_softmax(logits / T) of the sampled token (dora's convention), checked
    by scoring the sampled tokens with dora's model; per-sample seeds make groups reproducible."""
    sampling = SamplingParams(max_new_tokens=16, temperature=0.7, seed=11)
    first = _run(engine, loop, 0, sampling, num_samples=2)
    again = _run(engine, loop, 0, sampling, num_samples=2)
    assert [t.response_ids for t in first] == [t.response_ids for t in again]
    assert first[0].response_ids != first[1].response_ids, "samples of a group must differ (seed + i)"
    model = _model(0)
    for traj in first:
        ids = torch.tensor([traj.prompt_ids + traj.response_ids])
        with torch.no_grad():
            logits = model(ids).logits_BSV[0, len(traj.prompt_ids) - 1:-1] / sampling.temperature
        expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(traj.prompt_ids):, None])[:, 0]
        torch.testing.assert_close(traj.behavior_logprobs, expected, atol=1e-4, rtol=0)


def test_abort_returns_every_sample(engine, loop):
    group = PromptGroup(group_id=next(_next_group), prompt_id=0, prompt_ids=[1, 2, 3], num_samples=3)
    engine.submit(group, 0, SamplingParams(max_new_tokens=100, temperature=1.0, seed=3))
    engine.abort(group.group_id)
    out = _collect(engine, loop, 3)
    assert [t.sample_idx for t in out] == [0, 1, 2]
    assert all(t.finish_reason is FinishReason.ABORT and t.num_tokens < 100 for t in out)
    assert engine.stats().running_per_version == {}


def test_routing_record_is_reported_honestly(engine, loop):
    caps = engine.stats().capabilities
    traj = _run(engine, loop, 0, GREEDY, prompts=PROMPTS[:1])[0]
    if caps["routing_record"]:
        assert traj.routing is not None
        assert tuple(traj.routing.shape) == (len(traj.prompt_ids) + traj.num_tokens - 1, CFG.num_hidden_layers,
                                             CFG.num_experts_per_tok)
    else:
        assert traj.routing is None and engine.routing_note


def test_update_through_a_sync_channel_serves_the_new_weights(engine, loop):
    """Version 1 crosses the shm channel like a trainer's publish; the engine then generates exactly
    what the torch engine generates with those weights (and not what version 0 generated)."""
    new = _model(1)
    config = SyncConfig(channel="shm", name=f"dora-test-{uuid.uuid4().hex[:8]}")
    writer, reader = build_channel(config, "writer"), build_channel(config, "reader")
    try:
        writer.publish(1, new.state_dict())
        received = reader.receive(timeout=30)
        assert received is not None and received.version == 1
        before = _run(engine, loop, 0, GREEDY)
        engine.drop_version(0)
        engine.add_version(1, received.weights)
        reader.release(1)
    finally:
        reader.close()
        writer.close()
    after = _run(engine, loop, 1, GREEDY)
    ref = _torch_greedy(new)
    assert [t.response_ids for t in after] == [t.response_ids for t in ref]
    assert [t.response_ids for t in after] != [t.response_ids for t in before]
    assert all(t.version == 1 for t in after)
    engine.add_version(0, _model(0).state_dict())  # back to version 0 for the other tests
    assert engine.live_versions == [0]


def test_no_update_under_running_requests(engine, loop):
    """A request running when an update is attempted finishes on the weights it started with."""
    group = PromptGroup(group_id=next(_next_group), prompt_id=0, prompt_ids=PROMPTS[0])
    engine.submit(group, 0, SamplingParams(max_new_tokens=64, temperature=0.0))
    with pytest.raises(RuntimeError, match="drain it first"):
        engine.add_version(1, _model(1).state_dict())
    with pytest.raises(RuntimeError, match="still run"):
        engine.drop_version(0)
    traj = _collect(engine, loop, 1)[0]
    ref = _torch_greedy(_model(0), SamplingParams(max_new_tokens=64, temperature=0.0))[0]
    assert traj.response_ids == ref.response_ids and traj.version == 0
    assert engine.live_versions == [0]


def test_bad_update_fails_clearly_and_keeps_the_previous_version(engine, loop):
    before = _run(engine, loop, 0, GREEDY)
    weights = _model(1).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = weights[name][:, :-1]
    with pytest.raises(ValueError, match="q_proj"):
        engine.add_version(1, weights)
    del weights[name]
    with pytest.raises(ValueError, match="q_proj"):
        engine.add_version(1, weights)
    assert engine.live_versions == [0]
    assert [t.response_ids for t in _run(engine, loop, 0, GREEDY)] == [t.response_ids for t in before]
    with pytest.raises(ValueError, match="not live"):
        engine.submit(PromptGroup(group_id=next(_next_group), prompt_id=0, prompt_ids=[1]), 1, GREEDY)


def test_a_folder_vllm_cannot_load_is_a_clear_error(tmp_path):
    from dora.engines.vllm_engine import VllmEngine

    save_model(_model(0), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(RuntimeError, match=str(tmp_path)):
        VllmEngine(tmp_path, EngineConfig(kind="vllm", max_live_versions=1, **ENGINE), model_config=CFG)

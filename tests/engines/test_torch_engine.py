"""The torch engine against the trainer's model (`DecoderLM` full forward) as the reference.

Tolerances: fp32 on CPU; the engine's incremental (KV-cache, packed, chunked) computation and the
full forward sum in different orders, so log-probs agree to 1e-4, not bit for bit. Routing ids and
greedy tokens agree exactly.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from dora.engines import ENGINES
from dora.engines.base import Engine
from dora.engines.config import EngineConfig
from dora.engines.torch_engine import TorchEngine
from dora.models.config import ModelConfig
from dora.models.model import DecoderLM
from dora.types import FinishReason, PromptGroup, SamplingParams, Trajectory

ATOL = 1e-4
CFG = ModelConfig.tiny()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and it keeps the suite steady on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models() -> tuple[DecoderLM, DecoderLM]:
    return DecoderLM.from_config(CFG, seed=1).eval(), DecoderLM.from_config(CFG, seed=2).eval()


def make_engine(model: DecoderLM | None = None, version: int = 0, **overrides) -> TorchEngine:
    kwargs = dict(max_num_seqs=8, max_model_len=96, max_num_batched_tokens=24, seed=0)
    engine = TorchEngine(CFG, EngineConfig(**{**kwargs, **overrides}))
    if model is not None:
        engine.add_version(version, model.state_dict())
    return engine


def prompts(count: int, seed: int = 0, lengths=(5, 17)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        out.append(torch.randint(0, CFG.vocab_size, (n,), generator=gen).tolist())
    return out


def run(engine: TorchEngine, max_steps: int = 2000) -> list[Trajectory]:
    out: list[Trajectory] = []
    for _ in range(max_steps):
        if not engine.has_work():
            return sorted(out, key=lambda t: (t.group_id, t.sample_idx))
        out.extend(engine.step())
    raise AssertionError("engine did not drain")


@torch.no_grad()
def reference(model: DecoderLM, t: Trajectory, temperature: float = 1.0):
    """Full forward over prompt + response[:-1] -> (log-probs of the response, routing, logits)."""
    ids = torch.tensor([t.prompt_ids + t.response_ids[:-1]])
    out = model(ids)
    P = len(t.prompt_ids)
    logits = out.logits_BSV[0, P - 1:].float()
    lp = torch.log_softmax(logits / (temperature or 1.0), -1).gather(1, torch.tensor(t.response_ids)[:, None])[:, 0]
    return lp, out.routing_BSLK[0], logits


def check_against(model: DecoderLM, t: Trajectory, temperature: float = 1.0) -> None:
    lp, routing, logits = reference(model, t, temperature)
    assert len(t.behavior_logprobs) == len(t.response_ids)
    torch.testing.assert_close(t.behavior_logprobs, lp, atol=ATOL, rtol=0)
    assert t.routing is not None and t.routing.dtype == torch.uint8
    assert t.routing.shape == (len(t.prompt_ids) + len(t.response_ids) - 1, CFG.num_moe_layers, CFG.num_experts_per_tok)
    assert torch.equal(t.routing.long(), routing), "routing record differs from the full forward's choice"
    if temperature == 0:
        assert t.response_ids == logits.argmax(-1).tolist()


def test_registered_and_implements_protocol(models):
    assert ENGINES.get("torch") is TorchEngine
    assert isinstance(make_engine(models[0]), Engine)


@pytest.mark.parametrize("moe_impl", ["auto", "padded"])
def test_incremental_decoding_matches_full_forward(models, moe_impl):
    """Chunked prefill (budget 24 < longest prompts), shared prompts (n = 3), mixed decode/prefill."""
    engine = make_engine(models[0], moe_impl=moe_impl)
    for i, p in enumerate(prompts(6)):
        engine.submit(PromptGroup(group_id=i, prompt_id=i, prompt_ids=p, num_samples=3), 0,
                      SamplingParams(max_new_tokens=12 + i, temperature=1.0, seed=100 + i))
    out = run(engine)
    assert [(t.group_id, t.sample_idx) for t in out] == [(g, s) for g in range(6) for s in range(3)]
    for t in out:
        assert t.finish_reason is FinishReason.LENGTH and len(t.response_ids) == 12 + t.group_id
        assert t.version == t.min_version == t.max_version == 0
        assert t.queued_at <= t.first_token_at <= t.finished_at
        check_against(models[0], t)
    # The n samples of a group share the prompt but draw different tokens.
    assert out[0].response_ids != out[1].response_ids


def test_greedy_and_temperature_logprob_convention(models):
    engine = make_engine(models[0])
    p = prompts(2, seed=3)
    engine.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=p[0]), 0, SamplingParams(max_new_tokens=10, temperature=0))
    engine.submit(PromptGroup(group_id=1, prompt_id=1, prompt_ids=p[1], num_samples=2), 0,
                  SamplingParams(max_new_tokens=10, temperature=0.6, top_k=20, top_p=0.9, seed=5))
    greedy, *hot = run(engine)
    check_against(models[0], greedy, temperature=0)
    for t in hot:
        check_against(models[0], t, temperature=0.6)  # log-probs are before truncation


def test_replaying_the_record_reproduces_the_forward(models):
    engine = make_engine(models[0])
    engine.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=prompts(1, seed=4)[0], num_samples=2), 0,
                  SamplingParams(max_new_tokens=20, seed=1))
    for t in run(engine):
        ids = torch.tensor([t.prompt_ids + t.response_ids[:-1]])
        with torch.no_grad():
            free = models[0](ids)
            replayed = models[0](ids, replay_BSLK=t.routing[None])
        assert torch.equal(replayed.routing_BSLK[0], t.routing.long())
        assert torch.equal(replayed.logits_BSV, free.logits_BSV)  # bit for bit
        P = len(t.prompt_ids)
        lp = torch.log_softmax(replayed.logits_BSV[0, P - 1:], -1).gather(1, torch.tensor(t.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(lp, t.behavior_logprobs, atol=ATOL, rtol=0)


def test_seeded_sampling_is_independent_of_batch_companions(models):
    target = PromptGroup(group_id=7, prompt_id=7, prompt_ids=prompts(1, seed=5)[0], num_samples=2)
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, seed=1234)
    alone = make_engine(models[0])
    alone.submit(target, 0, sampling)
    ref = run(alone)
    crowded = make_engine(models[0], max_num_batched_tokens=8)
    for i, p in enumerate(prompts(4, seed=6)):
        crowded.submit(PromptGroup(group_id=i, prompt_id=i, prompt_ids=p, num_samples=1), 0,
                       SamplingParams(max_new_tokens=5 + 3 * i, temperature=1.0))
    crowded.step()
    crowded.submit(target, 0, sampling)
    got = [t for t in run(crowded) if t.group_id == 7]
    assert [t.response_ids for t in got] == [t.response_ids for t in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.behavior_logprobs, b.behavior_logprobs, atol=ATOL, rtol=0)
    # Unseeded groups draw from the engine seed: same engine seed, same tokens.
    runs = []
    for _ in range(2):
        e = make_engine(models[0], seed=9)
        e.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=[1, 2, 3]), 0, SamplingParams(max_new_tokens=8))
        runs.append(run(e)[0].response_ids)
    assert runs[0] == runs[1]


def test_stop_tokens_max_new_tokens_and_context_limit(models):
    prompt = prompts(1, seed=7)[0]
    probe = make_engine(models[0])
    probe.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=prompt), 0, SamplingParams(max_new_tokens=12, temperature=0))
    greedy = run(probe)[0].response_ids
    stop = greedy[4]
    first = greedy.index(stop)
    engine = make_engine(models[0], max_model_len=len(prompt) + 6)
    engine.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=prompt), 0,
                  SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop,)))
    engine.submit(PromptGroup(group_id=1, prompt_id=1, prompt_ids=prompt), 0, SamplingParams(max_new_tokens=3, temperature=0))
    engine.submit(PromptGroup(group_id=2, prompt_id=2, prompt_ids=prompt), 0, SamplingParams(max_new_tokens=50, temperature=0))
    by_stop, by_max, by_context = run(engine)
    assert by_stop.response_ids == greedy[:first + 1] and by_stop.finish_reason is FinishReason.STOP
    assert by_max.response_ids == greedy[:3] and by_max.finish_reason is FinishReason.LENGTH
    assert by_context.response_ids == greedy[:6] and by_context.finish_reason is FinishReason.LENGTH
    assert len(by_context.prompt_ids) + len(by_context.response_ids) == len(prompt) + 6


def test_two_live_versions_each_sequence_uses_its_own_weights(models):
    """Version 1 arrives while version-0 sequences are mid-generation; both then share every step."""
    old_sampling = SamplingParams(max_new_tokens=30, temperature=1.0, seed=11)
    new_sampling = SamplingParams(max_new_tokens=20, temperature=1.0, seed=22)
    old_groups = [PromptGroup(group_id=i, prompt_id=i, prompt_ids=p, num_samples=2) for i, p in enumerate(prompts(2, seed=8))]
    new_groups = [PromptGroup(group_id=10 + i, prompt_id=10 + i, prompt_ids=p, num_samples=2)
                  for i, p in enumerate(prompts(2, seed=9))]

    engine = make_engine(models[0], version=0)
    for g in old_groups:
        engine.submit(g, 0, old_sampling)
    out = []
    for _ in range(5):
        out.extend(engine.step())
    engine.add_version(1, models[1].state_dict())
    for g in new_groups:
        engine.submit(g, 1, new_sampling)
    saw_both = False
    while engine.has_work():
        out.extend(engine.step())
        saw_both |= len(engine.stats().running_per_version) == 2
    assert saw_both, "the two versions never decoded in the same step"
    out.sort(key=lambda t: (t.group_id, t.sample_idx))

    singles = {}
    for version, model, groups, sampling in ((0, models[0], old_groups, old_sampling), (1, models[1], new_groups, new_sampling)):
        single = make_engine(model, version=version)
        for g in groups:
            single.submit(g, version, sampling)
        singles.update({(t.group_id, t.sample_idx): t for t in run(single)})
    for t in out:
        own, other = (models[0], models[1]) if t.group_id < 10 else (models[1], models[0])
        assert t.version == (0 if t.group_id < 10 else 1)
        check_against(own, t)
        assert t.response_ids == singles[(t.group_id, t.sample_idx)].response_ids
        other_lp, _, _ = reference(other, t)
        assert not torch.allclose(other_lp, t.behavior_logprobs, atol=1e-2)
    engine.drop_version(0)
    assert engine.live_versions == [1]


def test_version_management_errors(models):
    engine = make_engine(models[0], max_live_versions=2)
    with pytest.raises(ValueError, match="already live"):
        engine.add_version(0, models[0].state_dict())
    engine.add_version(1, models[1].state_dict())
    with pytest.raises(ValueError, match="max_live_versions=2"):
        engine.add_version(2, models[1].state_dict())
    engine.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=[1, 2]), 1, SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="cannot drop version 1"):
        engine.drop_version(1)
    run(engine)
    engine.drop_version(1)
    with pytest.raises(ValueError, match="version 5 is not live"):
        engine.drop_version(5)
    weights = dict(models[0].state_dict())
    del weights["model.layers.1.self_attn.o_proj.weight"]
    weights["model.layers.0.mlp.gate.weight"] = torch.zeros(3, CFG.hidden_size)
    weights["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        engine.add_version(3, weights)
    msg = str(err.value)
    assert "missing [model.layers.1.self_attn.o_proj.weight]" in msg and "unexpected [model.extra.weight]" in msg
    assert "model.layers.0.mlp.gate.weight: expected [8, 128], got [3, 128]" in msg
    assert engine.live_versions == [0]


def test_bad_requests_fail_at_submit_and_leave_others_untouched(models):
    good = PromptGroup(group_id=0, prompt_id=0, prompt_ids=prompts(1, seed=10)[0], num_samples=2)
    sampling = SamplingParams(max_new_tokens=15, temperature=1.0, seed=3)
    ref_engine = make_engine(models[0])
    ref_engine.submit(good, 0, sampling)
    ref = run(ref_engine)

    engine = make_engine(models[0], max_model_len=40)
    engine.submit(good, 0, sampling)
    engine.step()
    bad = [
        (PromptGroup(group_id=1, prompt_id=1, prompt_ids=list(range(40))), 0, "leaves no room"),
        (PromptGroup(group_id=2, prompt_id=2, prompt_ids=[1, CFG.vocab_size]), 0, "outside the vocabulary"),
        (PromptGroup(group_id=3, prompt_id=3, prompt_ids=[1, -2]), 0, "outside the vocabulary"),
        (PromptGroup(group_id=4, prompt_id=4, prompt_ids=[1, 2]), 9, "version 9 is not live"),
        (PromptGroup(group_id=5, prompt_id=5, prompt_ids=[1, 2], num_samples=9), 0, "exceeds engine.max_num_seqs"),
        (PromptGroup(group_id=0, prompt_id=6, prompt_ids=[1, 2]), 0, "already running"),
    ]
    for group, version, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.submit(group, version, sampling)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    got = run(engine)
    assert [t.response_ids for t in got] == [t.response_ids for t in ref]
    assert engine.stats().running_per_version == {} and engine.stats().waiting == 0


def test_abort_returns_partial_samples(models):
    engine = make_engine(models[0], max_num_seqs=4)
    p = prompts(3, seed=11)
    for i in range(3):
        engine.submit(PromptGroup(group_id=i, prompt_id=i, prompt_ids=p[i], num_samples=2), 0,
                      SamplingParams(max_new_tokens=30, seed=i))
    for _ in range(6):
        assert engine.step() == []
    engine.abort(0)  # decoding
    engine.abort(2)  # still waiting for slots
    engine.abort(99)  # unknown: ignored
    aborted = engine.step()
    assert sorted((t.group_id, t.sample_idx) for t in aborted) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    for t in aborted:
        assert t.finish_reason is FinishReason.ABORT
        if t.group_id == 0:
            assert 0 < len(t.response_ids) < 30 and len(t.behavior_logprobs) == len(t.response_ids)
            check_against(models[0], t)
        else:
            assert t.response_ids == []
    rest = run(engine)
    assert [(t.group_id, t.finish_reason) for t in rest] == [(1, FinishReason.LENGTH)] * 2
    assert engine.stats().kv_occupancy == 0


def test_async_stream_with_background_worker(models):
    engine = make_engine(models[0])

    async def main() -> list[Trajectory]:
        engine.start()
        try:
            for i, p in enumerate(prompts(4, seed=12)):
                engine.submit(PromptGroup(group_id=i, prompt_id=i, prompt_ids=p, num_samples=2), 0,
                              SamplingParams(max_new_tokens=6 + i, seed=i))
            got = []
            async for t in engine.finished():
                got.append(t)
                if len(got) == 8:
                    break
            with pytest.raises(RuntimeError, match="background worker"):
                engine.step()
            return got
        finally:
            engine.close()

    got = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert sorted((t.group_id, t.sample_idx) for t in got) == [(g, s) for g in range(4) for s in range(2)]
    for t in got:
        check_against(models[0], t)
    stats = engine.stats()
    assert stats.num_generated_tokens == sum(2 * (6 + i) for i in range(4)) and stats.busy_s > 0


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="engine.max_num_batched_tokens"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="engine.dtype"):
        EngineConfig(dtype="float64")
    with pytest.raises(ValueError, match="engine.device"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TorchEngine(CFG, EngineConfig(max_model_len=4096))


class _SlowWeights(dict):
    """A weights mapping whose reads wait for a signal: add_version stays mid-preparation."""

    def __init__(self, weights, release):
        super().__init__(weights)
        self.release = release
        self.reading = threading.Event()

    def __getitem__(self, name):
        self.reading.set()
        assert self.release.wait(timeout=30), "test never released the weights"
        return super().__getitem__(name)


def test_decoding_continues_while_a_version_loads(models):
    engine = make_engine(models[0])
    engine.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=[3, 4, 5]), 0, SamplingParams(max_new_tokens=6, seed=0))
    release = threading.Event()
    slow = _SlowWeights(models[1].state_dict(), release)
    loader = threading.Thread(target=engine.add_version, args=(1, slow))
    loader.start()
    try:
        assert slow.reading.wait(timeout=30)
        done = run(engine)  # every step runs while version 1 is still being prepared
        assert [t.finish_reason for t in done] == [FinishReason.LENGTH]
        assert engine.live_versions == [0]  # not visible until fully prepared
        check_against(models[0], done[0])
    finally:
        release.set()
        loader.join()
    assert engine.live_versions == [0, 1]


@pytest.mark.parametrize("overrides", [dict(mlp_only_layers=[1]),
                                       dict(model_type="qwen3", num_experts=0, tie_word_embeddings=True),
                                       dict(model_type="qwen2", num_experts=0)])
def test_dense_layers_and_dense_models(overrides):
    cfg = ModelConfig.tiny(num_hidden_layers=2, **overrides)
    model = DecoderLM.from_config(cfg, seed=3).eval()
    engine = TorchEngine(cfg, EngineConfig(max_num_seqs=4, max_model_len=48, max_num_batched_tokens=8))
    engine.add_version(0, model.state_dict())
    engine.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=prompts(1, seed=13)[0], num_samples=2), 0,
                  SamplingParams(max_new_tokens=8, seed=4))
    for t in run(engine):
        ids = torch.tensor([t.prompt_ids + t.response_ids[:-1]])
        with torch.no_grad():
            out = model(ids)
        P = len(t.prompt_ids)
        lp = torch.log_softmax(out.logits_BSV[0, P - 1:], -1).gather(1, torch.tensor(t.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(t.behavior_logprobs, lp, atol=ATOL, rtol=0)
        if cfg.is_moe:
            assert t.routing is not None and torch.equal(t.routing.long(), out.routing_BSLK[0])
        else:
            assert t.routing is None


def test_batch_of_equal_prompts_prefilled_together(models):
    """Whole prompts of one length share one causal prefill call (no mask): same results."""
    engine = make_engine(models[0], max_num_batched_tokens=64)
    for i, p in enumerate(prompts(4, seed=14, lengths=(9, 9))):
        engine.submit(PromptGroup(group_id=i, prompt_id=i, prompt_ids=p), 0, SamplingParams(max_new_tokens=5, seed=i))
    for t in run(engine):
        check_against(models[0], t)


def test_a_lone_prompt_longer_than_the_step_budget(models):
    """Steps that only advance a prefill (no sequence samples) write KV and sample nothing; the result
    equals an unchunked prefill."""
    model, _ = models
    prompt = list(range(5, 25))
    outputs = []
    for budget in (8, 64):
        engine = make_engine(model, max_num_seqs=2, max_num_batched_tokens=budget)
        engine.submit(PromptGroup(group_id=0, prompt_id=0, prompt_ids=prompt), 0,
                      SamplingParams(max_new_tokens=6, temperature=0.0))
        finished = []
        while engine.has_work():
            finished += engine.step()
        outputs.append(finished[0].response_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6

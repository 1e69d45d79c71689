"""The torch engine's sampler: counter-based randomness, truncation, log-prob convention."""

import torch

from dora.engines.sampler import SamplingBatch, mix64, mix64_reference, sample, uniforms


def _batch(num_rows: int, *, temperature=1.0, top_p=1.0, top_k=0, seeds=None, counters=None) -> SamplingBatch:
    seeds = torch.arange(num_rows) if seeds is None else torch.as_tensor(seeds)
    counters = torch.zeros(num_rows, dtype=torch.long) if counters is None else torch.as_tensor(counters)
    return SamplingBatch(
        temperature_B=torch.full((num_rows,), float(temperature)), top_p_B=torch.full((num_rows,), float(top_p)),
        top_k_B=torch.full((num_rows,), top_k, dtype=torch.long), seed_B=seeds.long(), counter_B=counters.long(),
        all_greedy=temperature == 0, any_truncation=top_p < 1 or top_k > 0)


def test_mix64_matches_unsigned_reference():
    values = [0, 1, 2, 12345, -1, -(2**63), 2**63 - 1, 0x9E3779B97F4A7C15 - 2**64]
    got = mix64(torch.tensor(values, dtype=torch.long)).tolist()
    assert [g % 2**64 for g in got] == [mix64_reference(v) for v in values]


def test_uniforms_depend_only_on_seed_and_counter():
    seeds, counters = torch.tensor([5, 7, 5, 9]), torch.tensor([0, 3, 0, 1])
    u = uniforms(seeds, counters)
    assert u[0] == u[2] and u[0] != u[1]
    # Same (seed, counter) alone or inside another batch gives the same number.
    assert uniforms(torch.tensor([7]), torch.tensor([3]))[0] == u[1]
    many = uniforms(torch.arange(20000), torch.zeros(20000, dtype=torch.long))
    assert 0 < many.min() and many.max() < 1
    assert abs(many.mean().item() - 0.5) < 0.01


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    num_rows = 20000
    logits = probs.log().expand(num_rows, -1)
    tokens, logprobs = sample(logits, _batch(num_rows))
    freq = torch.bincount(tokens, minlength=5).float() / num_rows
    assert torch.allclose(freq, probs, atol=0.015)
    assert freq[4] == 0  # zero-probability tokens are never drawn
    assert torch.allclose(logprobs, probs.log()[tokens])


def test_temperature_logprob_convention_and_greedy():
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample(logits, _batch(6, temperature=0.7))
    assert torch.allclose(logprobs, torch.log_softmax(logits / 0.7, -1).gather(1, tokens[:, None])[:, 0])
    greedy, greedy_lp = sample(logits, _batch(6, temperature=0.0))
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(greedy_lp, torch.log_softmax(logits, -1).max(-1).values)


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    batch = _batch(4)
    batch.temperature_B = torch.tensor([0.0, 1.0, 0.0, 2.0])
    tokens, logprobs = sample(logits, batch)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.allclose(logprobs[3], torch.log_softmax(logits[3] / 2.0, -1)[tokens[3]])


def test_top_k_and_top_p_truncate_but_logprobs_do_not():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    num_rows = 4000
    logits = probs.log().expand(num_rows, -1)
    top_k_tokens, top_k_lp = sample(logits, _batch(num_rows, top_k=2))
    assert set(top_k_tokens.tolist()) == {0, 1}
    assert torch.allclose(top_k_lp, probs.log()[top_k_tokens])  # before truncation
    freq = torch.bincount(top_k_tokens, minlength=4).float() / num_rows
    assert abs(freq[0].item() - 4 / 7) < 0.03
    top_p_tokens, _ = sample(logits, _batch(num_rows, top_p=0.65))
    assert set(top_p_tokens.tolist()) == {0, 1}  # 0.4 < 0.65, 0.4 + 0.3 reaches it
    tiny_p, _ = sample(logits, _batch(num_rows, top_p=0.01))
    assert set(tiny_p.tolist()) == {0}  # the most likely token always stays


def test_row_results_do_not_depend_on_batch_companions():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 50, generator=gen)
    batch = _batch(8, seeds=torch.arange(100, 108), counters=torch.arange(8))
    tokens, _ = sample(logits, batch)
    for row in (0, 5):
        alone = _batch(1, seeds=[100 + row], counters=[row])
        assert sample(logits[row:row + 1], alone)[0].item() == tokens[row].item()

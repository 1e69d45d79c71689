"""Chunked log-probs / entropy equal the naive full-logits computation, values and gradients."""

import pytest
import torch

from dora.trainer.logprobs import chunked_logprobs, naive_logprobs


def _tensors(dtype=torch.float64, n=37, d=16, v=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_values_and_grads_match_naive(chunk_size, temperature):
    hidden, weight, bias, targets = _tensors()
    lp, ent = chunked_logprobs(hidden, weight, targets, bias_V=bias, temperature=temperature,
                               chunk_size=chunk_size, with_entropy=True)
    lp_ref, ent_ref = naive_logprobs(hidden, weight, targets, bias_V=bias, temperature=temperature)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    c_lp, c_ent = torch.randn(lp.shape, generator=g, dtype=lp.dtype), torch.randn(lp.shape, generator=g, dtype=lp.dtype)
    grads = torch.autograd.grad((lp * c_lp).sum() + (ent * c_ent).sum(), (hidden, weight, bias))
    grads_ref = torch.autograd.grad((lp_ref * c_lp).sum() + (ent_ref * c_ent).sum(), (hidden, weight, bias))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_temperature_zero_means_plain_softmax():
    hidden, weight, _, targets = _tensors(bias=False)
    a, _ = chunked_logprobs(hidden, weight, targets, temperature=0.0, chunk_size=5)
    b, _ = chunked_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=5)
    torch.testing.assert_close(a, b)
    c, _ = chunked_logprobs(hidden, weight, targets, temperature=2.0, chunk_size=5)
    ref = torch.log_softmax((hidden @ weight.T) / 2.0, -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(c, ref)


def test_float32_and_bfloat16_inputs():
    hidden, weight, _, targets = _tensors(dtype=torch.float32, bias=False)
    lp, ent = chunked_logprobs(hidden, weight, targets, chunk_size=8, with_entropy=True)
    lp_ref, ent_ref = naive_logprobs(hidden, weight, targets)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5)
    # only the log-prob is used: the entropy output gets no gradient and that is fine
    grad_h, = torch.autograd.grad(lp.sum(), hidden)
    grad_h_ref, = torch.autograd.grad(lp_ref.sum(), hidden)
    torch.testing.assert_close(grad_h, grad_h_ref, rtol=1e-5, atol=1e-5)
    # bf16 hidden states and head: computed in fp32, gradients come back in bf16
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    lp16, _ = chunked_logprobs(h16, w16, targets, chunk_size=8)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, naive_logprobs(h16.float(), w16.float(), targets)[0], rtol=1e-5, atol=1e-5)
    lp16.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16


def test_bad_shapes_raise():
    hidden, weight, _, targets = _tensors()
    with pytest.raises(ValueError, match="targets"):
        chunked_logprobs(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="same D"):
        chunked_logprobs(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logprobs(hidden, weight, targets, chunk_size=0)


def test_no_tokens_by_vocab_tensor_is_kept_for_backward():
    # The point of chunking: autograd keeps O(N * D + N) for the backward, never an [N, V] tensor.
    n, v, d = 64, 500, 16
    hidden, weight, _, targets = _tensors(dtype=torch.float32, n=n, d=d, v=v, bias=False)
    saved_sizes = []

    def pack(t):
        saved_sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = chunked_logprobs(hidden, weight, targets, chunk_size=8, with_entropy=True)
    assert saved_sizes and max(saved_sizes) <= max(n, v) * d < n * v  # hidden states or the head weight
    (lp.sum() + ent.sum()).backward()
    saved_sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_logprobs(hidden, weight, targets)
    assert max(saved_sizes) >= n * v  # the naive path does keep the full logits

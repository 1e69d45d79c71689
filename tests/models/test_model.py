"""DecoderLM: routing record and replay, per-layer dense/MoE selection, padding, init, gradients."""

import pytest
import torch

from dora.models.config import ModelConfig
from dora.models.model import DecoderLM, DenseMLP, MoEBlock


@pytest.fixture(scope="module")
def model():
    return DecoderLM.from_config(ModelConfig.tiny(vocab_size=64), seed=0).eval()


def _ids(B=2, S=7, V=64, seed=0):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def test_parameter_names_are_hf_with_stacked_experts(model):
    sd = model.state_dict()
    cfg = model.config
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 2 * 128, 128)
    assert sd["model.layers.0.mlp.experts.down_proj"].shape == (8, 128, 128)
    assert sd["model.layers.0.mlp.gate.weight"].shape == (8, 128)
    assert sd["model.layers.0.self_attn.q_norm.weight"].shape == (cfg.head_dim,)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= sd.keys()
    assert model.num_parameters() <= 2_000_000


def test_replay_of_record_reproduces_forward_exactly(model):
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        assert out.routing_BSLK.shape == (2, 7, 4, 2) and out.routing_BSLK.dtype == torch.int64
        replayed = model(ids, replay_BSLK=out.routing_BSLK.to(torch.uint8))
    assert torch.equal(replayed.logits_BSV, out.logits_BSV)
    assert torch.equal(replayed.routing_BSLK, out.routing_BSLK)


def test_changed_replay_changes_output_and_is_reported(model):
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        other = (out.routing_BSLK + 1) % model.config.num_experts
        replayed = model(ids, replay_BSLK=other)
    assert torch.equal(replayed.routing_BSLK, other)
    assert not torch.allclose(replayed.logits_BSV, out.logits_BSV)


def test_replay_keeps_router_gradient(model):
    ids = _ids()
    with torch.no_grad():
        record = model(ids).routing_BSLK
    model.zero_grad()
    model(ids, replay_BSLK=record).logits_BSV.logsumexp(-1).sum().backward()
    for i in model.config.moe_layer_ids:
        assert model.model.layers[i].mlp.gate.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_replay_shape_errors(model):
    with pytest.raises(ValueError, match=r"\[batch, seq, moe_layers, top_k\] = \[2, 7, 4, 2\]"):
        model(_ids(), replay_BSLK=torch.zeros(2, 7, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        model(_ids(), replay_BSLK=torch.full((2, 7, 4, 2), 9))


def test_dense_layers_selectable_per_layer():
    cfg = ModelConfig.tiny(vocab_size=64, mlp_only_layers=[0, 2])
    m = DecoderLM.from_config(cfg, seed=1)
    kinds = [type(layer.mlp) for layer in m.model.layers]
    assert kinds == [DenseMLP, MoEBlock, DenseMLP, MoEBlock]
    assert "model.layers.0.mlp.gate_proj.weight" in m.state_dict()
    out = m(_ids())
    assert out.routing_BSLK.shape == (2, 7, 2, 2)
    dense = DecoderLM.from_config(ModelConfig.tiny(vocab_size=64, num_experts=0), seed=1)
    assert dense(_ids()).routing_BSLK is None


def test_right_padding_leaves_real_positions_unchanged(model):
    ids = _ids(B=1, S=5)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        ref = model(ids)
        out = model(padded, attention_mask_BS=mask)
    torch.testing.assert_close(out.logits_BSV[:, :5], ref.logits_BSV, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.routing_BSLK[:, :5], ref.routing_BSLK)


def test_hidden_output_and_position_ids(model):
    ids = _ids()
    with torch.no_grad():
        out = model(ids, return_hidden=True)
        assert out.logits_BSV is None
        torch.testing.assert_close(model.lm_head(out.hidden_BSD), model(ids).logits_BSV)
        shifted = model(ids, position_ids_BS=torch.arange(3, 10).expand(2, 7))
    assert not torch.allclose(shifted.logits_BSV, model(ids).logits_BSV)


def test_init_is_deterministic_and_tied_embeddings():
    cfg = ModelConfig.tiny(vocab_size=64)
    a, b = DecoderLM.from_config(cfg, seed=3), DecoderLM.from_config(cfg, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = DecoderLM.from_config(cfg, seed=4)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    tied = DecoderLM.from_config(cfg.replace(tie_word_embeddings=True), seed=3)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.num_parameters() == a.num_parameters() - 64 * 128


def test_activation_checkpointing_gives_same_gradients():
    cfg = ModelConfig.tiny(vocab_size=64, num_hidden_layers=2)
    grads = []
    for ckpt in (False, True):
        m = DecoderLM.from_config(cfg, seed=5).train()
        m.activation_checkpointing = ckpt
        out = m(_ids(), attention_mask_BS=torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
        out.logits_BSV.log_softmax(-1)[..., 0].sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)

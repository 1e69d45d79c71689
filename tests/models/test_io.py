"""Model folders: round trip, Hugging Face interop both ways (MoE and dense), sharding, errors."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dora.models.config import ModelConfig, ModelType
from dora.models.io import from_hf_state_dict, load_config, load_model, load_state_dict, save_model, to_hf_state_dict
from dora.models.model import DecoderLM


def _ids(V, B=2, S=9):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))


def _moe_cfg(**kw):
    return ModelConfig.tiny(vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                            num_hidden_layers=3, num_experts=4, mlp_only_layers=[1], **kw)


def _dense_cfg(model_type, **kw):
    return ModelConfig.tiny(model_type=model_type, vocab_size=64, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=2, num_experts=0, **kw)


def _randomise(model):
    """Non-trivial norms and biases, so a swapped or dropped tensor shows in the logits."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_folder_round_trip_bit_equal(tmp_path, tied):
    class Tok:
        def save(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    model = _randomise(DecoderLM.from_config(_moe_cfg(tie_word_embeddings=tied, eos_token_ids=[2]), seed=1))
    save_model(model, tmp_path, tokenizer=Tok())
    assert (tmp_path / "tokenizer.json").is_file()
    on_disk = load_file(tmp_path / "model.safetensors")
    assert on_disk["model.layers.0.mlp.experts.3.gate_proj.weight"].shape == (48, 64)
    assert on_disk["model.layers.0.mlp.experts.3.down_proj.weight"].shape == (64, 48)
    assert ("lm_head.weight" in on_disk) is not tied
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = _ids(64)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits_BSV, model(ids).logits_BSV)


def test_sharded_round_trip_and_dtype(tmp_path):
    model = DecoderLM.from_config(_moe_cfg(), seed=2)
    save_model(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.state_dict()["model.layers.2.mlp.experts.down_proj"],
                       model.state_dict()["model.layers.2.mlp.experts.down_proj"].bfloat16())
    save_model(model, tmp_path)  # re-saving unsharded removes the old shards
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]


def test_state_dict_conversions_invert():
    model = DecoderLM.from_config(_moe_cfg(), seed=3)
    sd = model.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, model.config), model.config)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


HF_MOE = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
              norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=128)


def _hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=ids).logits


def test_transformers_qwen3_moe_loads_into_dora(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**HF_MOE)).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path)
    assert ours.config.num_experts == 4 and ours.config.moe_layer_ids == [0, 2]
    ids = _ids(64)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits_BSV, _hf_logits(hf, ids), rtol=1e-5, atol=1e-5)
        # Right padding: real positions agree with transformers' own masking.
        mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
        hf_padded = hf(input_ids=ids, attention_mask=mask).logits
        ours_padded = ours(ids, attention_mask_BS=mask).logits_BSV
    real = mask.bool()
    torch.testing.assert_close(ours_padded[real], hf_padded[real], rtol=1e-5, atol=1e-5)


def test_dora_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _randomise(DecoderLM.from_config(_moe_cfg(rope_theta=5000.0), seed=4))
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    ids = _ids(64)
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(hf, ids), model(ids).logits_BSV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", [ModelType.QWEN2, ModelType.LLAMA, ModelType.QWEN3])
def test_dense_checkpoints_both_ways(tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    hf_classes = {ModelType.QWEN2: (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                  ModelType.LLAMA: (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                  ModelType.QWEN3: (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
    config_cls, model_cls = hf_classes[model_type]
    torch.manual_seed(1)
    hf_cfg = config_cls(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                        **({"attention_bias": True} if model_type is ModelType.LLAMA else {}))
    hf = _randomise(model_cls(hf_cfg).eval())
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config.tie_word_embeddings and ours.config.attention_bias == (model_type is not ModelType.QWEN3)
    ids = _ids(64)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits_BSV, _hf_logits(hf, ids), rtol=1e-5, atol=1e-5)
    save_model(ours, tmp_path / "dora")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dora").eval()
    assert type(back) is model_cls
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(back, ids), _hf_logits(hf, ids), rtol=1e-5, atol=1e-5)


def test_mismatched_weights_are_all_named(tmp_path):
    save_model(DecoderLM.from_config(_moe_cfg(), seed=5), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.0.mlp.experts.2.up_proj.weight"]
    sd["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(4, 4)
    sd["model.norm.weight"] = torch.zeros(65)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg
    assert "missing (1):\n    model.layers.0.mlp.experts.2.up_proj.weight [48, 64]" in msg
    assert "model.layers.9.self_attn.q_proj.weight [4, 4] in model.safetensors" in msg
    assert "model.norm.weight: expected [64], found [65] in model.safetensors" in msg


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_moe_cfg().to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="never loaded"):
        load_state_dict(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_state_dict(tmp_path)


def test_saves_the_char_tokenizer_with_its_special_ids(tmp_path):
    from dora.data.tokenizer import CharTokenizer, load_tokenizer

    tok = CharTokenizer()
    cfg = ModelConfig.tiny().with_tokenizer(tok)
    assert cfg.eos_token_ids == [tok.eos_token_id] and cfg.pad_token_id == tok.pad_token_id
    save_model(DecoderLM.from_config(cfg), tmp_path, tokenizer=tok)
    assert load_tokenizer(tmp_path).encode("12+3") == tok.encode("12+3")
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    small = DecoderLM.from_config(ModelConfig.tiny(vocab_size=64))
    with pytest.raises(ValueError, match=r"tokenizer vocabulary \(100\) is larger"):
        save_model(small, tmp_path / "small", tokenizer=tok)


@settings(max_examples=25)  # each example builds, saves and reloads a model
@given(data=st.data())
def test_random_architectures_round_trip(tmp_path_factory, data):
    model_type = data.draw(st.sampled_from(list(ModelType)))
    layers = data.draw(st.integers(1, 3))
    kv_heads = data.draw(st.sampled_from([1, 2]))
    arch = dict(model_type=model_type, vocab_size=data.draw(st.integers(8, 40)), hidden_size=32,
                num_hidden_layers=layers, num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads,
                head_dim=data.draw(st.sampled_from([8, 16])), intermediate_size=24,
                tie_word_embeddings=data.draw(st.booleans()))
    if model_type is ModelType.QWEN3_MOE:
        experts = data.draw(st.integers(0, 4))
        arch.update(num_experts=experts, num_experts_per_tok=min(experts, 2) or 1, moe_intermediate_size=12,
                    decoder_sparse_step=data.draw(st.integers(1, 2)),
                    mlp_only_layers=data.draw(st.lists(st.integers(0, layers - 1), unique=True)))
    else:
        arch.update(num_experts=0)
    if model_type in (ModelType.QWEN3, ModelType.LLAMA):
        arch.update(attention_bias=data.draw(st.booleans()))
    model = _randomise(DecoderLM.from_config(ModelConfig.tiny(**arch), seed=data.draw(st.integers(0, 99))))
    folder = tmp_path_factory.mktemp("arch")
    save_model(model, folder, max_shard_bytes=data.draw(st.sampled_from([None, 20_000])))
    loaded = load_model(folder)
    assert loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)

"""ModelConfig: validation, layer layout, presets, Hugging Face config.json round trip."""

import pytest

from dora.models.config import ModelConfig, ModelType


def test_moe_layer_rule_follows_hf():
    cfg = ModelConfig.tiny(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert cfg.moe_layer_ids == [1, 5]
    assert cfg.num_moe_layers == 2 and not cfg.is_moe_layer(0) and not cfg.is_moe_layer(3)
    assert ModelConfig.tiny(num_experts=0).moe_layer_ids == []


def test_presets_sizes():
    tiny, bench = ModelConfig.tiny(), ModelConfig.bench7m()
    assert tiny.head_dim >= 32 and bench.head_dim == 64
    assert tiny.num_experts == bench.num_experts == 8 and bench.num_experts_per_tok == 2
    assert ModelConfig.tiny(vocab_size=64).vocab_size == 64


@pytest.mark.parametrize("overrides, match", [
    (dict(num_key_value_heads=3), "divisible"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(mlp_only_layers=[7]), "mlp_only_layers"),
    (dict(dtype="int8"), "dtype"),
    (dict(head_dim=33), "even"),
    (dict(qk_norm=False), "qk_norm"),
    (dict(eos_token_ids=[500]), "outside the vocabulary"),
])
def test_validation_names_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.tiny(**overrides)


@pytest.mark.parametrize("model_type", list(ModelType))
def test_hf_dict_round_trip(model_type):
    experts = dict(num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]) if model_type is ModelType.QWEN3_MOE \
        else dict(num_experts=0)
    cfg = ModelConfig.tiny(model_type=model_type, eos_token_ids=[1, 2], tie_word_embeddings=True, rope_theta=5e5,
                           **experts)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("model_type", list(ModelType))
def test_hf_dict_loads_in_transformers(model_type):
    pytest.importorskip("transformers")
    from transformers import AutoConfig

    experts = dict(num_experts=4) if model_type is ModelType.QWEN3_MOE else dict(num_experts=0)
    cfg = ModelConfig.tiny(model_type=model_type, **experts)
    d = cfg.to_hf_dict()
    hf = AutoConfig.for_model(**d)
    assert hf.model_type == model_type.value and hf.head_dim == cfg.head_dim
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    # Transformers' own dict (num_local_experts, rope_parameters only) reads back to the same config.
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg


def test_from_hf_dict_errors():
    base = ModelConfig.tiny().to_hf_dict()
    with pytest.raises(ValueError, match="model_type 'mixtral'"):
        ModelConfig.from_hf_dict({**base, "model_type": "mixtral"})
    with pytest.raises(ValueError, match=r"missing required keys \['hidden_size'\]"):
        ModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_hydra_structured_config():
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, {"model_type": "llama", "num_experts": 0, "vocab_size": 50}))
    assert cfg.model_type is ModelType.LLAMA and cfg.qk_norm is False and cfg.vocab_size == 50
    assert OmegaConf.to_object(OmegaConf.merge(schema, {"model_type": "QWEN3_MOE"})).model_type is ModelType.QWEN3_MOE
    assert list(ModelType) == [ModelType.QWEN3_MOE, ModelType.QWEN3, ModelType.QWEN2, ModelType.LLAMA]
    with pytest.raises(ValueError, match="divisible"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"num_key_value_heads": 3}))

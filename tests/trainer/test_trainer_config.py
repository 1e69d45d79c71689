"""Config validation names the key and the allowed values."""

import pytest

from dora.trainer.config import AlgorithmConfig, Aggregation, OffPolicy, TrainerConfig


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="nope"), r"algorithm.loss: unknown loss 'nope'; registered: grpo, ppo"),
    (dict(advantage="nope"), r"algorithm.advantage: unknown advantage estimator 'nope'; registered: gae, grpo, rloo"),
    (dict(loss="ppo"), r"algorithm.loss='ppo' and algorithm.advantage='grpo' do not fit"),
    (dict(aggregation="mean"), r"algorithm.aggregation must be one of \['token_mean', 'seq_mean_token_mean'"),
    (dict(off_policy="weird"), r"algorithm.off_policy must be one of"),
    (dict(off_policy="tis"), r"algorithm.is_cap must be set for off_policy='tis'"),
    (dict(clip_low=1.0), r"algorithm.clip_low must be < 1"),
    (dict(kl_coef=-1.0), r"algorithm.kl_coef must be >= 0"),
    (dict(ppo_epochs=0), r"algorithm.ppo_epochs must be >= 1"),
    (dict(kl_estimator="k2"), r"algorithm.kl_estimator must be one of \['k1', 'k3'\]"),
])
def test_algorithm_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlgorithmConfig(**kwargs)


def test_strings_become_enums_and_import_paths_resolve():
    cfg = AlgorithmConfig(aggregation="seq_mean_token_sum_norm", off_policy="mis", is_cap=2.0,
                          loss="dora.trainer.losses.grpo:GRPOLoss")
    assert cfg.aggregation is Aggregation.seq_mean_token_sum_norm and cfg.off_policy is OffPolicy.mis
    assert cfg.updates_per_step == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr_schedule="step"), r"trainer.lr_schedule must be one of \['constant', 'linear', 'cosine'\]"),
    (dict(lr_schedule="cosine", total_steps=0), r"trainer.total_steps \(0\) must exceed trainer.warmup_steps"),
    (dict(max_tokens_per_microbatch=0), r"trainer.max_tokens_per_microbatch must be >= 1"),
    (dict(beta2=1.0), r"trainer.beta2 must be in \[0, 1\)"),
    (dict(lr=-1.0), r"trainer.lr must be >= 0"),
])
def test_trainer_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainerConfig(**kwargs)


def test_omegaconf_structured_round_trip_with_cli_style_overrides():
    from omegaconf import OmegaConf

    node = OmegaConf.structured(AlgorithmConfig)
    node.merge_with_dotlist(["aggregation=seq_mean_token_sum_norm", "off_policy=tis", "is_cap=2.0",
                             "routing_replay=false"])
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, AlgorithmConfig)
    assert cfg.aggregation is Aggregation.seq_mean_token_sum_norm and cfg.off_policy is OffPolicy.tis
    assert cfg.routing_replay is False
    bad = OmegaConf.structured(AlgorithmConfig)
    bad.off_policy = "mis"  # valid enum, but MIS without a cap: caught by __post_init__ at conversion
    with pytest.raises(ValueError, match="algorithm.is_cap must be set"):
        OmegaConf.to_object(bad)
    assert isinstance(OmegaConf.to_object(OmegaConf.structured(TrainerConfig)), TrainerConfig)

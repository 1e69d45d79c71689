import pytest
import torch

from dora.cli import compose_config, recipe_names
from dora.config import RunConfig
from dora.models.config import ModelConfig
from dora.models.model import DecoderLM
from dora.rollout.config import RolloutMode
from dora.runtime.checkpoint import flatten_state, load_state, save_state, unflatten_state


def test_every_recipe_composes_to_typed_objects():
    assert {"grpo_tiny", "grpo_tiny_sync", "ppo_tiny"} <= set(recipe_names())
    for name in recipe_names():
        # grpo_qwen_1gpu serves a model folder the user names
        path = ["model.path=/models/any"] if name == "grpo_qwen_1gpu" else []
        cfg = compose_config(name, [*path, "logging.run_dir=/tmp/unused"])
        assert isinstance(cfg, RunConfig)
        assert cfg.data.n == cfg.rollout.group_size
        assert cfg.engine.max_live_versions == cfg.rollout.max_live_versions


def test_overrides_reach_the_stage_configs():
    cfg = compose_config("grpo_tiny", ["rollout.max_staleness=1", "steps=7", "trainer.lr=0", "logging.run_dir=/tmp/x"])
    assert cfg.rollout.k == 1 and cfg.steps == 7 and cfg.trainer.lr == 0
    assert compose_config("grpo_tiny_sync", ["logging.run_dir=/tmp/x"]).rollout.mode is RolloutMode.synchronous


@pytest.mark.parametrize("override, key", [
    ("rollout.max_stalenes=1", "max_stalenes"),            # unknown key
    ("rollout.batch_groups=many", "batch_groups"),          # wrong type
    ("rollout.max_staleness=-1", "max_staleness"),          # wrong value
    ("rollout.mode=sometimes", "mode"),                     # not an allowed value
    ("sampling.temperature=0.5", "temperature"),            # cross-stage consistency holds (interpolated)
])
def test_bad_config_fails_at_start_naming_the_key(override, key):
    if override.startswith("sampling.temperature"):
        # algorithm.temperature follows sampling.temperature, so this one is valid: the pair stays equal.
        cfg = compose_config("grpo_tiny", [override, "logging.run_dir=/tmp/x"])
        assert cfg.algorithm.temperature == 0.5
        with pytest.raises(ValueError, match="algorithm.temperature"):
            compose_config("grpo_tiny", [override, "algorithm.temperature=1.0", "logging.run_dir=/tmp/x"])
        return
    with pytest.raises(Exception, match=key):
        compose_config("grpo_tiny", [override, "logging.run_dir=/tmp/x"])


def test_engine_kind_choices_fail_clearly():
    with pytest.raises(Exception, match="engine.kind"):  # Hydra checks the enum while composing
        compose_config("grpo_tiny", ["engine.kind=tensorrt", "logging.run_dir=/tmp/x"])
    with pytest.raises(ValueError, match="set model.path"):
        compose_config("grpo_qwen_1gpu", ["logging.run_dir=/tmp/x"])
    with pytest.raises(ValueError, match="engine.max_live_versions must be 1"):  # one version per vLLM replica
        compose_config("grpo_qwen_1gpu", ["model.path=/m", "rollout.max_live_versions=2", "logging.run_dir=/tmp/x"])
    cfg = compose_config("grpo_qwen_1gpu", ["model.path=/m", "logging.run_dir=/tmp/x"])
    assert (cfg.engine.kind.value, cfg.runtime.num_engines, cfg.engine.max_live_versions) == ("vllm", 2, 1)


def test_checkpoint_state_round_trips_without_pickle():
    tensors: dict[str, torch.Tensor] = {}
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(4.0)}},
                           "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.95)}]},
             "count": 3, "name": "x", "none": None}
    skeleton = flatten_state(state, tensors)
    restored = unflatten_state(skeleton, tensors)
    assert restored["optimizer"]["state"][0]["step"].item() == 4.0
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert restored["count"] == 3 and restored["none"] is None
    with pytest.raises(TypeError, match="cannot checkpoint"):
        flatten_state({"f": object()}, {})


def test_checkpoint_of_a_tied_model_stores_the_shared_weight_once(tmp_path):
    model = DecoderLM.from_config(ModelConfig.tiny(tie_word_embeddings=True), seed=0)
    save_state(tmp_path, "trainer", {"policy": model.state_dict()})
    state, tensors = load_state(tmp_path, "trainer")
    assert len(tensors) == len(model.state_dict()) - 1
    restored = DecoderLM.from_config(ModelConfig.tiny(tie_word_embeddings=True), seed=1)
    restored.load_state_dict(state["policy"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))

import pytest
import torch

from dora.registry import Registry, import_object
from dora.types import Batch, FinishReason, PromptGroup, SamplingParams, Trajectory


def make_traj(group_id: int, sample_idx: int, version: int, n_tokens: int) -> Trajectory:
    return Trajectory(
        group_id=group_id, sample_idx=sample_idx, prompt_id=group_id, prompt_ids=[1, 2],
        response_ids=list(range(n_tokens)), behavior_logprobs=torch.zeros(n_tokens),
        version=version, min_version=version, max_version=version, finish_reason=FinishReason.STOP,
    )


def test_batch_accounting():
    batch = Batch(step=5, groups=[[make_traj(0, 0, 4, 3), make_traj(0, 1, 4, 2)], [make_traj(1, 0, 3, 1)]])
    assert batch.versions == [4, 3]
    assert batch.max_staleness == 2
    assert batch.num_tokens == 6
    assert len(batch.trajectories) == 3


@pytest.mark.parametrize("kwargs, key", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
])
def test_sampling_params_reject_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SamplingParams(**kwargs)


def test_prompt_group_rejects_bad_n_and_empty_prompt():
    with pytest.raises(ValueError, match="num_samples"):
        PromptGroup(group_id=0, prompt_id=0, prompt_ids=[1], num_samples=0)
    with pytest.raises(ValueError, match="empty prompt"):
        PromptGroup(group_id=0, prompt_id=0, prompt_ids=[], num_samples=1)


def test_registry_names_known_entries_and_resolves_import_paths():
    reg: Registry[object] = Registry("loss")
    reg.register("grpo")(object)
    with pytest.raises(ValueError, match="registered: grpo"):
        reg.get("nope")
    assert reg.get("os.path:join") is import_object("os.path.join")
    with pytest.raises(ValueError, match="no attribute"):
        reg.get("os.path:nope")

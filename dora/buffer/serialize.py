"""Trajectories to and from checkpoint form: a JSON-able dict plus named tensors (never pickle).

Used by `TrajectoryBuffer.state_dict` so that a resumed run keeps its finished-but-unconsumed
rollouts. Tensors go to a flat `{name: tensor}` dict the checkpointer writes with safetensors;
the JSON side refers to them by name.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from dora.types import FinishReason, Trajectory

_TENSOR_FIELDS = ("behavior_logprobs", "token_rewards", "routing")
_PLAIN_FIELDS = ("group_id", "sample_idx", "prompt_id", "prompt_ids", "response_ids", "version", "min_version",
                 "max_version", "reward", "engine_id", "queued_at", "first_token_at", "finished_at")


def trajectory_to_state(traj: Trajectory, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[str, Any] = {name: getattr(traj, name) for name in _PLAIN_FIELDS}
    state["finish_reason"] = traj.finish_reason.value
    try:
        json.dumps(traj.reward_info)
    except TypeError as e:
        raise TypeError(f"group {traj.group_id} sample {traj.sample_idx}: reward_info must be JSON-serialisable to be"
                        f" checkpointed ({e})") from None
    state["reward_info"] = traj.reward_info
    for name in _TENSOR_FIELDS:
        value = getattr(traj, name)
        if value is not None:
            key = f"traj.{traj.group_id}.{traj.sample_idx}.{name}"
            tensors[key] = value.detach().cpu().contiguous()
            state[name] = key
        else:
            state[name] = None
    return state


def trajectory_from_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Trajectory:
    kwargs = {name: state[name] for name in _PLAIN_FIELDS}
    for name in _TENSOR_FIELDS:
        key = state[name]
        if key is not None and key not in tensors:
            raise ValueError(f"checkpoint lacks tensor {key!r} (group {state['group_id']} sample {state['sample_idx']})")
        kwargs[name] = tensors[key] if key is not None else None
    return Trajectory(**kwargs, finish_reason=FinishReason(state["finish_reason"]),
                      reward_info=dict(state["reward_info"]))

"""Checkpoints: everything a resumed run needs, as safetensors + JSON (never pickle).

A checkpoint folder `step_{N}/` (N = train steps done = the version being served) holds:
- `model/`: the policy in Hugging Face layout (loads in dora, transformers, vLLM);
- `trainer.json` + `trainer.safetensors`: optimizer and backend counters;
- `scheduler.json` + `scheduler.safetensors`: the prompt cursor, admitted-but-unconsumed groups
  and the finished trajectories waiting in the buffer (groups running at save time are regenerated
  on resume: nothing is lost or trained twice);
- `meta.json`: step, version, the resolved config.

Nested state (optimizer state dicts with int keys, lists, tensors) is flattened into a JSON skeleton
whose tensor leaves name entries of the safetensors file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """JSON skeleton of `obj`; tensors move to `tensors` under unique names. Tensors that view the
    same memory the same way (tied embeddings and lm_head) are stored once and named at every place:
    safetensors refuses to write shared memory, and a reload then restores them equal."""
    return _flatten(obj, tensors, prefix, {})


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str, views: dict[tuple, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        view = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape),
                obj.stride(), obj.dtype)
        if view not in views:
            views[view] = f"{prefix}.{len(tensors)}"
            tensors[views[view]] = obj.detach().cpu().contiguous()
        return {_TENSOR: views[view]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and _TENSOR not in obj and _DICT not in obj:
            return {k: _flatten(v, tensors, prefix, views) for k, v in obj.items()}
        return {_DICT: [[k, _flatten(v, tensors, prefix, views)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, tensors, prefix, views) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, prefix, views) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} ({obj!r:.80}): only tensors, containers and scalars")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _DICT in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj[_DICT]}
        if _TUPLE in obj:
            return tuple(unflatten_state(v, tensors) for v in obj[_TUPLE])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def save_state(folder: Path, name: str, state: Any, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """`name.json` + `name.safetensors`; `tensors` are extra named tensors the skeleton refers to."""
    all_tensors = dict(tensors or {})
    skeleton = flatten_state(state, all_tensors)
    save_file(all_tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(folder: Path, name: str) -> tuple[Any, dict[str, torch.Tensor]]:
    json_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    for path in (json_path, tensor_path):
        if not path.exists():
            raise ValueError(f"checkpoint {folder} lacks {path.name}")
    tensors = load_file(str(tensor_path))
    return unflatten_state(json.loads(json_path.read_text()), tensors), tensors


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}"


def prune(run_dir: Path, keep: int) -> None:
    folders = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    for old in folders[:-keep]:
        shutil.rmtree(old)


def latest_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint folder, else the newest `step_*` inside its checkpoints/."""
    if (path / "meta.json").exists():
        return path
    folders = sorted((path / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    if not folders:
        raise ValueError(f"resume={path}: neither a checkpoint folder (meta.json) nor a run folder with checkpoints/")
    return folders[-1]

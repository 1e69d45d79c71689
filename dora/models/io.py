"""Model folders in Hugging Face layout: `config.json` + safetensors, per-expert weights on disk.

dora's engine, transformers and vLLM all load the same folder. On disk the weights are named and
split exactly as Hugging Face checkpoints store them (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`
[I, D], `up_proj` [I, D], `down_proj` [D, I]); in memory dora stacks each layer's experts as
transformers 5 does (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I]), which is
also the naming of a published `PolicyVersion`. `to_hf_state_dict` / `from_hf_state_dict` convert
between the two and are public because the vLLM engine loads weights in the on-disk naming.

Loading accepts a local Qwen3-MoE, Qwen3, Qwen2 or Llama folder, single-file or sharded
(`model.safetensors.index.json`). Files are only read as safetensors: nothing is ever unpickled.
Every missing, unexpected or mis-shaped weight is reported together in one ValueError.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dora.models.config import DTYPES, ModelConfig
from dora.models.model import DecoderLM

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Non-parameter tensors some older checkpoints carry (RoPE tables); recomputed, so skipped.
_IGNORED_ON_DISK = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_STACKED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")
_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


# ---------------------------------------------------------------------------- naming conversion

def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """dora naming -> Hugging Face on-disk naming (experts split per expert; the tied lm_head
    dropped when `cfg.tie_word_embeddings`). Split tensors are views of the stacked ones."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        m = _STACKED_EXPERTS.fullmatch(name)
        if m is None:
            if not (name == "lm_head.weight" and cfg is not None and cfg.tie_word_embeddings):
                out[name] = t
            continue
        prefix, kind = m.groups()
        if kind == "gate_up_proj":
            gate_EID, up_EID = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate_EID[e]
                out[f"{prefix}.{e}.up_proj.weight"] = up_EID[e]
        else:
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
    return out


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig,
                       *, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Hugging Face naming (per-expert, or transformers-5 stacked) -> dora naming, after checking
    every name and shape against `cfg` (one ValueError listing all problems, naming `source`)."""
    check_hf_shapes({k: tuple(v.shape) for k, v in hf_state_dict.items()}, cfg, source=source)
    return _convert_checked(hf_state_dict, cfg)


def _convert_checked(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, list[torch.Tensor | None]]] = {}
    for name, t in hf_state_dict.items():
        if _IGNORED_ON_DISK.fullmatch(name):
            continue
        m = _PER_EXPERT.fullmatch(name)
        if m is None:
            out[name] = t
            continue
        prefix, e, kind = m.groups()
        experts.setdefault(prefix, {k: [None] * cfg.num_experts for k in ("gate_proj", "up_proj", "down_proj")})
        experts[prefix][kind][int(e)] = t
    for prefix, parts in experts.items():
        gate_EID, up_EID = torch.stack(parts["gate_proj"]), torch.stack(parts["up_proj"])  # type: ignore[arg-type]
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate_EID, up_EID], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack(parts["down_proj"])  # type: ignore[arg-type]
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """dora-naming parameter shapes of a model with this config (built on the meta device)."""
    with torch.device("meta"):
        model = DecoderLM(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_hf_shapes(found: dict[str, tuple[int, ...]], cfg: ModelConfig, *, source: str,
                    files: dict[str, str] | None = None) -> None:
    """Compare on-disk names/shapes with what `cfg` needs; raise one ValueError listing every
    missing, unexpected and mis-shaped weight. Either on-disk expert layout is accepted per layer."""
    shapes = expected_shapes(cfg)
    expected_split = {k: tuple(v.shape) for k, v in
                      to_hf_state_dict({n: torch.empty(s, device="meta") for n, s in shapes.items()}, cfg).items()}
    # A layer stored stacked (transformers-5 in-memory naming) is accepted as is.
    stacked_prefixes = {m.group(1) for name in found if (m := _STACKED_EXPERTS.fullmatch(name))}
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in expected_split.items():
        m = _PER_EXPERT.fullmatch(name)
        if m is None or m.group(1) not in stacked_prefixes:
            expected[name] = shape
    for prefix in stacked_prefixes:
        for kind in ("gate_up_proj", "down_proj"):
            name = f"{prefix}.{kind}"
            if name in shapes:
                expected[name] = shapes[name]
    if cfg.tie_word_embeddings:
        found = {k: v for k, v in found.items() if k != "lm_head.weight"}  # transformers ignores it too

    def where(name: str) -> str:
        return f" in {files[name]}" if files and name in files else ""

    missing = [f"{n} {list(s)}" for n, s in expected.items() if n not in found]
    unexpected = [f"{n} {list(s)}{where(n)}" for n, s in found.items()
                  if n not in expected and not _IGNORED_ON_DISK.fullmatch(n)]
    mismatched = [f"{n}: expected {list(expected[n])}, found {list(s)}{where(n)}"
                  for n, s in found.items() if n in expected and tuple(s) != expected[n]]
    if missing or unexpected or mismatched:
        lines = [f"{source}: weights do not match the config ({cfg.model_type.value}, "
                 f"{cfg.num_hidden_layers} layers, {cfg.num_experts} experts)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in sorted(items))
        raise ValueError("\n".join(lines))


# ---------------------------------------------------------------------------- folders

def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: not a model folder (no config.json)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    return ModelConfig.from_hf_dict(d, source=str(path))


def _weight_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index} names shard files that do not exist: {absent}")
        return files
    if (folder / SAFETENSORS_FILE).is_file():
        return [folder / SAFETENSORS_FILE]
    other = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    hint = f" (found {other}: pickle-based checkpoints are never loaded; convert them to safetensors)" if other else ""
    raise ValueError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}{hint}")


def load_state_dict(folder: str | os.PathLike, cfg: ModelConfig | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The folder's weights in dora naming, checked against its config (or `cfg`), cast to `dtype`."""
    folder = Path(folder)
    cfg = cfg or load_config(folder)
    files = _weight_files(folder)
    found: dict[str, tuple[int, ...]] = {}
    file_of: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in file_of:
                        raise ValueError(f"{folder}: weight {name} is stored twice ({file_of[name]} and {path.name})")
                    found[name] = tuple(f.get_slice(name).get_shape())
                    file_of[name] = path.name
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    check_hf_shapes(found, cfg, source=str(folder), files=file_of)
    hf_sd: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if cfg.tie_word_embeddings and name == "lm_head.weight":
                    continue
                t = f.get_tensor(name)
                hf_sd[name] = t if dtype is None else t.to(dtype)
    return _convert_checked(hf_sd, cfg)


def load_model(folder: str | os.PathLike, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> DecoderLM:
    """A DecoderLM holding the folder's weights, in `dtype` (default: the config's) on `device`."""
    cfg = load_config(folder)
    dtype = dtype or cfg.torch_dtype
    sd = load_state_dict(folder, cfg, dtype=dtype)
    with torch.device("meta"):  # no throw-away random init of a large checkpoint
        model = DecoderLM(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    return model.to(device)


def save_model(model: DecoderLM, folder: str | os.PathLike, tokenizer: Any = None,
               max_shard_bytes: int | None = None) -> Path:
    """Write `model` as a Hugging Face folder (config.json, generation_config.json, safetensors,
    sharded with an index when larger than `max_shard_bytes`) plus the tokenizer if given."""
    cfg = model.config
    if tokenizer is not None and getattr(tokenizer, "vocab_size", 0) > cfg.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                         f"vocab_size ({cfg.vocab_size}): its ids would index past the embeddings")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_sd = {k: v.detach().to("cpu").contiguous().clone()
             for k, v in to_hf_state_dict(model.state_dict(), cfg).items()}
    dtypes = {t.dtype for t in hf_sd.values()}
    dtype_name = next((n for n, d in DTYPES.items() if dtypes == {d}), cfg.dtype)
    config = cfg.to_hf_dict() | {"dtype": dtype_name}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_weights(hf_sd, folder, max_shard_bytes)
    if tokenizer is not None:
        if not callable(getattr(tokenizer, "save", None)):
            raise TypeError(f"tokenizer {type(tokenizer).__name__} has no save(folder) method")
        tokenizer.save(folder)
    return folder


def _write_weights(hf_sd: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None) -> None:
    for stale in [folder / SAFETENSORS_INDEX, *folder.glob("model-*-of-*.safetensors"), folder / SAFETENSORS_FILE]:
        stale.unlink(missing_ok=True)  # a folder re-saved with another sharding must not keep old files
    metadata = {"format": "pt"}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(hf_sd):
        nbytes = hf_sd[name].numel() * hf_sd[name].element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = hf_sd[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / SAFETENSORS_FILE, metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in hf_sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

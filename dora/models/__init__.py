"""The built-in Qwen3-MoE-style decoder and loaders for local Hugging Face checkpoints.

- `config`: `ModelConfig` (architecture, presets, HF `config.json` conversion)
- `ops`: the pure functions both the model and the torch engine compute with
- `model`: `DecoderLM`, the trainable module (HF parameter names, routing record and replay)
- `io`: model folders in Hugging Face layout (save, load, naming conversion)
"""

from dora.models.config import ModelConfig, ModelType
from dora.models.io import from_hf_state_dict, load_config, load_model, load_state_dict, save_model, to_hf_state_dict
from dora.models.model import DecoderLM, ModelOutput

__all__ = [
    "DecoderLM", "ModelConfig", "ModelOutput", "ModelType", "from_hf_state_dict", "load_config", "load_model",
    "load_state_dict", "save_model", "to_hf_state_dict",
]

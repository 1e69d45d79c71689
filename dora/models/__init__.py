"""The built-in Qwen3-MoE-style decoder and loaders for local Hugging Face checkpoints."""

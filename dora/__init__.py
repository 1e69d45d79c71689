"""dora: asynchronous RL for language models with multi-version streaming rollout."""

__version__ = "0.1.0"

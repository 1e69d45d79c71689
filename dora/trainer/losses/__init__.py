"""RL losses, one file each, registered by name in `LOSSES` (grpo, ppo)."""

from dora.trainer.losses.base import LOSSES, Loss, LossInputs, LossOutput
from dora.trainer.losses import grpo as _grpo  # noqa: F401  (registers "grpo")
from dora.trainer.losses import ppo as _ppo  # noqa: F401  (registers "ppo")

__all__ = ["LOSSES", "Loss", "LossInputs", "LossOutput"]

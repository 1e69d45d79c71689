"""The PPO critic: a small MLP on the policy's final hidden state, one value per position.

It shares the policy's trunk (no second model in memory); by default the value loss does not
back-propagate into the trunk (`trainer.value_trunk_grad=false`), so the policy is only shaped by
the policy loss. It is optimised alongside the policy in its own param group (`trainer.value_lr`)
and is not part of the published weights.

Shape legend: N = tokens, D = hidden size, H = value head hidden size.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int, head_hidden_size: int = 0, *, seed: int = 0) -> None:
        super().__init__()
        width = head_hidden_size or hidden_size
        self.proj = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) / hidden_size ** 0.5)
            self.proj.bias.zero_()
            # Zero output layer: the critic starts at V = 0 and learns from the returns.
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N] float32 values."""
        return self.out(torch.tanh(self.proj(hidden_ND.to(self.proj.weight.dtype)))).squeeze(-1).float()

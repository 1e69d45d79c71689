"""Trainer backends: where the parameters live and how gradients become an update.

The `Trainer` (algorithm: micro-batches, losses, metrics) talks to a `TrainerBackend` (placement:
device, sharding, optimizer, LR schedule) through a small protocol: forward through `backend.policy`
(and `backend.value_head`), `backward(loss)` per micro-batch (gradients accumulate), `step()` once per
update, `publish_state_dict()` for the weight-sync channel, `state_dict()` / `load_state_dict()` for
checkpoints. `TorchBackend` is the plain single-device implementation (CPU or one CUDA device);
sharded backends (FSDP2, DeepSpeed) plug in behind the same protocol.

`step()` measures the global grad norm first: a non-finite norm skips the update (gradients are
dropped, parameters, optimizer state and LR schedule untouched) and says so in the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dora.trainer.config import LRSchedule, TrainerConfig


@dataclass(slots=True)
class StepResult:
    grad_norm: float
    """Global grad norm before clipping (nan/inf when the update was skipped for it)."""
    skipped: bool
    lr: float
    """Learning rate of the policy param group used for this update."""


@runtime_checkable
class TrainerBackend(Protocol):
    device: torch.device
    policy: nn.Module
    """Call it for forward passes (a sharded backend hands out its wrapped module)."""
    value_head: nn.Module | None

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss."""

    def step(self) -> StepResult:
        """Clip, apply one optimizer update (or skip it on a non-finite grad norm), clear gradients."""

    def zero_grad(self) -> None:
        """Drop accumulated gradients without updating (e.g. after a non-finite loss)."""

    def publish_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights in the model's state_dict naming: detached, contiguous, on the CPU."""

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: model, value head, optimizer, schedule, update counter."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def lr_factor(update: int, cfg: TrainerConfig) -> float:
    """Multiplier of the base LR at optimizer update `update` (0-based): linear warm-up, then
    constant / linear / cosine decay to `min_lr_ratio` at `total_steps`."""
    if update < cfg.warmup_steps:
        return (update + 1) / cfg.warmup_steps
    if cfg.lr_schedule is LRSchedule.constant:
        return 1.0
    progress = min(1.0, (update - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    if cfg.lr_schedule is LRSchedule.linear:
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


class TorchBackend:
    """One device, AdamW, global grad-norm clipping, LR schedule, gradient accumulation."""

    def __init__(self, policy: nn.Module, cfg: TrainerConfig, *, value_head: nn.Module | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.policy = policy.to(self.device)
        self.value_head = None if value_head is None else value_head.to(self.device)
        self.policy.train()
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": cfg.lr, "base_lr": cfg.lr}]
        if self.value_head is not None:
            value_lr = cfg.lr if cfg.value_lr is None else cfg.value_lr
            groups.append({"params": list(self.value_head.parameters()), "lr": value_lr, "base_lr": value_lr})
        self._params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           weight_decay=cfg.weight_decay, fused=self.device.type == "cuda")
        self.num_updates = 0
        """Optimizer updates applied (skipped ones excluded); drives the LR schedule."""
        self.num_skipped = 0
        self._set_lr()

    def _set_lr(self) -> None:
        factor = lr_factor(self.num_updates, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> StepResult:
        lr = self.optimizer.param_groups[0]["lr"]
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            raise RuntimeError("step() without gradients: call backward() on at least one micro-batch first")
        grad_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if not torch.isfinite(grad_norm):
            self.zero_grad()
            self.num_skipped += 1
            return StepResult(grad_norm=float(grad_norm), skipped=True, lr=lr)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(grads, self.cfg.max_grad_norm, grad_norm)
        self.optimizer.step()
        self.zero_grad()
        self.num_updates += 1
        self._set_lr()
        return StepResult(grad_norm=float(grad_norm), skipped=False, lr=lr)

    def publish_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self.policy.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "value_head": None if self.value_head is None else self.value_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"policy", "optimizer", "num_updates"} - state.keys()
        if missing:
            raise ValueError(f"trainer backend state lacks {sorted(missing)}")
        if (state.get("value_head") is None) != (self.value_head is None):
            raise ValueError("trainer backend state and this trainer disagree on having a value head "
                             "(checkpoint from a different algorithm.loss?)")
        self.policy.load_state_dict(state["policy"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_updates = int(state["num_updates"])
        self.num_skipped = int(state.get("num_skipped", 0))
        self._set_lr()

"""Train/inference routing mismatch: how often the trainer's router would pick other experts than
the engine recorded (R3, arXiv 2510.11370).

With routing replay on, the MoE layers use the recorded ids, so the ids a forward reports are the
recorded ones. The router's own choice is measured alongside, for free: a forward hook on each MoE
layer's router (`mlp.gate`) keeps the top-k of its logits (no extra forward pass). With replay off
the same hook measures how far the trainer's routing drifted from the engine's.

Shape legend: B = rows, S = positions, L = MoE layers, K = experts per token, N = B * S, E = experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class RouterTopkProbe:
    """Context manager recording each MoE router's own top-k during one forward pass."""

    def __init__(self, model: nn.Module, top_k: int) -> None:
        self.top_k = top_k
        self._routers = [layer.mlp.gate for layer in model.model.layers if getattr(layer, "is_moe", False)]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._topk_NK: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, args: tuple, logits_NE: torch.Tensor) -> None:
        # Softmax is monotonic: the top-k of the logits is the router's top-k.
        self._topk_NK.append(torch.topk(logits_NE.detach().float(), self.top_k, dim=-1).indices)

    def __enter__(self) -> RouterTopkProbe:
        self._topk_NK = []
        self._handles = [router.register_forward_hook(self._hook) for router in self._routers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def topk_BSLK(self, batch: int, seq: int) -> torch.Tensor | None:
        """The recorded router top-k of the last forward, [B, S, L, K] int64 (None for dense models)."""
        if not self._topk_NK:
            return None
        assert len(self._topk_NK) == len(self._routers), "probe spanned more than one forward pass"
        return torch.stack(self._topk_NK, dim=1).view(batch, seq, len(self._topk_NK), self.top_k)


@dataclass(slots=True)
class RoutingMismatch:
    num_tokens: int
    """Real (unpadded) tokens compared."""
    tokens_differing: int
    """Tokens whose expert set differs from the record in at least one MoE layer."""
    num_token_layers: int
    token_layers_differing: int
    """(token, layer) pairs whose expert set differs."""


def routing_mismatch(recorded_BSLK: torch.Tensor, recomputed_BSLK: torch.Tensor,
                     attention_mask_BS: torch.Tensor) -> RoutingMismatch:
    """Compare expert *sets* (order within the top-k is irrelevant to the layer output)."""
    if recorded_BSLK.shape != recomputed_BSLK.shape:
        raise ValueError(f"routing shapes differ: recorded {list(recorded_BSLK.shape)} vs "
                         f"recomputed {list(recomputed_BSLK.shape)}")
    recorded_sorted = recorded_BSLK.long().sort(dim=-1).values
    recomputed_sorted = recomputed_BSLK.to(recorded_sorted.device).long().sort(dim=-1).values
    differs_BSL = (recorded_sorted != recomputed_sorted).any(dim=-1)
    real_BS = attention_mask_BS.to(differs_BSL.device).bool()
    differs_BSL = differs_BSL & real_BS[..., None]
    num_tokens = int(real_BS.sum())
    return RoutingMismatch(num_tokens=num_tokens, tokens_differing=int(differs_BSL.any(dim=-1).sum()),
                           num_token_layers=num_tokens * differs_BSL.shape[-1],
                           token_layers_differing=int(differs_BSL.sum()))

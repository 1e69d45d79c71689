"""The torch engine's preallocated per-slot state: KV cache, token history, log-probs, routing record.

Where it sits: `torch_engine` owns one `SlotCache`; the scheduler hands each running sequence a
slot (`SlotAllocator`), the forward pass writes keys/values at (slot, position) and reads them back
for attention, and a finishing sequence's trajectory is sliced out of its slot's rows.

Everything is allocated once, at engine construction, for `max_num_seqs` slots of `max_model_len`
positions, so a step never allocates cache memory. Slots are handed out lowest-first, which keeps
the running slots packed at the front: decode attention reads `k[:num_slots_in_use, :max_len]` as a
view, with no gather.

Shape legend: L layers, S slots, M max_model_len positions, G key/value heads, C = 2G, Dh head dim,
Lm MoE layers, K experts per token.
"""

from __future__ import annotations

import heapq

import torch


class SlotCache:
    """Per-slot tensors indexed by (slot, position)."""

    def __init__(self, *, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 num_moe_layers: int, top_k: int, routing_dtype: torch.dtype, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        G = num_kv_heads
        self.kv_LSMCD = torch.zeros(num_layers, num_slots, max_len, 2 * G, head_dim, dtype=dtype, device=device)
        """Keys (channels [0, G)) then values ([G, 2G)) of every (layer, slot, position): a token's keys
        and values are one row, written by one index_copy."""
        self.keys_SMGD = [self.kv_LSMCD[i, :, :, :G] for i in range(num_layers)]
        """Per layer, views of the keys and of the values (precomputed: they are read every step)."""
        self.values_SMGD = [self.kv_LSMCD[i, :, :, G:] for i in range(num_layers)]
        self._kv_rows = [self.kv_LSMCD[i].view(num_slots * max_len, 2 * G, head_dim) for i in range(num_layers)]
        self.tokens_SM = torch.zeros(num_slots, max_len, dtype=torch.long, device=device)
        """Prompt then response token ids of each slot's sequence."""
        self.logprobs_SM = torch.zeros(num_slots, max_len, dtype=torch.float32, device=device)
        """Behavior log-prob of the token at each position (response positions only are meaningful)."""
        self.routing_SMLK = (torch.zeros(num_slots, max_len, num_moe_layers, top_k, dtype=routing_dtype,
                                         device=device) if num_moe_layers else None)
        """Expert ids chosen for the token fed at each position."""

    @property
    def num_bytes(self) -> int:
        tensors = [self.kv_LSMCD, self.tokens_SM, self.logprobs_SM]
        if self.routing_SMLK is not None:
            tensors.append(self.routing_SMLK)
        return sum(t.numel() * t.element_size() for t in tensors)

    def flat_index(self, slot_N: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
        """Row of (slot, position) in the caches viewed as [S * M, ...]."""
        return slot_N * self.max_len + pos_N

    def write_kv(self, layer: int, flat_N: torch.Tensor, kv_NCD: torch.Tensor) -> None:
        """Keys then values [N, 2G, Dh] of the fed tokens, at their flat (slot, position) rows."""
        self._kv_rows[layer].index_copy_(0, flat_N, kv_NCD)

    def write_routing(self, flat_N: torch.Tensor, ids_NLK: torch.Tensor) -> None:
        assert self.routing_SMLK is not None
        self.routing_SMLK.view(-1, *ids_NLK.shape[1:]).index_copy_(0, flat_N, ids_NLK.to(self.routing_SMLK.dtype))

    def copy_prefix(self, src_slot: int, dst_slots: list[int], length: int) -> None:
        """Share a computed prompt: copy positions [0, length) of one slot into other slots."""
        if not dst_slots:
            return
        dst = torch.tensor(dst_slots, dtype=torch.long, device=self.tokens_SM.device)
        self.kv_LSMCD[:, dst, :length] = self.kv_LSMCD[:, src_slot:src_slot + 1, :length]
        self.tokens_SM[dst, :length] = self.tokens_SM[src_slot, :length]
        if self.routing_SMLK is not None:
            self.routing_SMLK[dst, :length] = self.routing_SMLK[src_slot, :length]


class SlotAllocator:
    """Free slots handed out lowest-first (keeps the running slots packed at the front)."""

    def __init__(self, num_slots: int) -> None:
        self._free = list(range(num_slots))
        heapq.heapify(self._free)
        self._num_slots = num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_slots - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} slots, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(count)]

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

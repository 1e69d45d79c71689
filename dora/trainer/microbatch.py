"""Token-budget micro-batches: how one optimizer update's trajectories are cut into forward passes.

A trajectory is fed as `prompt + response[:-1]` (the last sampled token is never fed, matching the
engine's routing record) and scored on its response tokens: response token j is predicted at
position P - 1 + j. Trajectories are sorted by length (longest first) and cut into right-padded
micro-batches of at most `max_tokens` padded tokens (rows x longest row) at the points that waste
the least padding; a trajectory longer than the budget gets a micro-batch of its own (never dropped or
truncated).

Each micro-batch also carries the per-token fields the loss needs (behavior log-probs, advantages,
aggregation weights, ...) concatenated in the same token order as the scored positions, so the loss
sees flat [N] tensors. Normalisation lives in the weights (computed over the whole update), so the
split changes memory, never the gradient.

Shape legend: B = rows of a micro-batch, S = padded sequence length, N = scored response tokens of
the micro-batch, L = MoE layers, K = experts per token, T = response tokens of one trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dora.types import Trajectory


@dataclass(slots=True)
class MicroBatch:
    traj_indices: list[int]
    """Index of each row's trajectory in the update's trajectory list (row order)."""
    input_ids_BS: torch.Tensor
    """int64, prompt + response[:-1] per row, right-padded with 0."""
    attention_mask_BS: torch.Tensor
    """int64, 1 = real token."""
    position_ids_BS: torch.Tensor
    rows_N: torch.Tensor
    """int64, row of each scored token."""
    cols_N: torch.Tensor
    """int64, position whose output predicts each scored token."""
    targets_N: torch.Tensor
    """int64, the sampled response tokens."""
    lengths: list[int]
    """Response length of each row (tokens of row r are a contiguous slice of the N axis)."""
    replay_BSLK: torch.Tensor | None = None
    """Recorded expert ids (as recorded, compact dtype), padded with expert 0 (padding is never scored)."""
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-token [N] float32 fields, e.g. "behavior_logprobs", "advantages", "weights"."""

    @property
    def num_tokens(self) -> int:
        """Scored (response) tokens."""
        return int(self.targets_N.numel())

    @property
    def num_padded_tokens(self) -> int:
        return int(self.input_ids_BS.numel())

    def to(self, device: torch.device | str) -> MicroBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return MicroBatch(self.traj_indices, move(self.input_ids_BS), move(self.attention_mask_BS),
                          move(self.position_ids_BS), move(self.rows_N), move(self.cols_N), move(self.targets_N),
                          self.lengths, move(self.replay_BSLK), {k: move(v) for k, v in self.fields.items()})


def fed_length(traj: Trajectory) -> int:
    """Tokens fed to the model for one trajectory: P + T - 1."""
    return len(traj.prompt_ids) + traj.num_tokens - 1


# What one more micro-batch costs (op dispatch, one more pass over the weights), in padded tokens.
# Tiny-recipe train steps (128 sequences of 20-110 tokens, budget 4096, one core): 0.67 s with the
# greedy fill this replaced (2 micro-batches, 54% padding), 0.58 s at the fewest micro-batches, 0.49-0.50 s
# at 64-128 (5-7 micro-batches), 0.53 s at 32, 0.69 s at 0 (31 micro-batches).
MICROBATCH_OVERHEAD_TOKENS = 128


def plan_microbatches(fed_lengths: Sequence[int], max_tokens: int, *,
                      overhead_tokens: int = MICROBATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Group indices into micro-batches of at most `max_tokens` padded tokens, longest first.

    Sequences sorted by length (longest first, ties in index order) are cut into consecutive runs
    that minimise padded tokens (rows x longest row) + `overhead_tokens` per micro-batch: an exact
    dynamic programme over the cut points, so rows of very different lengths are not padded to one
    another just because the budget had room. A sequence over the budget goes alone. Deterministic.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_microbatch must be >= 1, got {max_tokens}")
    order = sorted(range(len(fed_lengths)), key=lambda i: (-fed_lengths[i], i))
    lengths = np.array([fed_lengths[i] for i in order], dtype=np.int64)
    n = len(order)
    # cost[j]: cheapest plan of the first j sorted sequences; cut[j]: where its last micro-batch starts.
    cost, cut = np.zeros(n + 1, dtype=np.int64), np.zeros(n + 1, dtype=np.int64)
    first = 0  # earliest start that keeps the last micro-batch within budget; only moves forward with j
    for j in range(1, n + 1):
        while first < j - 1 and (j - first) * lengths[first] > max_tokens:
            first += 1
        starts = np.arange(first, j)
        # The last micro-batch is lengths[i:j]; its first (longest) row sets the padded length.
        totals = cost[first:j] + (j - starts) * lengths[first:j] + overhead_tokens
        best = int(np.argmin(totals))  # ties: the earliest start, i.e. fewer micro-batches
        cost[j], cut[j] = totals[best], first + best
    plans: list[list[int]] = []
    j = n
    while j > 0:
        start = int(cut[j])
        plans.append(order[start:j])
        j = start
    return plans[::-1]


def build_microbatch(trajectories: Sequence[Trajectory], traj_indices: list[int],
                     fields: Mapping[str, Sequence[torch.Tensor]], *, require_routing: bool = False) -> MicroBatch:
    """Pad the chosen trajectories into one micro-batch; `fields[name][i]` is trajectory i's [T] tensor.

    Routing records are stacked into `replay_BSLK` when every row has one (for replay or for the
    mismatch metric); `require_routing` turns a missing record into an error.
    """
    rows = [trajectories[i] for i in traj_indices]
    with_routing = require_routing or all(t.routing is not None for t in rows)
    seq_len = max(fed_length(t) for t in rows)
    input_ids_BS = torch.zeros(len(rows), seq_len, dtype=torch.long)
    attention_mask_BS = torch.zeros(len(rows), seq_len, dtype=torch.long)
    rows_N, cols_N, targets_N = [], [], []
    replay_BSLK = None
    for r, traj in enumerate(rows):
        fed = traj.prompt_ids + traj.response_ids[:-1]
        input_ids_BS[r, :len(fed)] = torch.tensor(fed, dtype=torch.long)
        attention_mask_BS[r, :len(fed)] = 1
        num_prompt, num_response = len(traj.prompt_ids), traj.num_tokens
        rows_N.append(torch.full((num_response,), r, dtype=torch.long))
        cols_N.append(torch.arange(num_prompt - 1, num_prompt - 1 + num_response))
        targets_N.append(torch.tensor(traj.response_ids, dtype=torch.long))
        if with_routing:
            routing = traj.routing
            if routing is None:
                raise ValueError(f"group {traj.group_id} sample {traj.sample_idx} has no routing record but "
                                 "routing replay is on (set algorithm.routing_replay=false to train without it)")
            if routing.dim() != 3 or routing.shape[0] != len(fed):
                raise ValueError(f"group {traj.group_id} sample {traj.sample_idx}: routing has shape "
                                 f"{list(routing.shape)}, expected [P + T - 1 = {len(fed)}, L, K]")
            if replay_BSLK is None:
                replay_BSLK = torch.zeros(len(rows), seq_len, *routing.shape[1:], dtype=routing.dtype)
            replay_BSLK[r, :len(fed)] = routing
    position_ids_BS = torch.arange(seq_len).expand(len(rows), seq_len).contiguous()
    token_fields = {name: torch.cat([values[i].reshape(-1).float() for i in traj_indices]) for name, values in fields.items()}
    return MicroBatch(list(traj_indices), input_ids_BS, attention_mask_BS, position_ids_BS, torch.cat(rows_N),
                      torch.cat(cols_N), torch.cat(targets_N), [t.num_tokens for t in rows], replay_BSLK, token_fields)


def build_microbatches(trajectories: Sequence[Trajectory], fields: Mapping[str, Sequence[torch.Tensor]], *,
                       max_tokens: int, require_routing: bool = False) -> list[MicroBatch]:
    """All micro-batches of one update, covering every trajectory exactly once."""
    plans = plan_microbatches([fed_length(t) for t in trajectories], max_tokens)
    return [build_microbatch(trajectories, plan, fields, require_routing=require_routing) for plan in plans]

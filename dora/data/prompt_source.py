"""PromptSource: the first stage of the flow (dataset -> PromptSource -> RolloutPool).

It serves the training split as `PromptGroup`s of `n` samples, in a seeded shuffle per epoch, from a
cursor that `state_dict()` / `load_state_dict()` save and restore exactly (a resumed run continues
with the very next prompt, across epoch boundaries). The rollout pool hands back prompts it must
regenerate with `requeue(prompt_id)`: they come out first, before any new prompt, with a new
`group_id` — compute is lost, never the prompt.

Ids: `prompt_id` is stable per dataset row — the row's index in the training split, and
`num_train + j` for held-out row j — and `group_id` is unique per admission (a counter that is
part of the saved state).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from dora.data.config import DataConfig
from dora.data.datasets import DatasetSplits, Row, build_dataset
from dora.data.tokenizer import Tokenizer
from dora.types import PromptGroup

_STATE_VERSION = 1


class PromptSource:
    def __init__(self, config: DataConfig, tokenizer: Tokenizer, dataset: DatasetSplits | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.dataset = dataset if dataset is not None else build_dataset(config)
        self.num_train = len(self.dataset.train)
        # Tokenize everything up front so a prompt that is too long fails at start, not mid-run.
        self._train_ids = [self._encode(row, i, "train") for i, row in enumerate(self.dataset.train)]
        self._eval_ids = [self._encode(row, i, "held-out") for i, row in enumerate(self.dataset.eval)]
        self._epoch = 0
        self._position = 0  # next index into this epoch's order
        self._next_group_id = 0
        self._num_issued = 0
        self._requeued: deque[int] = deque()
        self._order = self._epoch_order(0)

    # ---- serving ---------------------------------------------------------------------------

    def next_group(self) -> PromptGroup | None:
        """The next prompt to admit: a requeued one if any (oldest first), else the cursor's; None
        once `data.num_epochs` passes are served and nothing is requeued."""
        if self._requeued:
            prompt_id = self._requeued.popleft()
        elif self.exhausted:
            return None
        else:
            prompt_id = int(self._order[self._position])
            self._position += 1
            if self._position == self.num_train:
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order(self._epoch)
        self._num_issued += 1
        return self._group(prompt_id, self.config.n)

    def take(self, count: int) -> list[PromptGroup]:
        """Up to `count` groups (fewer only when the source is exhausted)."""
        if count < 0:
            raise ValueError(f"take(count) needs count >= 0, got {count}")
        groups = []
        while len(groups) < count and (group := self.next_group()) is not None:
            groups.append(group)
        return groups

    def __iter__(self) -> Iterator[PromptGroup]:
        while (group := self.next_group()) is not None:
            yield group

    @property
    def exhausted(self) -> bool:
        """True when `data.num_epochs` passes are served and no prompt is requeued."""
        return 0 < self.config.num_epochs <= self._epoch and not self._requeued

    def requeue(self, prompt_id: int) -> None:
        """Serve `prompt_id` again, before any new prompt (e.g. its group was aborted to be
        regenerated on a newer version). It gets a new group_id when served."""
        if not 0 <= prompt_id < self.num_train:
            raise ValueError(f"requeue: prompt_id {prompt_id} is not a training prompt (0..{self.num_train - 1})")
        self._requeued.append(prompt_id)

    @property
    def num_requeued(self) -> int:
        return len(self._requeued)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_issued(self) -> int:
        """Groups served for training so far (requeued prompts count again)."""
        return self._num_issued

    # ---- held-out split --------------------------------------------------------------------

    @property
    def heldout(self) -> list[Row]:
        return list(self.dataset.eval)

    def eval_groups(self, num_samples: int = 1) -> list[PromptGroup]:
        """One group per held-out prompt, in a fixed order. Group ids come from the same counter
        as training groups (unique per admission), so calling this is part of the saved state."""
        if num_samples < 1:
            raise ValueError(f"eval_groups(num_samples) needs num_samples >= 1, got {num_samples}")
        return [self._group(self.num_train + j, num_samples) for j in range(len(self.dataset.eval))]

    def row(self, prompt_id: int) -> Row:
        if 0 <= prompt_id < self.num_train:
            return self.dataset.train[prompt_id]
        if 0 <= prompt_id - self.num_train < len(self.dataset.eval):
            return self.dataset.eval[prompt_id - self.num_train]
        raise ValueError(f"prompt_id {prompt_id} is in neither split ({self.num_train} train,"
                         f" {len(self.dataset.eval)} held-out)")

    # ---- resumable cursor ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "seed": self.config.seed,
            "num_train": self.num_train,
            "epoch": self._epoch,
            "position": self._position,
            "next_group_id": self._next_group_id,
            "num_issued": self._num_issued,
            "requeued": list(self._requeued),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"version", "seed", "num_train", "epoch", "position", "next_group_id", "num_issued", "requeued"} - set(state)
        if missing:
            raise ValueError(f"PromptSource state lacks {sorted(missing)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"PromptSource state version {state['version']} != {_STATE_VERSION}")
        # Another seed or dataset size would silently change the order: refuse instead.
        for key, ours in (("seed", self.config.seed), ("num_train", self.num_train)):
            if state[key] != ours:
                raise ValueError(f"PromptSource state was saved with {key}={state[key]}, this source has {ours}")
        if not 0 <= state["position"] < self.num_train:
            raise ValueError(f"PromptSource state position {state['position']} outside 0..{self.num_train - 1}")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._next_group_id = int(state["next_group_id"])
        self._num_issued = int(state["num_issued"])
        self._requeued = deque(int(p) for p in state["requeued"])
        self._order = self._epoch_order(self._epoch)

    # ---- internals -------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.seed, epoch]).permutation(self.num_train)

    def _prompt_text(self, row: Row) -> str:
        return self.tokenizer.apply_chat_template(row.prompt) if self.config.use_chat_template else row.prompt

    def _encode(self, row: Row, index: int, split: str) -> list[int]:
        ids = self.tokenizer.encode(self._prompt_text(row))
        # A chat template writes its own begin-of-text token; plain prompts start with <bos>.
        if self.tokenizer.bos_token_id is not None and not self.config.use_chat_template:
            ids = [self.tokenizer.bos_token_id, *ids]
        if not ids:
            raise ValueError(f"{split} row {index} tokenizes to no tokens (prompt {row.prompt!r})")
        limit = self.config.max_prompt_length
        if limit and len(ids) > limit:
            raise ValueError(f"{split} row {index} has a {len(ids)}-token prompt, more than data.max_prompt_length="
                             f"{limit} (prompt starts {row.prompt[:60]!r})")
        return ids

    def _group(self, prompt_id: int, num_samples: int) -> PromptGroup:
        row = self.row(prompt_id)
        ids = self._train_ids[prompt_id] if prompt_id < self.num_train else self._eval_ids[prompt_id - self.num_train]
        group = PromptGroup(
            group_id=self._next_group_id,
            prompt_id=prompt_id,
            prompt_ids=list(ids),
            num_samples=num_samples,
            prompt_text=self._prompt_text(row),
            answer=row.answer,
            meta=dict(row.meta),
        )
        self._next_group_id += 1
        return group

"""`VersionController`: the deadline invariant of DESIGN.md ("Version rules"), for admission and batching.

Sits between the prompt source and the trainer: every group the pool admits is registered here
with the version it runs on, and every batch the trainer takes is planned here. It knows nothing
about engines, trajectories or time.

Notation: B = `batch_groups`, k = `max_staleness`, n = `next_step` (the next train step that will
take a batch), T = `newest_version`. A group admitted on version v has the deadline v + k.

Deadline invariant: no unconsumed group (running or finished) has a deadline < n, and for every
D >= n the unconsumed groups with deadline <= D number at most (D - n + 1) * B.

Only deadlines in [n, T + k] can be live, so every check below is O(k) (plus O(B log) to pick a
batch) -- cheap enough to run on every event.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(slots=True)
class ControlledGroup:
    group_id: int
    version: int
    deadline: int
    seq: int
    """Admission order (ties between equal deadlines go to the oldest admission)."""
    finished: bool = False


class VersionController:
    def __init__(self, max_staleness: int, batch_groups: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"rollout.max_staleness (k) must be >= 0, got {max_staleness}")
        if batch_groups < 1:
            raise ValueError(f"rollout.batch_groups (B) must be >= 1, got {batch_groups}")
        self.k = max_staleness
        self.B = batch_groups
        self.next_step = 0
        self.newest_version = 0
        self.groups: dict[int, ControlledGroup] = {}
        """Unconsumed groups (running or finished) by group_id."""
        self._per_deadline: dict[int, int] = {}
        self._finished: list[tuple[int, int, int]] = []  # heap of (deadline, seq, group_id)
        self._running: list[tuple[int, int, int]] = []
        """Heap of (deadline, seq, group_id) of running groups; entries of groups that finished, moved
        or left since are skipped lazily (`blocker` runs on every event while the trainer waits)."""
        self._next_seq = 0

    # ---- the invariant -----------------------------------------------------------------------

    def slack(self, version: int) -> int:
        """How many more groups could be admitted on `version` with the invariant still holding."""
        deadline = version + self.k
        n = self.next_step
        if deadline < n or version > self.newest_version:
            return 0
        prefix = sum(c for d, c in self._per_deadline.items() if d < deadline)
        last = max(self._per_deadline, default=deadline)
        slack = (deadline - n + 1) * self.B - prefix - self._per_deadline.get(deadline, 0)
        for d in range(deadline, last + 1):
            prefix += self._per_deadline.get(d, 0)
            slack = min(slack, (d - n + 1) * self.B - prefix)
        return max(slack, 0)

    def can_admit(self, version: int) -> bool:
        return self.slack(version) > 0

    def holds(self) -> bool:
        """The invariant, checked from scratch (for tests and assertions)."""
        prefix = 0
        for d in sorted(self._per_deadline):
            if d < self.next_step and self._per_deadline[d] > 0:
                return False
            prefix += self._per_deadline[d]
            if prefix > (d - self.next_step + 1) * self.B:
                return False
        return True

    # ---- group life cycle --------------------------------------------------------------------

    def admit(self, group_id: int, version: int, seq: int | None = None) -> ControlledGroup:
        if group_id in self.groups:
            raise ValueError(f"group {group_id} is already admitted")
        if not self.can_admit(version):
            raise ValueError(f"admitting group {group_id} on version {version} (deadline {version + self.k}) would"
                             f" break the deadline invariant at step {self.next_step}")
        if seq is None:
            seq = self._next_seq
        self._next_seq = max(self._next_seq, seq + 1)
        group = ControlledGroup(group_id, version, version + self.k, seq)
        self.groups[group_id] = group
        self._per_deadline[group.deadline] = self._per_deadline.get(group.deadline, 0) + 1
        heapq.heappush(self._running, (group.deadline, seq, group_id))
        return group

    def finish(self, group_id: int) -> None:
        group = self.groups[group_id]
        assert not group.finished, f"group {group_id} finished twice"
        group.finished = True
        heapq.heappush(self._finished, (group.deadline, group.seq, group_id))

    def withdraw(self, group_id: int) -> ControlledGroup:
        """Forget a running group (aborted to be regenerated, or lost with its engine)."""
        group = self.groups.pop(group_id)
        assert not group.finished, f"group {group_id} is finished: finished groups are never withdrawn"
        self._decrement(group.deadline)
        return group

    def move_to_version(self, group_id: int, version: int) -> None:
        """Re-admit a group that has not started on a newer version. A later deadline never breaks
        the invariant: it only lowers the counts for deadlines between the two."""
        group = self.groups[group_id]
        assert not group.finished and group.version <= version <= self.newest_version
        self._decrement(group.deadline)
        group.version, group.deadline = version, version + self.k
        self._per_deadline[group.deadline] = self._per_deadline.get(group.deadline, 0) + 1
        heapq.heappush(self._running, (group.deadline, group.seq, group_id))

    def publish(self, version: int) -> None:
        if version != self.newest_version + 1:
            raise ValueError(f"version {version} published after version {self.newest_version}: versions are"
                             " published one per train step, in order")
        self.newest_version = version

    # ---- batching ----------------------------------------------------------------------------

    def plan_batch(self, size: int | None = None) -> list[int] | None:
        """The group ids step n takes (earliest deadline first, then oldest admission), or None if
        the trainer must wait: fewer than `size` finished, or taking them would leave the invariant
        broken for step n + 1. `size` < B only for the last, short batch of a finite dataset."""
        size = self.B if size is None else size
        if len(self._finished) < size or size < 1:
            return None
        chosen = heapq.nsmallest(size, self._finished)
        left = dict(self._per_deadline)
        for deadline, _, _ in chosen:
            left[deadline] -= 1
        n1 = self.next_step + 1
        prefix = 0
        for d in sorted(left):
            prefix += left[d]
            if (d < n1 and left[d] > 0) or prefix > (d - n1 + 1) * self.B:
                return None
        return [group_id for _, _, group_id in chosen]

    def consume(self, group_ids: list[int]) -> None:
        """Step n took exactly the groups `plan_batch` returned; n advances."""
        for group_id in group_ids:
            deadline, _, popped = heapq.heappop(self._finished)
            assert popped == group_id, "consume() must take the planned batch"
            assert deadline >= self.next_step, f"group {group_id} trained past its deadline"
            del self.groups[group_id]
            self._decrement(deadline)
        self.next_step += 1
        assert self.holds(), "deadline invariant broken after a step"

    def blocker(self) -> ControlledGroup | None:
        """The running group the trainer waits for: earliest deadline, then oldest admission."""
        heap = self._running
        while heap:
            deadline, _, group_id = heap[0]
            group = self.groups.get(group_id)
            if group is not None and not group.finished and group.deadline == deadline:
                return group
            heapq.heappop(heap)
        return None

    # ---- counts ------------------------------------------------------------------------------

    @property
    def num_unconsumed(self) -> int:
        return len(self.groups)

    @property
    def num_finished(self) -> int:
        return len(self._finished)

    @property
    def num_running(self) -> int:
        return len(self.groups) - len(self._finished)

    @property
    def max_in_flight(self) -> int:
        """(k + 1) * B: the invariant's cap on unconsumed groups."""
        return (self.k + 1) * self.B

    def _decrement(self, deadline: int) -> None:
        left = self._per_deadline[deadline] - 1
        if left:
            self._per_deadline[deadline] = left
        else:
            del self._per_deadline[deadline]

    # ---- save / restore ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        return {"next_step": self.next_step, "newest_version": self.newest_version, "next_seq": self._next_seq}

    def load_state_dict(self, state: dict[str, object]) -> None:
        assert not self.groups, "restore into a fresh controller"
        self.next_step = int(state["next_step"])  # type: ignore[arg-type]
        self.newest_version = int(state["newest_version"])  # type: ignore[arg-type]
        self._next_seq = int(state["next_seq"])  # type: ignore[arg-type]

    def restore_group(self, group_id: int, version: int, seq: int, finished: bool) -> None:
        """Re-register an unconsumed group from a checkpoint (bypasses the admission check: the
        checkpointed state satisfied the invariant, which `holds()` re-verifies)."""
        group = ControlledGroup(group_id, version, version + self.k, seq)
        self.groups[group_id] = group
        self._per_deadline[group.deadline] = self._per_deadline.get(group.deadline, 0) + 1
        if finished:
            self.finish(group_id)
        else:
            heapq.heappush(self._running, (group.deadline, seq, group_id))

"""`TrajectoryBuffer`: assembles complete groups from streamed trajectories and hands each to the
trainer exactly once.

Sits between the reward stage and the trainer (DESIGN.md data flow). Every trajectory is checked
on arrival -- loudly, with a `ValueError` naming the group and sample -- against the constraints the
rest of the system relies on:

- one version per trajectory (`min_version == max_version`), except in the labelled partial-rollout
  baseline, where `version == min_version` (staleness counts the oldest token);
- the trajectory's version is the version its group was admitted on;
- each (group_id, sample_idx) arrives once, with 0 <= sample_idx < n.

Aborted groups (`discard`) drop their trajectories, including ones that arrive late; the scheduler
re-queues their prompt, so no data is lost. Which finished groups a step takes (earliest deadline
first) is the `VersionController`'s decision; the buffer enforces that each is taken once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dora.buffer.serialize import trajectory_from_state, trajectory_to_state
from dora.types import FinishReason, Trajectory


@dataclass(slots=True)
class OpenGroup:
    group_id: int
    prompt_id: int
    version: int
    num_samples: int
    samples: dict[int, Trajectory] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class BufferCounts:
    running: int
    """Groups admitted and not yet complete."""
    finished: int
    """Complete groups not yet consumed."""
    consumed: int
    regenerated: int
    """Groups discarded (aborted or lost) whose prompt was re-queued."""
    discarded_trajectories: int


class TrajectoryBuffer:
    def __init__(self, group_size: int, *, partial_rollout: bool = False) -> None:
        if group_size < 1:
            raise ValueError(f"rollout.group_size (n) must be >= 1, got {group_size}")
        self.group_size = group_size
        self.partial_rollout = partial_rollout
        self._open: dict[int, OpenGroup] = {}
        self._complete: dict[int, OpenGroup] = {}
        self._discarded: set[int] = set()
        self._consumed: set[int] = set()
        self.num_consumed = 0
        self.num_regenerated = 0
        self.num_discarded_trajectories = 0

    def open(self, group_id: int, prompt_id: int, version: int) -> None:
        """A group was admitted on `version`: expect `group_size` trajectories for it."""
        if group_id in self._open or group_id in self._complete or group_id in self._consumed:
            raise ValueError(f"group {group_id} is already known to the buffer")
        self._open[group_id] = OpenGroup(group_id, prompt_id, version, self.group_size)

    def move_to_version(self, group_id: int, version: int) -> None:
        """A group that has not started was re-admitted on a newer version."""
        group = self._open[group_id]
        assert not group.samples, f"group {group_id} already has trajectories"
        group.version = version

    def add(self, traj: Trajectory) -> bool:
        """Store one trajectory; True when its group just became complete."""
        gid = traj.group_id
        if gid in self._discarded or traj.finish_reason is FinishReason.ABORT and gid not in self._open:
            self.num_discarded_trajectories += 1
            return False
        group = self._open.get(gid)
        if group is None:
            state = "already complete" if gid in self._complete or gid in self._consumed else "never admitted"
            raise ValueError(f"trajectory for group {gid} sample {traj.sample_idx}: the group is {state}")
        where = f"group {gid} (prompt {group.prompt_id}) sample {traj.sample_idx}"
        if traj.finish_reason is FinishReason.ABORT:
            raise ValueError(f"{where} came back aborted but was not aborted by the pool: discard() the group instead")
        if traj.prompt_id != group.prompt_id:
            raise ValueError(f"{where}: prompt_id {traj.prompt_id} != the group's {group.prompt_id}")
        if not 0 <= traj.sample_idx < group.num_samples:
            raise ValueError(f"{where}: sample_idx outside 0..{group.num_samples - 1}")
        if traj.sample_idx in group.samples:
            raise ValueError(f"{where} arrived twice (duplicate (group_id, sample_idx))")
        if traj.min_version != traj.max_version:
            if not self.partial_rollout:
                raise ValueError(f"{where} mixes policy versions {traj.min_version}..{traj.max_version}: a trajectory"
                                 " must come from one version (only rollout.mode=partial_rollout allows this)")
            if traj.min_version > traj.max_version:
                raise ValueError(f"{where}: min_version {traj.min_version} > max_version {traj.max_version}")
        if traj.version != traj.min_version:
            raise ValueError(f"{where}: version {traj.version} != min_version {traj.min_version} (staleness counts"
                             " the oldest token)")
        if traj.version != group.version:
            raise ValueError(f"{where} was generated by version {traj.version} but the group was admitted on"
                             f" version {group.version}")
        group.samples[traj.sample_idx] = traj
        if len(group.samples) < group.num_samples:
            return False
        self._complete[gid] = self._open.pop(gid)
        return True

    def discard(self, group_id: int) -> None:
        """Drop an open group (aborted for regeneration, or lost with its engine); trajectories of it
        that arrive later are dropped too. Its prompt is re-queued by the caller."""
        group = self._open.pop(group_id, None)
        if group is None:
            raise ValueError(f"discard: group {group_id} is not running (complete groups are never discarded)")
        self.num_discarded_trajectories += len(group.samples)
        self.num_regenerated += 1
        self._discarded.add(group_id)

    def pop(self, group_ids: list[int]) -> list[list[Trajectory]]:
        """Hand these complete groups to the trainer, each exactly once, samples in order."""
        out = []
        for gid in group_ids:
            if gid in self._consumed:
                raise ValueError(f"group {gid} was already handed to the trainer")
            group = self._complete.pop(gid, None)
            if group is None:
                raise ValueError(f"group {gid} is not complete")
            self._consumed.add(gid)
            out.append([group.samples[i] for i in range(group.num_samples)])
        self.num_consumed += len(out)
        return out

    def is_complete(self, group_id: int) -> bool:
        return group_id in self._complete

    def counts(self) -> BufferCounts:
        return BufferCounts(len(self._open), len(self._complete), self.num_consumed, self.num_regenerated,
                            self.num_discarded_trajectories)

    # ---- save / restore ----------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
        """Complete, unconsumed groups with their trajectories (JSON-able dict + named tensors).
        Open groups are not saved: the scheduler regenerates them on restore."""
        tensors: dict[str, torch.Tensor] = {}
        groups = []
        for group in self._complete.values():
            trajs = [trajectory_to_state(group.samples[i], tensors) for i in range(group.num_samples)]
            groups.append({"group_id": group.group_id, "prompt_id": group.prompt_id, "version": group.version,
                           "trajectories": trajs})
        state = {"complete": groups, "num_consumed": self.num_consumed, "num_regenerated": self.num_regenerated,
                 "num_discarded_trajectories": self.num_discarded_trajectories,
                 "consumed_group_ids": sorted(self._consumed)}
        return state, tensors

    def load_state_dict(self, state: dict[str, object], tensors: dict[str, torch.Tensor]) -> None:
        if self._open or self._complete:
            raise ValueError("TrajectoryBuffer.load_state_dict needs an empty buffer")
        for g in state["complete"]:  # type: ignore[attr-defined]
            group = OpenGroup(g["group_id"], g["prompt_id"], g["version"], len(g["trajectories"]))
            for t in g["trajectories"]:
                traj = trajectory_from_state(t, tensors)
                group.samples[traj.sample_idx] = traj
            self._complete[group.group_id] = group
        self.num_consumed = int(state["num_consumed"])  # type: ignore[arg-type]
        self.num_regenerated = int(state["num_regenerated"])  # type: ignore[arg-type]
        self.num_discarded_trajectories = int(state["num_discarded_trajectories"])  # type: ignore[arg-type]
        self._consumed = set(state["consumed_group_ids"])  # type: ignore[arg-type]

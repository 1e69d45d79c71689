"""`RolloutPool`: engine slots, version loading/switching, placement and rebalancing.

Part of the scheduler core (between admission and the engines). The pool tracks, per engine, which
policy versions are live or loading and how many sequences of each version run there; it never
touches an engine itself -- it returns `LoadVersion`/`DropVersion` actions for the driver.

Rules (DESIGN.md, "Switching"):
- an engine never changes weights under running sequences (except in the labelled partial-rollout
  baseline, which swaps as soon as the new version is loaded);
- an engine holding several versions (`max_live_versions > 1`) loads the newest version beside the
  old ones as soon as it has room, and drops an old version once its sequences drained;
- an engine holding one version keeps serving it until the rebalancer moves it to the newest
  version; it then takes no new groups, and switches once drained;
- rebalancing: a switch costs a single-version engine its drain (the slots its finished sequences
  free stay empty until the last one ends: with long-tailed lengths, minutes at a time), so an engine
  moves to the newest version only when switching costs nothing or when it has nothing left to do
  where it is: it has no running sequence; or its version can no longer be admitted on (the deadline
  invariant, or `fill_older_versions` off) while the newest can; or work only the newest version may
  take (requeued prompts, groups waiting for an engine) has no engine on the newest, and then the
  engine with the fewest running sequences moves. While its version may still be admitted on, an
  engine keeps filling its free slots there (older versions fill idle slots, as in DORA) instead of
  leaving them empty while it drains. Engines only ever move to the newest version; a draining engine
  whose target was superseded is retargeted, so it lands on the newest version.

Migration (`rollout.migrate`, on in multi_version): a single-version engine moved to the newest
version hands its running groups to other engines serving its version, when they have room for all
of them, and switches at once instead of draining. Receivers are engines still taking groups on
that version, or draining engines with more running sequences (sequences flow towards fuller
engines, so no group ever moves back and forth). `plan_migration` decides, the scheduler picks the
groups, `migrate` moves the counts.

New groups go to an engine's newest live version only (an older version of a multi-version engine
is only draining). Capacity is counted in sequences (`max_seqs_per_engine`).

Idle time, as measured here: the time an engine has no running sequence, from the pool's start,
whatever the reason (no admissible work, loading weights, waiting to switch). Slot utilisation is
running sequence-seconds divided by (capacity * elapsed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dora.rollout.events import DropVersion, LoadVersion

Placement = list[tuple[int, int]]
"""[(engine_id, num_samples)]: where one group's samples go."""


@dataclass(slots=True)
class EngineSlot:
    engine_id: int
    max_seqs: int
    max_versions: int
    live: list[int] = field(default_factory=list)
    """Loaded versions, ascending."""
    loading: list[int] = field(default_factory=list)
    running: dict[int, int] = field(default_factory=dict)
    """Admitted version -> running sequences."""
    target: int | None = None
    """Single-version engines: the version the rebalancer moved this engine to."""
    num_running: int = 0
    last_t: float = 0.0
    idle_s: float = 0.0
    seq_s: float = 0.0

    @property
    def current(self) -> int | None:
        """The version this engine serves or is moving to (single-version engines)."""
        if self.target is not None:
            return self.target
        if self.loading:
            return self.loading[-1]
        return self.live[-1] if self.live else None

    @property
    def accepting(self) -> int | None:
        """The version new groups may go to on this engine, or None."""
        if not self.live or (self.target is not None and self.target not in self.live):
            return None
        return self.live[-1]

    @property
    def free(self) -> int:
        return self.max_seqs - self.num_running


class RolloutPool:
    def __init__(self, num_engines: int, max_seqs: int, max_versions: int, *, partial_rollout: bool = False,
                 split_groups: bool = False) -> None:
        if num_engines < 1:
            raise ValueError(f"the rollout pool needs >= 1 engine, got {num_engines}")
        self.engines = [EngineSlot(e, max_seqs, max_versions) for e in range(num_engines)]
        self.partial = partial_rollout
        self.split = split_groups
        self.newest = 0
        self.start_t = 0.0

    # ---- accounting --------------------------------------------------------------------------

    def _account(self, e: EngineSlot, time: float) -> None:
        dt = time - e.last_t
        if dt > 0:
            if e.num_running == 0:
                e.idle_s += dt
            e.seq_s += e.num_running * dt
            e.last_t = time

    def idle_s(self, time: float) -> list[float]:
        for e in self.engines:
            self._account(e, time)
        return [e.idle_s for e in self.engines]

    def utilisation(self, time: float) -> float:
        for e in self.engines:
            self._account(e, time)
        capacity = sum(e.max_seqs for e in self.engines) * (time - self.start_t)
        return sum(e.seq_s for e in self.engines) / capacity if capacity > 0 else 0.0

    def runs_older_than(self, version: int) -> bool:
        """Whether a sequence admitted on a version older than `version` still runs on some engine."""
        return any(v < version for e in self.engines for v in e.running)

    def live_versions(self) -> tuple[int, ...]:
        return tuple(sorted({v for e in self.engines for v in e.live}))

    # ---- versions ----------------------------------------------------------------------------

    def start(self, version: int, time: float) -> list[LoadVersion]:
        """Every engine (fresh, or just reset) loads `version`."""
        self.newest = version
        self.start_t = time
        actions = []
        for e in self.engines:
            e.last_t = time
            actions += self.reset_engine(e.engine_id, time)
        return actions

    def reset_engine(self, engine_id: int, time: float) -> list[LoadVersion]:
        e = self.engines[engine_id]
        self._account(e, time)
        e.live, e.loading, e.running, e.target, e.num_running = [], [self.newest], {}, None, 0
        return [LoadVersion(engine_id, self.newest)]

    def publish(self, version: int) -> list[LoadVersion | DropVersion]:
        self.newest = version
        actions: list[LoadVersion | DropVersion] = []
        for e in self.engines:
            if self.partial or e.max_versions > 1:
                actions += self._maintain(e)
        return actions

    def loaded(self, engine_id: int, version: int) -> list[LoadVersion | DropVersion]:
        e = self.engines[engine_id]
        if version not in e.loading:
            raise ValueError(f"engine {engine_id} reports version {version} loaded, but it was not loading it"
                             f" (loading {e.loading}, live {e.live})")
        e.loading.remove(version)
        e.live.append(version)
        e.live.sort()
        assert len(e.live) <= e.max_versions or self.partial, f"engine {engine_id} holds {e.live}"
        if e.target == version:
            e.target = None
        return self._maintain(e)

    def _maintain(self, e: EngineSlot) -> list[LoadVersion | DropVersion]:
        """Drop drained old versions, load the version the engine should hold next."""
        actions: list[LoadVersion | DropVersion] = []
        if self.partial:
            # Labelled baseline: swap as soon as the newest version is loaded, under running sequences.
            if e.live and e.live[-1] == self.newest:
                actions += [DropVersion(e.engine_id, v) for v in e.live[:-1]]
                del e.live[:-1]
            elif self.newest not in e.loading:
                e.loading.append(self.newest)
                actions.append(LoadVersion(e.engine_id, self.newest))
            return actions
        if e.max_versions > 1:
            for v in [v for v in e.live[:-1] if not e.running.get(v)]:
                e.live.remove(v)
                actions.append(DropVersion(e.engine_id, v))
            if (self.newest not in e.live and self.newest not in e.loading
                    and len(e.live) + len(e.loading) < e.max_versions):
                e.loading.append(self.newest)
                actions.append(LoadVersion(e.engine_id, self.newest))
            return actions
        if e.target is not None and e.num_running == 0 and e.target not in e.loading:
            actions += [DropVersion(e.engine_id, v) for v in e.live]
            e.live = []
            e.loading.append(e.target)
            actions.append(LoadVersion(e.engine_id, e.target))
        return actions

    def rebalance(self, queued: dict[int, int], can_admit: Callable[[int], bool]) -> list[LoadVersion | DropVersion]:
        """Move single-version engines to the newest version (see the module docstring).
        `queued`: version -> sequences that only that version may take now (requeued prompts and
        groups waiting for an engine go on the newest). `can_admit(v)`: whether a new group could be
        admitted on version v now."""
        if self.partial or not any(e.max_versions == 1 and not e.loading and e.current is not None
                                   and e.current != self.newest for e in self.engines):
            return []  # every single-version engine is on (or loading) the newest version already
        singles = [e for e in self.engines if e.max_versions == 1]
        # An engine still loading is left alone: a load cannot be cancelled, and it will be
        # considered again once the version is live.
        movers = [e for e in singles if not e.loading and e.current is not None and e.current != self.newest]
        newest_open = can_admit(self.newest) or queued.get(self.newest, 0) > 0
        moved = [e for e in movers
                 if e.target is not None  # draining already: land on the newest version
                 or e.num_running == 0  # nothing to drain: the switch is free
                 or (newest_open and not can_admit(e.current))]  # type: ignore[arg-type]  # only drains where it is
        if queued.get(self.newest, 0) and not any(e.current == self.newest for e in singles) and not moved:
            moved.append(min(movers, key=lambda e: (e.num_running, e.engine_id)))
        actions: list[LoadVersion | DropVersion] = []
        for e in moved:
            e.target = self.newest
            actions += self._maintain(e)
        return actions

    # ---- migration ---------------------------------------------------------------------------

    def draining(self) -> list[EngineSlot]:
        """Single-version engines waiting for their running sequences to end before a switch,
        emptiest first."""
        return sorted((e for e in self.engines if e.max_versions == 1 and e.target is not None and e.num_running
                       and len(e.live) == 1 and not e.loading), key=lambda e: (e.num_running, e.engine_id))

    def plan_migration(self, src: EngineSlot, shares: list[tuple[int, int, frozenset[int]]]) -> list[tuple[int, int]] | None:
        """Where each of `src`'s groups would go so that `src` empties, or None if they do not all fit.
        `shares`: (group_id, samples on src, engines that already run samples of the group: a group
        never gets two shares on one engine). -> [(group_id, dst)]. Receivers serve the same
        version and either still take groups on it or drain with more running sequences than `src`;
        the fullest receiver that fits comes first (consolidation), largest share first."""
        (version,) = src.live
        free = {e.engine_id: e.free for e in self.engines
                if e is not src and version in e.live and not e.loading
                and (e.accepting == version or (e.target is not None and (e.num_running, e.engine_id)
                                                 > (src.num_running, src.engine_id)))}
        if sum(free.values()) < src.num_running:
            return None
        order = sorted(free, key=lambda i: (-self.engines[i].num_running, i))
        plan = []
        for group_id, count, busy in sorted(shares, key=lambda s: (-s[1], s[0])):
            dst = next((i for i in order if free[i] >= count and i not in busy), None)
            if dst is None:
                return None
            free[dst] -= count
            plan.append((group_id, dst))
        return plan

    def migrate(self, src: int, dst: int, version: int, num_samples: int,
                time: float) -> list[LoadVersion | DropVersion]:
        """Count `num_samples` running sequences of `version` on `dst` instead of `src`."""
        d = self.engines[dst]
        assert version in d.live and d.free >= num_samples, f"engine {dst} cannot take {num_samples} of v{version}"
        self.occupy(dst, version, num_samples, time)
        return self.release(src, version, num_samples, time)

    # ---- placement ---------------------------------------------------------------------------

    def accepting_versions(self) -> list[int]:
        """Versions some engine with free capacity takes new groups on, newest first."""
        return sorted({e.accepting for e in self.engines if e.accepting is not None and e.free > 0}, reverse=True)

    def place(self, version: int, num_samples: int) -> Placement | None:
        """Where a group of `num_samples` would go on `version` (most free capacity first), or None."""
        if not self.split:
            # The engine with the most free capacity (lowest id on ties) fits it, or none does.
            best = None
            for e in self.engines:
                if e.accepting == version and (best is None or e.free > best.free):
                    best = e
            return [(best.engine_id, num_samples)] if best is not None and best.free >= num_samples else None
        candidates = sorted((e for e in self.engines if e.accepting == version and e.free > 0),
                            key=lambda e: (-e.free, e.engine_id))
        placement, left = [], num_samples
        for e in candidates:
            take = min(e.free, left)
            placement.append((e.engine_id, take))
            left -= take
            if left == 0:
                return placement
        return None

    def has_room(self, num_samples: int) -> bool:
        """Whether `place` could succeed on some version (a cheap test before trying each group)."""
        if not self.split:
            return any(e.accepting is not None and e.free >= num_samples for e in self.engines)
        free: dict[int, int] = {}
        for e in self.engines:
            if e.accepting is not None:
                free[e.accepting] = free.get(e.accepting, 0) + e.free
        return any(f >= num_samples for f in free.values())

    def occupy(self, engine_id: int, version: int, num_samples: int, time: float) -> None:
        e = self.engines[engine_id]
        assert version in e.live and e.free >= num_samples
        self._account(e, time)
        e.running[version] = e.running.get(version, 0) + num_samples
        e.num_running += num_samples

    def release(self, engine_id: int, version: int, num_samples: int, time: float) -> list[LoadVersion | DropVersion]:
        e = self.engines[engine_id]
        self._account(e, time)
        left = e.running[version] - num_samples
        assert left >= 0
        if left:
            e.running[version] = left
        else:
            del e.running[version]
        e.num_running -= num_samples
        return self._maintain(e) if left == 0 else []

    # ---- save / restore ----------------------------------------------------------------------

    def idle_state(self) -> list[list[float]]:
        return [[e.idle_s, e.seq_s] for e in self.engines]


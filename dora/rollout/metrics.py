"""`RolloutMetrics`: what the scheduler core decided, counted cheaply (DESIGN.md: "Every decision is
counted"), and `WaitStatus`, the description of what the trainer or a switch waits for.

Filled by `dora.rollout.scheduler.Scheduler` on events; read by telemetry, benchmarks and the
simulator. Appends happen only when something changes (live versions) or once per step, so the
cost stays O(1) per event.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class TrainerWait:
    step: int
    wait_s: float
    """From the trainer's request to its batch."""
    group_id: int | None
    """The last group the trainer waited for (None: it did not wait)."""
    version: int | None
    engine_ids: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class WaitStatus:
    """What the trainer is waiting for right now; the driver raises with `describe()` on timeout."""

    step: int
    waited_s: float
    group_id: int | None
    prompt_id: int | None
    version: int | None
    engine_ids: tuple[int, ...]
    running_s: float | None
    reason: str

    def describe(self) -> str:
        if self.group_id is None:
            return f"step {self.step} waited {self.waited_s:.1f} s: {self.reason}"
        engines = ", ".join(str(e) for e in self.engine_ids) or "none (not placed yet)"
        running = f" running for {self.running_s:.0f} s" if self.running_s is not None else ""
        return (f"step {self.step} waited {self.waited_s:.1f} s for group {self.group_id} (prompt {self.prompt_id},"
                f" version {self.version}){running} on engine {engines}: {self.reason}")


@dataclass(slots=True)
class RolloutMetrics:
    live_versions: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    """(time, versions live on any engine), appended when the set changes."""
    staleness: Counter[int] = field(default_factory=Counter)
    """step - version of every consumed sample (trajectory) -> count."""
    waits: list[TrainerWait] = field(default_factory=list)
    queue_depths: list[tuple[float, int, int, int]] = field(default_factory=list)
    """(time, running groups, finished-unconsumed groups, queued for placement), at each step start."""
    num_admitted: int = 0
    num_regenerations: int = 0
    """Groups aborted by on_stale=regenerate."""
    num_restarts: int = 0
    """Groups lost with a reset engine or a restore, re-queued."""
    num_migrations: int = 0
    """Group shares moved, running, from a draining engine to another one (`Migrate`)."""
    num_steps: int = 0
    max_in_flight: int = 0

    def note_live(self, time: float, versions: tuple[int, ...]) -> None:
        if not self.live_versions or self.live_versions[-1][1] != versions:
            self.live_versions.append((time, versions))

    @property
    def trainer_wait_s(self) -> float:
        return sum(w.wait_s for w in self.waits)

    def state_dict(self) -> dict[str, object]:
        """The run-long counters (a resumed run keeps counting; timelines restart with it)."""
        return {"staleness": {str(k): v for k, v in self.staleness.items()}, "num_admitted": self.num_admitted,
                "num_regenerations": self.num_regenerations, "num_restarts": self.num_restarts,
                "num_migrations": self.num_migrations, "num_steps": self.num_steps, "max_in_flight": self.max_in_flight}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.staleness = Counter({int(k): int(v) for k, v in state["staleness"].items()})  # type: ignore[attr-defined]
        for key in ("num_admitted", "num_regenerations", "num_restarts", "num_steps", "max_in_flight"):
            setattr(self, key, int(state[key]))  # type: ignore[arg-type]
        self.num_migrations = int(state.get("num_migrations", 0))  # type: ignore[arg-type]

    def summary(self) -> dict[str, float]:
        samples = sum(self.staleness.values())
        return {
            "rollout/steps": float(self.num_steps),
            "rollout/admitted": float(self.num_admitted),
            "rollout/regenerations": float(self.num_regenerations),
            "rollout/restarts": float(self.num_restarts),
            "rollout/migrations": float(self.num_migrations),
            "rollout/trainer_wait_s": self.trainer_wait_s,
            "rollout/staleness_mean": sum(s * c for s, c in self.staleness.items()) / samples if samples else 0.0,
            "rollout/staleness_max": float(max(self.staleness, default=0)),
            "rollout/max_in_flight": float(self.max_in_flight),
            "rollout/max_live_versions": float(max((len(v) for _, v in self.live_versions), default=0)),
        }

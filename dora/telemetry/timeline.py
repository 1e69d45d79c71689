"""Chrome-trace / Perfetto timeline of rollout, training and sync events, coloured by version.

Each lane (`engine 0`, `trainer`, `sync`, ...) is a track; each event is a span with its policy
version in `args`. Open the JSON in https://ui.perfetto.dev or chrome://tracing, or render it to a
PNG with `tools/plot_timeline.py`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Timeline:
    """Thread-safe recorder of spans. Times are seconds on a caller-chosen clock (default:
    time.monotonic, relative to construction), so a simulated clock can record too."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._t0 = clock()
        self._lock = threading.Lock()
        self._lanes: dict[str, int] = {}
        self._events: list[dict[str, Any]] = []

    def now(self) -> float:
        return self._clock() - self._t0

    def since(self, clock_time: float) -> float:
        """A reading of the timeline's clock (e.g. a trajectory's `finished_at`) in timeline seconds."""
        return clock_time - self._t0

    def _lane(self, lane: str) -> int:
        tid = self._lanes.get(lane)
        if tid is None:
            tid = self._lanes[lane] = len(self._lanes)
            self._events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": lane}})
        return tid

    def span(self, lane: str, name: str, start: float, end: float, version: int | None = None, **args: Any) -> None:
        """Record a span [start, end] in seconds since the timeline started."""
        if version is not None:
            args["version"] = version
        with self._lock:
            self._events.append({"ph": "X", "name": name, "cat": lane, "pid": 0, "tid": self._lane(lane),
                                 "ts": start * 1e6, "dur": max(end - start, 0.0) * 1e6, "args": args})

    def instant(self, lane: str, name: str, at: float | None = None, **args: Any) -> None:
        with self._lock:
            self._events.append({"ph": "i", "s": "t", "name": name, "cat": lane, "pid": 0, "tid": self._lane(lane),
                                 "ts": (self.now() if at is None else at) * 1e6, "args": args})

    @contextmanager
    def measure(self, lane: str, name: str, version: int | None = None, **args: Any):
        start = self.now()
        try:
            yield
        finally:
            self.span(lane, name, start, self.now(), version, **args)

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"traceEvents": self.events, "displayTimeUnit": "ms"}))
        return path


def load_spans(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """lane -> spans (name, start_s, end_s, args), from a saved trace."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
    lanes: dict[str, list[dict[str, Any]]] = {name: [] for name in names.values()}
    for e in events:
        if e.get("ph") == "X":
            lanes[names[e["tid"]]].append({"name": e["name"], "start": e["ts"] / 1e6,
                                           "end": (e["ts"] + e["dur"]) / 1e6, "args": e.get("args", {})})
    return lanes

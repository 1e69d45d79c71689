"""Typed metrics and the logging backends behind one small protocol.

A train step produces a flat `dict[str, float | int | list]`; `MetricLogger`s write it: a JSONL file
in the run folder (always), wandb (offline by default), the console. Reductions are declared with
the metric so values aggregated over micro-batches or ranks reduce correctly (a max is not averaged).
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Reduce(str, enum.Enum):
    MEAN = "mean"
    SUM = "sum"
    MAX = "max"
    MIN = "min"


@dataclass(slots=True)
class Metric:
    """A value accumulated over several updates (micro-batches, ranks) and reduced once."""

    reduce: Reduce = Reduce.MEAN
    total: float = 0.0
    weight: float = 0.0
    extreme: float | None = None

    def update(self, value: float, weight: float = 1.0) -> None:
        if self.reduce is Reduce.MEAN:
            self.total += value * weight
            self.weight += weight
        elif self.reduce is Reduce.SUM:
            self.total += value
        elif self.reduce is Reduce.MAX:
            self.extreme = value if self.extreme is None else max(self.extreme, value)
        else:
            self.extreme = value if self.extreme is None else min(self.extreme, value)

    def value(self) -> float:
        if self.reduce is Reduce.MEAN:
            return self.total / self.weight if self.weight else math.nan
        if self.reduce is Reduce.SUM:
            return self.total
        return math.nan if self.extreme is None else self.extreme


@dataclass(slots=True)
class MetricBag:
    """Named metrics with their reductions, e.g. bag.add("loss", v, Reduce.MEAN, weight=num_tokens)."""

    metrics: dict[str, Metric] = field(default_factory=dict)

    def add(self, key: str, value: float, reduce: Reduce = Reduce.MEAN, weight: float = 1.0) -> None:
        metric = self.metrics.get(key)
        if metric is None:
            metric = self.metrics[key] = Metric(reduce)
        elif metric.reduce is not reduce:
            raise ValueError(f"metric {key!r} was declared with reduce={metric.reduce.value}, now {reduce.value}")
        metric.update(float(value), weight)

    def compute(self) -> dict[str, float]:
        return {key: metric.value() for key, metric in self.metrics.items()}


class MetricLogger(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null keeps the line parseable by every reader
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
        return _jsonable(value.item())
    return value


class JsonlLogger:
    """One JSON object per line per train step, flushed every line so a crash keeps what was logged."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record = {"step": step, **_jsonable(dict(metrics))}
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbLogger:
    """wandb, offline unless `mode="online"` (or WANDB_MODE) says otherwise."""

    def __init__(self, project: str, run_dir: str | os.PathLike, config: Mapping[str, Any] | None = None,
                 mode: str = "offline", name: str | None = None) -> None:
        import wandb  # optional dependency: only imported when this backend is chosen

        self._run = wandb.init(project=project, dir=str(run_dir), config=dict(config or {}),
                               mode=os.environ.get("WANDB_MODE", mode), name=name, reinit="finish_previous")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        scalars = {k: v for k, v in _jsonable(dict(metrics)).items() if isinstance(v, (int, float))}
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class MultiLogger:
    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

"""Live progress display of a training run.

One line per train step: step / total, the policy versions live when the step started (running or
waiting groups), the staleness of the samples it trained on, reward, eval accuracy, throughput and
ETA. On a terminal it is a rich progress bar with these fields; elsewhere (CI, log files) plain
lines, so a log shows exactly what the display showed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_step(metrics: Mapping[str, Any]) -> str:
    live = metrics.get("live_versions") or []
    parts = [
        f"v{metrics.get('version', '?')}",
        f"live={','.join(f'v{v}' for v in live) or '-'}",
        f"stale<={metrics.get('staleness_max', 0)}",
        f"reward={metrics.get('reward_mean', float('nan')):.3f}",
    ]
    if metrics.get("eval_accuracy") is not None:
        parts.append(f"eval={metrics['eval_accuracy']:.3f}")
    if metrics.get("rollout_tokens_per_s") is not None:
        parts.append(f"gen={metrics['rollout_tokens_per_s']:.0f}tok/s")
    if metrics.get("wait_s") is not None:
        parts.append(f"wait={metrics['wait_s']:.2f}s")
    return " ".join(parts)


class ProgressDisplay:
    def __init__(self, total_steps: int, console: Console | None = None, live: bool | None = None) -> None:
        self.total_steps = total_steps
        self.console = console or Console(stderr=False)
        self.live = sys.stdout.isatty() if live is None else live
        self._start = time.monotonic()
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(bar_width=24),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, status="starting")
            self._progress.start()

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        status = format_step(metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=step + 1, status=status)
        else:
            done = step + 1
            elapsed = time.monotonic() - self._start
            eta = elapsed / done * (self.total_steps - done)
            self.console.print(f"step {done}/{self.total_steps} {status} eta={eta:.0f}s", highlight=False, soft_wrap=True)

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

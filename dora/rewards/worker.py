"""The loop of one reward worker process (started by `dora.rewards.pool.RewardPool`).

Kept apart from the pool, and free of torch, so that starting a worker (forkserver or spawn)
imports only the reward function's own module. Protocol over one duplex pipe:
worker -> ("ready", pid); pool -> (job_id, response, answer, meta) or None (exit);
worker -> (job_id, "ok", RewardResult) | (job_id, "exception" | "invalid", message).
"""

from __future__ import annotations

import os
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

from dora.rewards.registry import RewardFn, to_result


def worker_main(conn: Connection, fn: RewardFn, options: dict[str, Any]) -> None:
    # Ctrl-C goes to the whole process group; the pool shuts its workers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the pool went away
            return
        if message is None:
            return
        job_id, response, answer, meta = message
        try:
            value = fn(response, answer, meta, **options)
        except Exception as e:
            tail = traceback.format_exc(limit=-3)
            conn.send((job_id, "exception", f"{type(e).__name__}: {e}\n{tail}"))
            continue
        try:
            result = to_result(value)
        except (TypeError, ValueError) as e:
            conn.send((job_id, "invalid", str(e)))
            continue
        try:
            conn.send((job_id, "ok", result))
        except Exception as e:  # e.g. an unpicklable object in result.info
            conn.send((job_id, "invalid", f"reward result cannot be sent back: {type(e).__name__}: {e}"))

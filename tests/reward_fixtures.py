"""Reward functions the RewardPool tests run in worker processes (importable by path, torch-free)."""

import os
import time


def misbehaving(response, answer, meta):
    """Hangs, raises, dies or scores according to the response text."""
    if response.startswith("hang"):
        time.sleep(3600)
    if response.startswith("boom"):
        raise RuntimeError(f"cannot score {response!r}")
    if response.startswith("die"):
        os._exit(3)
    if response.startswith("nan"):
        return float("nan")
    return 1.0 if response == answer else 0.5


def digit_fraction(response, answer, meta):
    """A reward any policy can climb quickly: the share of digits in the response (learning tests)."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)

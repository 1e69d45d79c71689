"""Where relative paths in a config point: the working directory first, else the repository root,
so recipes (`model.path`, `data.source`, ...) work from any directory."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | os.PathLike) -> Path:
    """A path as given if it exists (absolute or relative to the working directory), else relative
    to the repository root."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p

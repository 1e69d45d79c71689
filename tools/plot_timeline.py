"""Render a dora timeline trace (Chrome-trace JSON) to a PNG: one row per lane, spans coloured by
policy version.

    python tools/plot_timeline.py runs/<run>/timeline.json -o timeline.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from dora.telemetry.timeline import load_spans  # noqa: E402


def plot(trace: Path, out: Path, title: str | None = None, window: tuple[float, float] | None = None) -> Path:
    lanes = load_spans(trace)
    if window is not None:
        lanes = {name: [s for s in spans if s["end"] >= window[0] and s["start"] <= window[1]]
                 for name, spans in lanes.items()}
    names = sorted(lanes, key=lambda n: (not n.startswith("trainer"), not n.startswith("sync"), n))
    versions = sorted({s["args"].get("version") for spans in lanes.values() for s in spans
                       if s["args"].get("version") is not None})
    cmap = plt.get_cmap("tab10")
    colour = {v: cmap(i % 10) for i, v in enumerate(versions)}
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(names) + 1.5))
    for row, name in enumerate(names):
        bars = [(s["start"], s["end"] - s["start"]) for s in lanes[name]]
        colours = [colour.get(s["args"].get("version"), "grey") for s in lanes[name]]
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colours, edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    if window is not None:
        ax.set_xlim(*window)
    ax.set_title(title or trace.parent.name)
    if versions:
        handles = [Patch(color=colour[v], label=f"v{v}") for v in versions[-10:]]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("-o", "--out", type=Path, default=None)
    parser.add_argument("--title", default=None)
    parser.add_argument("--window", type=float, nargs=2, metavar=("START", "END"), default=None,
                        help="only this time range (seconds), to see individual versions")
    args = parser.parse_args()
    out = plot(args.trace, args.out or args.trace.with_suffix(".png"), args.title,
               tuple(args.window) if args.window else None)
    print(out)


if __name__ == "__main__":
    main()

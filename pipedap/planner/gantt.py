"""Gantt charts of simulated timelines: the compute stream and the link, one panel per schedule.

matplotlib is imported on first use, so the planner itself does not depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .simulator import Timeline

COLOURS = {"B": "#4c72b0", "F": "#55a868", "U": "#8172b3", "RS": "#dd8452", "AG": "#c44e52",
           "AR": "#937860", "merged": "#da8bc3"}
# Label blocks only when there are few enough to read.
MAX_LABELS = 40


def draw(timelines: Mapping[str, Timeline], path: str | Path, title: str = "") -> None:
    """Write a PNG with one panel per named timeline (compute lane above, link lane below)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Gantt charts need matplotlib: pip install matplotlib") from None
    if not timelines:
        raise ValueError("draw() needs at least one timeline")
    horizon = max(t.iteration_time for t in timelines.values())
    fig, axes = plt.subplots(len(timelines), 1, figsize=(14, 1.6 * len(timelines) + 0.8), squeeze=False)
    for ax, (name, tl) in zip(axes[:, 0], timelines.items()):
        compute = tl.compute_spans()
        link = [(span.label, span.start, span.end) for span in tl.link]
        for lane, spans in ((1, compute), (0, link)):
            by_colour: dict[str, list[tuple[float, float]]] = {}
            for label, start, end in spans:
                by_colour.setdefault(_colour(label), []).append((start, end - start))
            for colour, blocks in by_colour.items():
                ax.broken_barh(blocks, (lane - 0.4, 0.8), facecolors=colour, edgecolor="white", linewidth=0.3)
            if len(spans) <= MAX_LABELS:
                for label, start, end in spans:
                    ax.text((start + end) / 2, lane, label, ha="center", va="center", fontsize=6, clip_on=True)
        ax.axvline(tl.iteration_time, color="black", linewidth=1)
        ax.axvline(tl.lower_bound, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks([1, 0], ["compute", "link"])
        ax.set_xlim(0, horizon * 1.02)
        ax.set_title(f"{name}: {tl.iteration_time * 1e3:.2f} ms (plan bound {tl.lower_bound * 1e3:.2f} ms)",
                     fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds from the start of backward")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _colour(label: str) -> str:
    if "+" in label:
        return COLOURS["merged"]
    for prefix in ("RS", "AG", "AR", "B", "F", "U"):
        if label.startswith(prefix):
            return COLOURS[prefix]
    return "#999999"

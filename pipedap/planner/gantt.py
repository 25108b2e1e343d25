"""Gantt charts of simulated timelines: the compute stream and the link, one panel per schedule.

matplotlib is imported on first use, so the planner itself does not depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .simulator import Timeline

COLOURS = {"F": "#55a868", "B": "#4c72b0", "U": "#8172b3", "RS": "#dd8452", "AG": "#c44e52",
           "AR": "#937860", "merged": "#da8bc3", "iteration": "#dddddd", "other": "#bbbbbb"}
NAMES = {"F": "forward (F)", "B": "backward (B)", "U": "update (U)", "RS": "reduce-scatter (RS)",
         "AG": "all-gather (AG)", "AR": "all-reduce (AR)", "merged": "ops sent as one submission (RS+AG)",
         "iteration": "predicted iteration (backward start to next forward end)", "other": "other"}
# Label blocks only when there are few enough to read, and only those wide enough for their label.
MAX_LABELS = 40
MIN_LABEL_WIDTH = 0.02  # of the chart's width, for a 3-character label like RS3 (longer ones need more)


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
    kinds: set[str] = set()
    for ax, (name, tl) in zip(axes[:, 0], timelines.items()):
        compute = tl.compute_spans()
        link = [(span.label, span.start, span.end) for span in tl.link]
        for lane, spans in ((1, compute), (0, link)):
            by_kind: dict[str, list[tuple[float, float]]] = {}
            for label, start, end in spans:
                by_kind.setdefault(kind(label), []).append((start, end - start))
            for key, blocks in by_kind.items():
                ax.broken_barh(blocks, (lane - 0.4, 0.8), facecolors=COLOURS[key], edgecolor="white", linewidth=0.3)
            kinds.update(by_kind)
            if len(spans) <= MAX_LABELS:
                for label, start, end in spans:
                    if end - start > horizon * MIN_LABEL_WIDTH * max(1.0, len(label) / 3):
                        ax.text((start + end) / 2, lane, label, ha="center", va="center", fontsize=6, clip_on=True)
        ax.axvline(tl.iteration_time, color="black", linewidth=1)
        ax.axvline(tl.lower_bound, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks([1, 0], ["compute", "link"])
        ax.set_xlim(0, horizon * 1.02)
        ax.set_title(f"{name}: {tl.iteration_time * 1e3:.2f} ms (plan bound {tl.lower_bound * 1e3:.2f} ms)",
                     fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds from the start of backward")
    legend(axes[0, 0], kinds, [("black", "-", "iteration end (next forward done)"),
                               ("grey", "--", "plan bound (compute, or head + link busy + tail)")])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kind(label: str) -> str:
    """The legend entry of a block's label: "RS" for RS, RS3 or AR3[1/4]-like chunks, "merged" for RS2+AG3."""
    if "+" in label:
        return "merged"
    for prefix in ("RS", "AG", "AR", "B", "F", "U"):
        rest = label[len(prefix):]
        if label.startswith(prefix) and (not rest or rest[0].isdigit()):
            return prefix
    return "other"


def legend(ax, kinds: set[str], lines: list[tuple[str, str, str]]) -> None:
    """A legend right of ``ax``: one swatch per block kind drawn, then (colour, style, meaning) per line."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=COLOURS[k], label=NAMES[k]) for k in COLOURS if k in kinds]
    handles += [Line2D([], [], color=colour, linestyle=style, label=text) for colour, style, text in lines]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)

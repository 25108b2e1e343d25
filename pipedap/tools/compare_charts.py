"""The charts of ``python -m pipedap.tools.compare``, drawn from its comparison rows (PNG, matplotlib).

* ``throughput.png``: samples per second of each system (all ranks) with the 95% confidence
  interval, per link rate; black lines mark the throughput of the data-parallel bound and,
  with pipeline systems, of the pipeline's bound (dashed);
* ``speedup_vs_ddp.png``: each system's speedup over DDP against the link rate;
* ``vs_bound.png``: time per batch of each system against the bound (and its parts, and the
  reachable bound where σ was measured);
* ``energy.png`` (with ``--power``): joules per sample of each system, per link rate.

One panel per (model, host count).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _panels(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """(model, hosts) -> its rows in rate order (highest rate first, as swept)."""
    panels: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        panels.setdefault((row["model"], row["hosts"]), []).append(row)
    return panels


def _labels(rows: list[dict]) -> list[str]:
    """Every system that ran in some row, in the order of the rows."""
    labels: list[str] = []
    for row in rows:
        labels += [label for label, s in row["systems"].items() if s["status"] == "ok" and label not in labels]
    return labels


def _grouped(ax: plt.Axes, rows: list[dict], value: str, error: str) -> list[float]:
    """Bars of ``value`` +- ``error`` per system, grouped by rate; the group centres."""
    labels = _labels(rows)
    width = 0.8 / max(1, len(labels))
    centres = list(range(len(rows)))
    for k, label in enumerate(labels):
        xs, ys, errs = [], [], []
        for x, row in zip(centres, rows):
            s = row["systems"].get(label, {})
            if s.get("status") == "ok":
                xs.append(x - 0.4 + width * (k + 0.5))
                ys.append(s[value])
                errs.append(s[error] or 0.0)
        ax.bar(xs, ys, width, yerr=errs if any(errs) else None, capsize=3, label=label)  # no interval: no bars
    ax.set_xticks(centres, [row["rate"] for row in rows])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("link rate (each way)")
    return centres


def _levels(ax: plt.Axes, centres: list[float], values: list[float], label: str, style: str) -> None:
    """A black level across each rate's group of bars (the bound or one of its parts)."""
    ax.hlines(values, [c - 0.45 for c in centres], [c + 0.45 for c in centres], colors="black",
              linestyles=style, linewidth=1.5, label=label)


def _chart(rows: list[dict], path: Path, fill: Callable[[plt.Axes, list[dict]], None]) -> Path:
    """One panel per (model, hosts), each drawn by ``fill``, titled, with its legend; saved to ``path``."""
    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(8.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels.values()):
        fill(ax, panel)
        first = panel[0]
        ax.set_title(f"{first['model']}, {first['ranks']} ranks on {first['hosts']} hosts")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput(ax: plt.Axes, panel: list[dict]) -> None:
    centres = _grouped(ax, panel, "throughput", "throughput_ci95")
    _levels(ax, centres, [row["bound_throughput"] for row in panel], "data-parallel bound", "-")
    pipeline = [(c, row["batch_size"] / own["bound_s"]) for c, row in zip(centres, panel)
                for own in [next((s["own_bound"] for s in row["systems"].values() if s.get("own_bound")), None)]
                if own and own.get("bound_s")]
    if pipeline:
        xs, values = zip(*pipeline)
        _levels(ax, list(xs), list(values), "pipeline bound", "--")
    ax.set_ylabel("samples/s, all ranks (95% CI)")


def _speedup(ax: plt.Axes, panel: list[dict]) -> None:
    for label in _labels(panel):
        points = [(row["rate_bps"] / 1e6, row["systems"][label]["speedup_over_ddp"]) for row in panel
                  if row["systems"].get(label, {}).get("speedup_over_ddp") is not None]
        if points:
            ax.plot(*zip(*sorted(points)), marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("link rate, Mbit/s (each way)")
    ax.set_ylabel("speedup over DDP (samples/s over DDP's)")


def _vs_bound(ax: plt.Axes, panel: list[dict]) -> None:
    centres = _grouped(ax, panel, "batch_s", "ci95")
    _levels(ax, centres, [row["bound_s"] for row in panel], "bound max(compute, comm)", "-")
    _levels(ax, centres, [row["compute_s"] for row in panel], "compute only", ":")
    _levels(ax, centres, [row["comm_s"] for row in panel], "all-reduce at nominal rate", "--")
    reachable = [(c, row["reachable_s"]) for c, row in zip(centres, panel) if row.get("reachable_s")]
    if reachable:
        xs, values = zip(*reachable)
        _levels(ax, list(xs), list(values), "reachable max(comm, compute + its CPU cost)", "-.")
    ax.set_ylabel("seconds per batch (95% CI)")


def _energy(ax: plt.Axes, panel: list[dict]) -> None:
    _grouped(ax, panel, "joules_per_sample", "joules_ci95")
    ax.set_ylabel("joules per sample, all devices (--power)")


def draw(rows: list[dict], folder: Path) -> list[Path]:
    """The charts into ``folder`` (energy.png when the rows have energy); their paths."""
    charts = [("throughput.png", _throughput), ("speedup_vs_ddp.png", _speedup), ("vs_bound.png", _vs_bound)]
    if any("energy" in s for row in rows for s in row["systems"].values()):
        charts.append(("energy.png", _energy))
    return [_chart(rows, folder / name, fill) for name, fill in charts]

"""Draw docs/architecture.png: PipeDAP's layers, threads and the path of one gradient.

Run from anywhere: ``python docs/figures/architecture.py``. Needs matplotlib only.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "architecture.png"

# Colours per layer.
USER, PY, PLAN, CORE, HARNESS, NET = "#f2f2f2", "#dbe9f6", "#e3f1dc", "#fbe3cf", "#ece3f3", "#f6f6d6"


def box(ax, x, y, w, h, title, lines=(), color=PY, title_size=10.5, size=8.5, bold=True):
    """A rounded box with a bold title and smaller lines below it; returns its (x, y, w, h)."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.0,rounding_size=0.12",
                                linewidth=1.0, edgecolor="#444444", facecolor=color))
    ax.text(x + w / 2, y + h - 0.22, title, ha="center", va="top", fontsize=title_size,
            fontweight="bold" if bold else "normal")
    for i, line in enumerate(lines):
        ax.text(x + w / 2, y + h - 0.58 - 0.30 * i, line, ha="center", va="top", fontsize=size, color="#222222")
    return x, y, w, h


def region(ax, x, y, w, h, label, color):
    """A large background rectangle that groups boxes of one layer, labelled at its top left."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.0,rounding_size=0.2",
                                linewidth=1.2, edgecolor="#888888", facecolor=color, alpha=0.45))
    ax.text(x + 0.15, y + h - 0.12, label, ha="left", va="top", fontsize=9.5, style="italic", color="#333333")


def arrow(ax, start, end, label="", color="#333333", style="-|>", rad=0.0, label_at=0.5, dx=0.08, dy=0.0,
          ha="left", size=8.0, dashed=False):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=13, color=color, linewidth=1.3,
                                 connectionstyle=f"arc3,rad={rad}", linestyle="--" if dashed else "-"))
    if label:
        x = start[0] + (end[0] - start[0]) * label_at + dx
        y = start[1] + (end[1] - start[1]) * label_at + dy
        ax.text(x, y, label, fontsize=size, ha=ha, va="center", color=color,
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85))


def main() -> None:
    fig, ax = plt.subplots(figsize=(15, 11))
    ax.set_xlim(0, 15)
    ax.set_ylim(0, 11)
    ax.axis("off")
    ax.text(7.5, 10.8, "PipeDAP: layers, threads and the path of one gradient", ha="center", va="top",
            fontsize=14, fontweight="bold")

    # --- the user's script ---------------------------------------------------------------
    box(ax, 0.3, 9.2, 9.4, 1.1, "training script (main Python thread, autograd)",
        ["model(x) -> loss.backward() -> opt.step()   |   pipedap.allreduce(t), hvd-style calls"], USER)

    # --- Python layer --------------------------------------------------------------------
    region(ax, 0.15, 5.05, 9.7, 3.85, "Python package pipedap/ (torch)", PY)
    box(ax, 0.4, 6.35, 4.3, 2.15, "optimizer.py -> reducer.py",
        ["DistributedOptimizer: any torch.optim class",
         "Reducer: buckets.py (.grad = views), readiness,",
         "grad hook: bucket complete -> submit in plan order",
         "forward pre-hook: wait for AG, apply update"], PY)
    box(ax, 5.0, 6.35, 4.6, 2.15, "comm.py -> engine.py",
        ["comm: Horovod API, *_async -> int handle",
         "engine: Collective, submit() -> Work",
         "tensor -> (address, count, dtype, device)",
         "process_sets.py: sets of ranks"], PY)
    box(ax, 0.4, 5.25, 4.3, 0.95, "functions.py, profiler.py, settings.py",
        ["broadcast state; layer times; PIPEDAP_* checked"], PY, size=8)
    box(ax, 6.6, 5.25, 3.0, 0.95, "online_planner.py",
        ["+ measure.py: DeAR first, then plan"], PY, title_size=9.5, size=8)

    # --- planner -------------------------------------------------------------------------
    region(ax, 10.15, 5.05, 4.65, 5.25, "planner/ (pure Python + numpy)", PLAN)
    box(ax, 10.4, 5.25, 4.15, 4.6, "plan = data (JSON)",
        ["profile.py: tf, tb, u, bytes per layer",
         "costmodel.py: T(M) = a + b*M (rs, ag, ar)",
         "fusion.py: which layers share a bucket",
         "simulator.py: one compute stream, one link",
         "schedules.py: WFBP, ByteScheduler, DeAR,",
         "PipeDAP greedy, exact (DP) planner",
         "plan.py: groups + backward/forward",
         "submissions, validated, digest",
         "gantt.py: charts of simulated timelines",
         "make.py: make_plan(), the one entry",
         "in: profile + cost model   out: plan"], PLAN, size=8.5)

    # --- C++ core ------------------------------------------------------------------------
    region(ax, 0.15, 0.95, 9.7, 3.75, "comm_core/ (C++17, pybind11; raw buffers, no torch)", CORE)
    box(ax, 5.0, 3.5, 4.65, 0.8, "submit(ops) -> Handle",
        ["enqueue, return at once; wait() / done() / timings"], CORE, title_size=9.5, size=8)
    box(ax, 2.95, 1.15, 4.3, 2.0, "engine thread (one per process)",
        ["1. agree: 24-byte fingerprint with every rank;",
         "    the next one's agreement overlaps this data",
         "2. data, in submission order: host ring (large),",
         "    MPI nonblocking collectives (small), NCCL (CUDA)",
         "3. complete or fail the Handle"], CORE, size=8)
    box(ax, 0.4, 1.15, 2.2, 2.0, "communicators",
        ["per process set:", "data, agree (fingerprints)", "world side dup: mismatch", "details, status questions"],
        CORE, title_size=9.5, size=8)
    box(ax, 7.6, 2.2, 2.05, 0.95, "watchdog thread",
        ["stall report 60 s, abort 600 s"], CORE, title_size=9, size=7.5)
    box(ax, 7.6, 1.15, 2.05, 0.95, "status channel",
        ["other ranks say what they did"], CORE, title_size=9, size=7.5)

    # --- network -------------------------------------------------------------------------
    box(ax, 0.4, 0.1, 9.2, 0.65, "MPI (Open MPI: TCP / shared memory)  and  NCCL (GPUs)  ->  other ranks",
        [], NET, title_size=9.5)

    # --- harness -------------------------------------------------------------------------
    region(ax, 10.15, 0.1, 4.65, 4.6, "harness (measure and compare)", HARNESS)
    box(ax, 10.4, 0.3, 4.15, 3.95, "pipedap/tools/",
        ["bench.py: training benchmark, baselines",
         "(PipeDAP, DeAR, WFBP, DDP, Horovod)",
         "plan.py CLI: profile, plan, what-if",
         "timeline.py: measured vs predicted",
         "bench_comm.py: collective bandwidth",
         "compare.py: every system vs the bound",
         "testbed/: emulated hosts (netns + tc)",
         "dist.sh + configs/: launcher"], HARNESS, size=8.5)

    # --- arrows ------------------------------------------------------------------------------
    red, grey, green = "#b03a2e", "#555555", "#2e7d32"
    arrow(ax, (3.6, 9.2), (3.6, 8.5), "backward: grad hooks", red, dx=0.1)
    arrow(ax, (7.3, 9.2), (7.3, 8.5), "collectives", grey, dx=0.1)
    arrow(ax, (4.7, 7.4), (5.0, 7.4), "", red, style="<|-|>")
    arrow(ax, (5.6, 6.35), (5.6, 4.3), "OpSpecs down,\nwait() up", red, style="<|-|>", dx=0.1, label_at=0.55)
    arrow(ax, (6.2, 3.5), (6.2, 3.15), "", red, style="<|-|>")
    arrow(ax, (5.15, 1.15), (5.15, 0.75), "", red, style="<|-|>")
    arrow(ax, (7.25, 2.75), (7.6, 2.75), "", grey, style="<|-|>")
    arrow(ax, (7.25, 1.6), (7.6, 1.6), "", grey, style="<|-|>")
    arrow(ax, (2.95, 2.2), (2.6, 2.2), "", grey)
    arrow(ax, (9.6, 5.9), (10.4, 5.9), "", green)
    arrow(ax, (10.4, 5.55), (9.6, 5.55), "", green)
    arrow(ax, (12.5, 4.25), (12.5, 5.25), "uses", "#6a1b9a", dx=0.1)

    ax.text(0.45, 4.15, "red: one gradient bucket", fontsize=8.5, color=red, va="top")
    ax.text(0.45, 3.85, "hook -> reduce-scatter -> all-gather", fontsize=8.5, color=red, va="top")
    ax.text(0.45, 3.55, "-> update in the next forward", fontsize=8.5, color=red, va="top")

    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Where a pipeline's time goes: every rank's events of one run, split per minibatch.

``main_with_runtime.py --trace FILE`` writes, from the last stage, every rank's record::

    {"schedule": "1f1b", "warmup": 3, "ranks": [{"rank": 0, "stage": 0, "replica": 0,
      "alone": {"forward": s, "backward": s},
      "events": [[kind, unit, start, end, waited], ...]}, ...]}

``alone`` is the stage's compute on one unit with nothing else running
(:meth:`StageRuntime.compute_alone`, timed before training); ``events`` are the forward,
backward and step events of the last epoch on the rank's own ``time.perf_counter()``
clock, with the seconds each spent waiting for received data.

:func:`summarize` splits each rank's steady state (from its forward of unit ``warmup``
to its forward of the unit three before its last, leaving out the fill and the drain)
into what one minibatch costs it: forward and backward compute (less their waits),
waiting for activations or gradients, the optimizer step, and the rest (time between
events: posting receives and sends, Python). Against ``alone`` the compute says how
much slower the stage computed while its transfers ran; the slowest stage's wall time
against its compute alone is the distance to the pipeline's bound, split.

    python -m pipedap.pipeline.trace FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

TAIL = 3  # forward units left out at the end of each rank's window (the drain)
PARTS = ("forward", "backward", "waiting", "step", "other")


def summarize(doc: Mapping) -> list[dict]:
    """Per rank: seconds per minibatch in steady state, split into PARTS, with ``wall`` and ``alone``."""
    rows = []
    for rank in doc["ranks"]:
        events = [tuple(e) for e in rank["events"]]
        forwards = sorted((unit, start) for kind, unit, start, _, _ in events if kind == "forward")
        first = next((start for unit, start in forwards if unit >= doc["warmup"]), None)
        if first is None or len(forwards) < TAIL + 2:
            raise ValueError(f"rank {rank['rank']}: {len(forwards)} forward events leave no steady state after "
                             f"warmup {doc['warmup']}; run more minibatches")
        last = forwards[-1 - TAIL][1]
        units = sum(1 for _, start in forwards if first <= start < last)
        if units < 2 or last <= first:
            raise ValueError(f"rank {rank['rank']}: fewer than 2 minibatches between the warmup and the drain; "
                             "run more minibatches")
        parts = dict.fromkeys(PARTS, 0.0)
        for kind, _, start, end, waited in events:
            if first <= start < last:
                parts[kind if kind in ("forward", "backward") else "step"] += end - start - waited
                parts["waiting"] += waited
        parts["other"] = (last - first) - sum(parts.values())
        alone = rank["alone"]["forward"] + rank["alone"]["backward"]
        per_unit = {k: v / units for k, v in parts.items()}
        rows.append({"rank": rank["rank"], "stage": rank["stage"], "units": units, "wall": (last - first) / units,
                     **per_unit, "alone": alone,
                     "compute_slowdown": (per_unit["forward"] + per_unit["backward"]) / alone - 1 if alone else None})
    return rows


def report(rows: list[dict]) -> str:
    """The table :func:`summarize` gives, and the slowest stage's distance to its compute alone, split."""
    lines = [f"{'rank':>4} {'stage':>5} {'units':>5} {'wall':>8} {'forward':>8} {'backward':>8} {'waiting':>8} "
             f"{'step':>8} {'other':>8} {'alone':>8} {'compute vs alone':>16}   (seconds per minibatch)"]
    for r in rows:
        slowdown = f"{100 * r['compute_slowdown']:+.1f}%" if r["compute_slowdown"] is not None else "-"
        lines.append(f"{r['rank']:>4} {r['stage']:>5} {r['units']:>5} {r['wall']:>8.3f} {r['forward']:>8.3f} "
                     f"{r['backward']:>8.3f} {r['waiting']:>8.3f} {r['step']:>8.3f} {r['other']:>8.3f} "
                     f"{r['alone']:>8.3f} {slowdown:>16}")
    bound = max(rows, key=lambda r: r["alone"])
    gap = bound["wall"] - bound["alone"]
    compute = bound["forward"] + bound["backward"] - bound["alone"]
    lines.append(
        f"slowest stage alone: rank {bound['rank']} (stage {bound['stage']}), {bound['alone']:.3f} s; it took "
        f"{bound['wall']:.3f} s per minibatch ({100 * gap / bound['alone']:+.1f}%): slower compute "
        f"{compute:+.3f} s, waiting {bound['waiting']:.3f} s, step {bound['step']:.3f} s, other {bound['other']:.3f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedap.pipeline.trace", description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="the file main_with_runtime.py --trace wrote")
    args = parser.parse_args(argv)
    try:
        print(report(summarize(json.loads(Path(args.trace).read_text()))))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {args.trace}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plan a model's communication: ``python -m pipedap.tools.plan --help``.

Reads a layer profile (a JSON file, or measured now on a model from the ``models``
package), a cost model (a fitted JSON file, or assumed link parameters), searches fusion
and order with every schedule, prints the predicted iteration times against the lower
bound, and writes the chosen plan (JSON) and a Gantt chart of the simulated timelines.

Example (8 workers on 500 Mbit/s links, where communication and compute are about
equal on a 2-core CPU and the schedules differ most; about 35 s, most of it profiling)::

    python -m pipedap.tools.plan --model resnet50 --batch-size 8 \\
        --workers 8 --bandwidth 500mbit --latency 50us --out out/plan.json --gantt out/plan.png
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from pipedap import units
from pipedap.planner import PLANNABLE, costmodel, energy, fusion, make_plan
from pipedap.planner.costmodel import CostModel
from pipedap.planner.make import sharded_profile
from pipedap.planner.plan import PlanError
from pipedap.planner.profile import Profile
from pipedap.tools import options
from pipedap.tools.progress import step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipedap.tools.plan",
        description="Plan the reduce-scatter/all-gather schedule of a model and compare schedules.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", metavar="FILE", help="layer profile JSON (from pipedap.profiler)")
    source.add_argument("--model", metavar="NAME", help="profile this model from the models package now (CPU)")
    parser.add_argument("--batch-size", type=options.integer(1), default=8, help="batch size for --model (default 8)")
    parser.add_argument("--iterations", type=options.integer(1), default=5, help="measured iterations for --model (default 5)")
    parser.add_argument("--save-profile", metavar="FILE", help="write the measured profile here")
    parser.add_argument("--cost-model", metavar="FILE", help="fitted cost-model JSON (needs --workers)")
    parser.add_argument("--hosts", help="comma-separated host set to pick from --cost-model")
    parser.add_argument("--workers", type=options.integer(2), help="world size (at least 2)")
    parser.add_argument("--bandwidth", type=options.rate, help="assumed link bandwidth, e.g. 1gbit, 10gbit, 1.25GB/s")
    parser.add_argument("--latency", type=options.duration, default="50us", help="assumed per-step latency (default 50us)")
    parser.add_argument("--interference", type=options.fraction,
                        help="compute's slow-down while the link is busy, e.g. 0.3 or 30%% (replaces the cost "
                             "model's measured value; default: the file's, 0 with --bandwidth)")
    parser.add_argument(
        "--fusion", default="search",
        help=f"fusion candidates: {fusion.FUSION_SPECS} (default search: every candidate; tune: optuna)",
    )
    parser.add_argument("--tune-trials", type=options.integer(1), default=30, help="trials for --fusion tune (default 30)")
    parser.add_argument("--schedule", choices=PLANNABLE, default="optimal", help="schedule of the written plan")
    parser.add_argument("--shard-update", action="store_true",
                        help="plan for DistributedOptimizer(shard_update=True): each rank updates 1/N of every "
                             "bucket in step(), before its all-gather; the order is DeAR's, the fusion is searched")
    parser.add_argument("--out", metavar="FILE", help="write the plan JSON here")
    parser.add_argument("--gantt", metavar="FILE", help="write a Gantt chart (PNG) of every schedule here")
    parser.add_argument("--power", metavar="SPEC", type=energy.power_argument,
                        help="device powers for an energy estimate per schedule: busy=W,idle=W[,link_busy=W,"
                             "link_idle=W] or a JSON file (pipedap/planner/energy.py)")
    return parser


def load_profile(args: argparse.Namespace) -> Profile:
    """The profile from --profile, or measured on --model."""
    if args.profile:
        return Profile.load(args.profile)
    try:
        import torch

        import models
        from pipedap.profiler import profile_model
    except ImportError as err:
        raise ImportError(
            f"--model needs torch and the models package ({err}); run from the repository root, "
            f"or profile elsewhere and pass --profile FILE"
        ) from None
    model = models.get(args.model)
    inputs, targets = models.synthetic_batch(args.model, args.batch_size, generator=torch.Generator().manual_seed(0))
    meta = {"model": args.model, "batch_size": args.batch_size}
    return profile_model(model, inputs, targets, models.loss_fn(args.model), iterations=args.iterations, meta=meta)


def load_cost(args: argparse.Namespace, parser: argparse.ArgumentParser) -> CostModel:
    """The cost model from --cost-model, or from the assumed --workers/--bandwidth/--latency; --interference
    replaces its interference."""
    if args.workers is None:
        parser.error("--workers is required (the world size the plan is for)")
    if args.cost_model:
        hosts = args.hosts.split(",") if args.hosts else None
        model = costmodel.load(args.cost_model, args.workers, hosts)
    elif not args.bandwidth:
        parser.error("give either --cost-model FILE or --bandwidth (with --workers and --latency)")
    else:
        model = costmodel.from_link(args.workers, units.parse_bandwidth(args.bandwidth),
                                    units.parse_duration(args.latency))
    return model if args.interference is None else dataclasses.replace(model, interference=args.interference)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for path in filter(None, (args.out, args.gantt, args.save_profile)):
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # e.g. out/ on a fresh clone
        with step("loading profile" if args.profile else f"profiling {args.model} (batch {args.batch_size}, CPU)"):
            profile = load_profile(args)
        if args.save_profile:
            profile.save(args.save_profile)
            print(f"  profile written to {args.save_profile}")
        cost = load_cost(args, parser)
        compute = sum(layer.tb + layer.tf + layer.u for layer in profile.layers)
        nbytes = sum(layer.nbytes for layer in profile.layers)
        print(f"  {len(profile)} layers, {nbytes / 1e6:.1f} MB of gradients, compute {compute * 1e3:.1f} ms/iteration; "
              f"AR of everything at once: {cost.ar.time(nbytes) * 1e3:.1f} ms on {cost.world_size} workers; "
              f"compute {100 * cost.interference:.0f}% slower while the link is busy")
        spec = f"tune:{args.tune_trials}" if args.fusion == "tune" else args.fusion
        with step(f"fusion candidates ({spec})"):
            candidates = fusion.groupings(spec, profile, cost)
        planners, chosen_name = tuple(fusion.PLANNERS), args.schedule
        if args.shard_update:  # the only order a sharded update allows
            planners, chosen_name = ("dear",), "dear"
        with step(f"planning {len(candidates)} fusion candidate(s) x {len(planners)} schedules"
                  + (" (sharded update)" if args.shard_update else "")):
            searched = sharded_profile(profile, cost.world_size) if args.shard_update else profile
            _, considered = fusion.search(searched, cost, planners=planners, groupings=candidates,
                                          shard_update=args.shard_update)
        chosen = min((s for s in considered if s.schedule.name == chosen_name),
                     key=lambda s: s.schedule.iteration_time)
        print_table(considered, chosen)
        print_energy(considered, args.power, int(profile.meta.get("batch_size", args.batch_size)))
        if args.out:
            plan = make_plan(profile, cost, planner=args.schedule, fusion=candidates, shard_update=args.shard_update)
            plan.save(args.out)
            split = (f", tied embedding split: group {', '.join(map(str, plan.split))}"
                     + (" (lookup served from the shards)" if plan.defer else "") if plan.split else "")
            print(f"plan ({args.schedule}, fusion {chosen.fusion}, {len(plan.groups)} groups{split}, digest "
                  f"{plan.digest()[:12]}) written to {args.out}")
        if args.gantt:
            from pipedap.planner import gantt

            with step(f"drawing Gantt chart to {args.gantt}"):
                same = {name: s.schedule.timeline for name, s in best_of_each(
                    [s for s in considered if s.fusion == chosen.fusion]).items()}
                gantt.draw(same, args.gantt, title=f"fusion {chosen.fusion}, {cost.world_size} workers")
    except (ValueError, ImportError, PlanError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def by_schedule(considered: Sequence[fusion.Scored]) -> dict[str, list[fusion.Scored]]:
    """The considered (fusion, schedule) pairs of each schedule, in the order they came."""
    rows: dict[str, list[fusion.Scored]] = {}
    for s in considered:
        rows.setdefault(s.schedule.name, []).append(s)
    return rows


def best_of_each(considered: Sequence[fusion.Scored]) -> dict[str, fusion.Scored]:
    """Each schedule's fastest (fusion, schedule) pair."""
    return {name: min(rows, key=lambda s: s.schedule.iteration_time) for name, rows in by_schedule(considered).items()}


def print_table(considered: Sequence[fusion.Scored], chosen: fusion.Scored) -> None:
    """Per schedule: the time without fusion, the best over fusions, speedups, planning time."""
    by_name = by_schedule(considered)
    best = best_of_each(considered)
    base = best["wfbp"].schedule.iteration_time if "wfbp" in best else None
    print(f"\n{'schedule':<14}{'no fusion ms':>13}{'best ms':>10}  {'best fusion':<16}{'vs WFBP':>8}{'plan ms':>9}")
    for name, rows in by_name.items():
        unfused = min((s.schedule.iteration_time * 1e3 for s in rows if s.fusion == "none"), default=float("nan"))
        top = best[name]
        speedup = f"{base / top.schedule.iteration_time:.3f}x" if base else "-"
        print(f"{name:<14}{unfused:>13.2f}{top.schedule.iteration_time * 1e3:>10.2f}  {top.fusion:<16}"
              f"{speedup:>8}{top.seconds * 1e3:>9.1f}")
    bound = chosen.schedule.timeline.problem.lower_bound()
    print(f"{'lower bound':<14}{'':>13}{bound * 1e3:>10.2f}  {chosen.fusion:<16}  (fusion of the written plan)")
    info = chosen.schedule.info
    if "proven_optimal" in info:
        print(f"exact planner: proven optimal = {info['proven_optimal']}, peak states {info['peak_states']}")
    print()


def print_energy(considered: Sequence[fusion.Scored], powers: energy.Powers | None, batch_size: int) -> None:
    """Per schedule (its best fusion): each device's busy and idle time per iteration, and the energy."""
    best = best_of_each(considered)
    header = f"{'schedule':<14}{'iter ms':>9}{'compute busy':>13}{'idle':>8}{'link busy':>10}{'idle':>8}"
    if powers:
        header += f"{'J/iter':>9}{'J/sample':>10}"
    print(f"per worker and iteration (busy and idle ms; batch {batch_size})"
          + (f"; powers {powers.describe()}" if powers else "; --power for the energy"))
    print(header)
    for name, s in best.items():
        e = energy.estimate(energy.Occupancy.of_timeline(s.schedule.timeline), powers, batch_size)
        row = (f"{name:<14}{e['seconds'] * 1e3:>9.1f}{e['compute']['busy_s'] * 1e3:>13.1f}"
               f"{e['compute']['idle_s'] * 1e3:>8.1f}{e['link']['busy_s'] * 1e3:>10.1f}{e['link']['idle_s'] * 1e3:>8.1f}")
        if powers:
            row += f"{e['joules']:>9.4g}{e['joules_per_sample']:>10.4g}"
        print(row)
    print()


if __name__ == "__main__":
    sys.exit(main())

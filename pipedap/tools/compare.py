"""Every system against the bound on an emulated cluster: ``python -m pipedap.tools.compare --help``.

For each host count it brings up one testbed (:class:`pipedap.tools.testbed.Testbed`) and, per
link rate (reshaped in place), per model, runs every system with the same batch and
iteration counts under ``pipedap.tools.bench``: PipeDAP with the exact planner (online plan),
PipeDAP with the paper's greedy planner (``PIPEDAP_PLANNER=greedy``), PipeDAP planning as if
communication cost compute nothing (``PipeDAP-plain``: ``PIPEDAP_INTERFERENCE=off``), PipeDAP reducing a tied
word embedding whole (``PipeDAP-whole``: ``PIPEDAP_TIED_SPLIT=0``), PipeDAP never serving its lookup from
the shards (``PipeDAP-undeferred``: ``PIPEDAP_TIED_DEFER=0``), DeAR, WFBP, ByteScheduler
(online plan of its piece order), DDP (gloo), Horovod (when it imports) and the pipelines, in
interleaved rounds (see [Note: interleaved rounds] in :mod:`pipedap.tools.compare_sweep`).

[Note: the bound] No data-parallel system beats ``max(compute, communication)``:

* compute: the single-process job with no communication (:mod:`pipedap.tools.compare_compute`),
  one copy per rank at once, each pinned to that rank's core (alone it would run faster
  than any rank of the distributed job, whose cores are busy);
* communication: a ring all-reduce of the gradients moves ``2(p-1)/p x bytes`` over each
  link, at the nominal rate. The rate the comm core achieved on this testbed (calibration,
  ``pipedap.tools.bench_comm`` all-reduce) is reported next to it, with the bound it implies.

Where the setting's planned jobs measured the interference σ, the reachable bound
max(link, compute + the CPU cost of its bytes) is reported too, with how far DDP is above
it ([Note: the reachable bound] in :mod:`pipedap.tools.compare_report`).

[Note: timing decoupled schedules] DeAR and PipeDAP leave a batch's last collectives
running when ``step()`` returns. The benchmark's timed window starts after a barrier (nothing
pending) and its last iteration waits for what is still running, so the window holds
exactly n batches of communication. Its edges are not steady state, though: in the first
iteration the link idles through the forward (no all-gathers are pending yet), and the last
one waits for its whole tail with no forward to hide it. Where communication dominates
this adds about one forward per window (ResNet-50 at 125 Mbit/s, greedy plan: 4.5, 7.2, 7.4
and 11.6 s), i.e. forward/n to the window mean. So the time per batch is the mean of the
iterations between the edges (steady state; each waits for exactly one batch's
all-gathers), the same for every system; the window mean is kept next to it (see
:func:`pipedap.tools.stats.steady_statistics`). With fewer than 3 iterations there are
no inner ones: all count.

Each system's time per batch (steady state, with its 95% confidence interval) is reported
with its distance from the bound, PipeDAP's speedup over it, its speedup over DDP paired
round by round (the mean of the rounds' ratios with their interval: a round slow for
every system cancels out), and, where the system has a plan, the predicted time.
Outputs: one JSON with everything (commands, testbed settings, affinity, each run's
benchmark JSON), three charts, a table on stdout, and each run's log. A system that
fails is recorded with the tail of its output; the sweep goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import models
from pipedap.planner import energy
from pipedap.tools.compare_jobs import horovod_available
from pipedap.tools.compare_report import table
from pipedap.tools.compare_sweep import SYSTEMS, CompareError, Sweep, System, system_named
from pipedap.tools.processes import signals_as_exceptions
from pipedap.tools.stats import rounds_statistics
from pipedap.tools.testbed.network import TestbedError
from pipedap.units import parse_rate_bps

JSON_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipedap.tools.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example (the real measurement, about an hour):\n  python -m pipedap.tools.compare --out out/compare\n"
               "Smoke run (a few minutes):\n  python -m pipedap.tools.compare --quick --out out/compare-quick")
    parser.add_argument("--models", help="comma-separated models, e.g. resnet50,vgg16,bert_base "
                                                             "(default resnet50)")
    parser.add_argument("--hosts", default="2", help="comma-separated host counts, one testbed each (default 2; "
                                                     "4 hosts on 2 cores share cores)")
    parser.add_argument("--slots", type=int, default=1, help="ranks per host (default 1)")
    parser.add_argument("--rates", help="comma-separated link rates, each way (default 500mbit,250mbit,125mbit; "
                                        "--quick: 500mbit)")
    parser.add_argument("--systems", default=",".join(s.label for s in SYSTEMS),
                        help="comma-separated subset of the systems (default: all; Horovod only when it imports); "
                             "a data-parallel one with -fp16 or -bf16 appended (PipeDAP-fp16, DDP-fp16) sends its "
                             "gradients in that dtype (bench --compression); PipeDAP, DeAR or WFBP with -sharded appended "
                             "(last: DeAR-fp16-sharded) updates sharded (bench --shard-update)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="the optimizer every system trains with (bench --optimizer; default sgd)")
    parser.add_argument("--batch-size", type=int, help="per rank (default 8; --quick: 2)")
    parser.add_argument("--image-size", type=int, help="image side of image models (default: the model's; --quick: 32)")
    parser.add_argument("--sentence-len", type=int, help="sequence length of language models (default: the model's)")
    parser.add_argument("--warmup", type=int, help="untimed batches (default 3; --quick: 1); every system's "
                                                   "warmup lasts until memory is warm, PipeDAP's until it has "
                                                   "planned online")
    parser.add_argument("--iters", type=int, help="timed iterations per round; time per batch is the mean of the "
                                                  "inner ones, see the note above (default 4; --quick: 3)")
    parser.add_argument("--batches-per-iter", type=int, default=1, help="batches per timed iteration (default 1)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds: every system runs once per round, the order "
                                                   "rotated (default 3; --quick: 1); see the note in compare_sweep")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet50 at 32x32, batch 2, 1 warmup, "
                                                             "3 iterations, one rate (explicit options win)")
    parser.add_argument("--qdisc", default="tbf", choices=("tbf", "htb"), help="the testbed's rate limiter")
    parser.add_argument("--burst", default="256kb", help="token bucket size (default 256kb)")
    parser.add_argument("--latency", default="20ms", help="tbf queueing limit (default 20ms)")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="skip measuring the achieved link rate at each rate (about 20 s each)")
    parser.add_argument("--timeout", type=float, help="seconds per run (default: 60 + 3x its estimate)")
    parser.add_argument("--out", help="output folder (default out/compare-<date>-<time>)")
    parser.add_argument("--power", metavar="SPEC", type=energy.power_argument,
                        help="device powers: each system's energy per sample in the table, the JSON and energy.png "
                             "(busy=W,idle=W[,link_busy=W,link_idle=W] or a JSON file; pipedap/planner/energy.py); "
                             "also with --summarize, for a finished sweep")
    parser.add_argument("--summarize", metavar="FOLDER",
                        help="no runs: recompute the table, JSON and charts of the sweep in FOLDER from its "
                             "compare.json and the benchmark results it holds")
    return parser


QUICK = {"models": "resnet50", "rates": "500mbit", "batch_size": 2, "image_size": 32, "warmup": 1, "iters": 3,
         "rounds": 1}
# 3 rounds of 4 timed iterations: 6 steady-state iterations per system (the edges of each round are left out)
DEFAULTS = {"models": "resnet50", "rates": "500mbit,250mbit,125mbit", "batch_size": 8, "warmup": 3, "iters": 4,
            "rounds": 3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the options; CompareError says which one is wrong."""
    args = build_parser().parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:  # explicit options win over --quick
            setattr(args, key, value)
    args.models = args.models.split(",")
    for model in args.models:
        try:
            models.info(model)
        except ValueError as err:
            raise CompareError(str(err)) from None
    args.rates = args.rates.split(",")
    for rate in args.rates:
        try:
            parse_rate_bps(rate)
        except ValueError as err:
            raise CompareError(f"--rates: {err}") from None
    try:
        args.hosts = [int(h) for h in args.hosts.split(",")]
    except ValueError:
        raise CompareError(f"--hosts takes comma-separated integers, got {args.hosts!r}") from None
    if any(h < 2 for h in args.hosts):
        raise CompareError("--hosts: a comparison needs at least 2 hosts (the compute-only job is the 1-rank case)")
    args.systems = [system_named(name) for name in args.systems.split(",")]
    for name in ("batch_size", "iters", "batches_per_iter", "slots", "rounds"):
        if getattr(args, name) < 1:
            raise CompareError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise CompareError(f"--warmup must be >= 0, got {args.warmup}")
    args.out = args.out or f"out/compare-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    return args


def summarize(folder: str, power: energy.Powers | None = None) -> int:
    """Recompute a finished sweep's statistics, comparison, table and charts from its compare.json
    (with ``power``: its energy too)."""
    path = Path(folder) / "compare.json"
    if not path.exists():
        print(f"error: --summarize: {path} does not exist; give the --out folder of a sweep", file=sys.stderr)
        return 2
    doc = json.loads(path.read_text())
    settings = doc["settings"]
    older = {"rounds": 1}  # sweeps recorded before this option
    if power is None and settings.get("power"):
        power = energy.Powers.from_dict(settings["power"])
    sweep = Sweep(argparse.Namespace(**{**older, **settings, "out": folder, "power": power,
                                        "systems": [System(**s) for s in settings["systems"]]}))
    sweep.args.out = settings["out"]  # as the sweep recorded it; the files go to sweep.out (folder)
    sweep.compute, sweep.testbeds, sweep.cores = doc["compute"], doc["testbeds"], doc["cores"]
    sweep.runs = [dict(r, **rounds_statistics([x["result"] for x in r.get("rounds", [r]) if x["status"] == "ok"]))
                  if r["status"] == "ok" else r for r in doc["runs"]]
    write_results(sweep, doc["wall_seconds"], doc["command"])
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        args = parse_args(argv)
        if args.summarize:
            return summarize(args.summarize, args.power)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    sweep = Sweep(args)
    sweep.out.mkdir(parents=True, exist_ok=True)
    if any(s.label == "Horovod" for s in args.systems):
        reason = horovod_available()
        if reason:
            sweep.skipped["Horovod"] = reason
            print(f"Horovod is skipped: {reason}", flush=True)
    cores = len(sweep.cores)
    for hosts in args.hosts:
        if hosts * args.slots > cores:
            print(f"note: {hosts * args.slots} ranks on {cores} cores: ranks share cores (rank r on core r mod "
                  f"{cores}), so compute is slower than on real hosts; the compute-only reference shares them "
                  "the same way", flush=True)
    with signals_as_exceptions():  # SIGTERM stops the running job and still writes what was measured
        try:
            for hosts in args.hosts:
                for model in args.models:
                    print(f"compute-only reference: {model}, {hosts * args.slots} pinned single-process jobs at once ...",
                          flush=True)
                    sweep.compute.append(sweep.measure_compute(model, hosts))
                    print(f"  {sweep.compute[-1]['batch_s']:.3f} s per batch", flush=True)
            estimate = sweep.plan_estimate_s()
            print(f"\n{sweep.total_runs} runs ({len(sweep.runnable)} systems x {args.rounds} interleaved rounds x "
                  f"{len(args.rates)} rates x {len(args.models)} models x {len(args.hosts)} host counts); estimated {estimate / 60:.0f} min "
                  f"(each run: launch + {args.warmup} warmup + {args.iters}x{args.batches_per_iter} timed batches at "
                  "compute + all-reduce time, PipeDAP planning included)", flush=True)
            for hosts in args.hosts:
                sweep.sweep_hosts(hosts)
        except (CompareError, TestbedError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        finally:
            write_results(sweep, time.perf_counter() - began, [sys.executable, "-m", "pipedap.tools.compare", *argv])
    return 0 if all(r["status"] != "failed" for r in sweep.runs) else 1


def write_results(sweep: Sweep, seconds: float, command: list[str]) -> None:
    """The JSON, the charts and the table of whatever has been measured (also after an error)."""
    from pipedap.tools import compare_charts

    args = sweep.args
    rows = sweep.comparison() if sweep.compute else []
    settings = {k: v for k, v in vars(args).items() if k not in ("systems", "power")}
    settings["systems"] = [dataclasses.asdict(s) for s in args.systems]
    settings["power"] = args.power.to_dict() if getattr(args, "power", None) else None
    doc = {"version": JSON_VERSION, "command": command,
           "wall_seconds": seconds, "settings": settings, "cores": sweep.cores,
           "compute": sweep.compute, "testbeds": sweep.testbeds, "runs": sweep.runs, "comparison": rows}
    path = sweep.out / "compare.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    charts = compare_charts.draw(rows, sweep.out) if rows else []
    print(table(rows))
    print(f"\nwrote {path}" + "".join(f", {c}" for c in charts) + f"; logs in {sweep.out / 'logs'}; "
          f"took {seconds / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())

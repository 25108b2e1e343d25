"""Sharded update against the whole update, on local ranks: time per batch and optimizer state per rank.

    python benchmarks/shard_update.py --json out/shard_update.json        (about 15 min on 2 cores)

For each case (BERT-base with AdamW, ResNet-50 with SGD and momentum), runs
``python -m pipedap.tools.bench`` under ``mpirun -np RANKS`` with DeAR's schedule, with and
without ``--shard-update``, in interleaved rounds (the order flips every round, so drift
on a shared machine hits both alike). Prints, per case, the time per batch of each (mean
of every round's steady iterations, with the interval of the round means), the ratio
sharded / whole, and the optimizer state bytes per rank; writes all of it as JSON with
the benchmark results of every run. On the emulated cluster use
``python -m pipedap.tools.compare --systems DeAR,DeAR-sharded --optimizer adamw`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipedap.tools.stats import rounds_statistics

CASES = {  # name -> bench options
    "bert_base-adamw": ["--model", "bert_base", "--optimizer", "adamw", "--batch-size", "4", "--sentence-len", "64"],
    "resnet50-sgd": ["--model", "resnet50", "--optimizer", "sgd", "--batch-size", "8"],
}
ROOT = Path(__file__).resolve().parents[1]


def run_bench(options: list[str], ranks: int, iters: int, out: Path) -> dict:
    """One benchmark job; its JSON result."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT))
    command = ["mpirun", "-np", str(ranks), "--oversubscribe", sys.executable, "-m", "pipedap.tools.bench",
               *options, "--baseline", "DeAR", "--num-warmup-batches", "2", "--num-iters", str(iters),
               "--num-batches-per-iter", "1", "--no-progress", "--json", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--ranks", type=int, default=2, help="local ranks (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--iters", type=int, default=5, help="timed batches per run (default 5)")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]}; choose from {', '.join(CASES)}")
    runs = {case: {False: [], True: []} for case in cases}
    total, done, started = len(cases) * 2 * args.rounds, 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for case in cases:
                for shard in ((False, True) if round_index % 2 == 0 else (True, False)):
                    done += 1
                    label = f"{case} {'sharded' if shard else 'whole'} round {round_index}"
                    eta = "" if done == 1 else f", about {(time.perf_counter() - started) / (done - 1) * (total - done + 1):.0f} s left"
                    print(f"[{done}/{total}] {label}{eta} ...", flush=True)
                    options = CASES[case] + (["--shard-update"] if shard else [])
                    result = run_bench(options, args.ranks, args.iters, Path(tmp) / "result.json")
                    runs[case][shard].append(result)
                    print(f"  {result['batch_time']['measured_s']:.3f} s per batch", flush=True)
    report = {"ranks": args.ranks, "rounds": args.rounds, "iters": args.iters, "cases": {}}
    print(f"\n{'case':<18} {'whole s/batch':>16} {'sharded s/batch':>16} {'sharded/whole':>14} "
          f"{'state/rank whole':>17} {'sharded':>12} {'ratio':>6}")
    for case in cases:
        whole, sharded = (rounds_statistics(runs[case][s]) for s in (False, True))
        state = {s: max(runs[case][s][-1]["optimizer_state_bytes"]) for s in (False, True)}
        ratio = sharded["batch_s"]["mean"] / whole["batch_s"]["mean"]
        report["cases"][case] = {"options": CASES[case], "whole": whole, "sharded": sharded, "time_ratio": ratio,
                                 "state_bytes_per_rank": {"whole": state[False], "sharded": state[True]},
                                 "state_ratio": state[True] / state[False],
                                 "results": {"whole": runs[case][False], "sharded": runs[case][True]}}

        def show(stats):
            ci = stats["batch_s"]["ci95"]
            return f"{stats['batch_s']['mean']:.3f}" + (f" +-{ci:.3f}" if ci is not None else "")

        print(f"{case:<18} {show(whole):>16} {show(sharded):>16} {ratio:>14.3f} {state[False] / 1e6:>15.1f}MB "
              f"{state[True] / 1e6:>10.1f}MB {state[True] / state[False]:>6.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak: a long run of every schedule, watching for leaks (resident memory, file descriptors,
threads, submissions left in the engine, Python objects).

    mpirun -np 2 python benchmarks/soak.py --iterations 2000 --json out/soak.json

Each schedule (wfbp, dear, pipedap, bytescheduler; fp16 compression on one more pipedap run)
trains a small model for ``--iterations`` steps on 2 ranks. Every ``--every`` steps each rank
samples its resident set (``/proc/self/statm``), open file descriptors (``/proc/self/fd``),
threads, the engine's unfinished submissions and the number of live Python objects. After the
warm-up (the first ``--warmup`` steps: buffers, plans and caches are made then) nothing may
grow by more than ``--tolerance`` (1%) from its first sample after warm-up to the largest
later one, except object counts, which may wobble by ``--object-slack`` objects. A growth
beyond that is printed with the figures and makes the exit status 1. Writes JSON (rank 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

import pipedap
from pipedap import _comm_core

RUNS = (("wfbp", "none"), ("dear", "none"), ("pipedap", "none"), ("bytescheduler", "none"), ("pipedap", "fp16"))
PAGE = resource.getpagesize()


def sample() -> dict:
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * PAGE
    return {"rss_bytes": resident, "fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task")), "pending": _comm_core.pending(),
            "objects": len(gc.get_objects())}


def soak(schedule: str, compression: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = pipedap.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model=model,
                                       schedule=schedule, compression=getattr(pipedap.Compression, compression),
                                       fusion_bytes=64 << 10)
    g = torch.Generator().manual_seed(pipedap.rank())
    samples = []
    started = time.perf_counter()
    for step in range(1, args.iterations + 1):
        x = torch.randn(32, 64, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % args.every == 0:
            pipedap.flush(model)
            gc.collect()
            samples.append(dict(sample(), step=step))
    seconds = time.perf_counter() - started
    steady = [s for s in samples if s["step"] > args.warmup]
    growth = {}
    for key in ("rss_bytes", "fds", "threads", "os_threads", "pending", "objects"):
        first, peak = steady[0][key], max(s[key] for s in steady)
        slack = args.object_slack if key == "objects" else 0
        growth[key] = {"first": first, "peak": peak, "ok": peak <= first * (1 + args.tolerance) + slack}
    return {"schedule": schedule, "compression": compression, "seconds": seconds, "samples": samples,
            "growth": growth, "ok": all(v["ok"] for v in growth.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000, help="steps per schedule (default 2000)")
    parser.add_argument("--every", type=int, default=100, help="sample every this many steps (default 100)")
    parser.add_argument("--warmup", type=int, default=200, help="steps not judged (default 200)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="allowed relative growth (default 0.01)")
    parser.add_argument("--object-slack", type=int, default=200, help="allowed growth of the Python object count")
    parser.add_argument("--json", help="write every sample here (rank 0)")
    args = parser.parse_args()
    if args.iterations <= args.warmup + args.every:
        parser.error("--iterations must exceed --warmup + --every (nothing would be judged)")
    torch.set_num_threads(1)
    pipedap.init()
    say = print if pipedap.rank() == 0 else (lambda *a, **k: None)
    say(f"# soak: {pipedap.size()} ranks, {len(RUNS)} runs x {args.iterations} steps, samples every {args.every}")
    results = []
    for schedule, compression in RUNS:
        mine = soak(schedule, compression, args)
        everyone = pipedap.allgather_object(mine["growth"], name="soak.growth")
        mine["ok"] = all(all(v["ok"] for v in growth.values()) for growth in everyone)
        results.append(mine)
        worst = {key: max(g[key]["peak"] / max(g[key]["first"], 1) for g in everyone) for key in everyone[0]}
        say(f"  {schedule:>13} {compression:>4}: {mine['seconds']:5.1f} s; after step {args.warmup}, peak/first: "
            + ", ".join(f"{key} {ratio:.4f}" for key, ratio in worst.items())
            + ("" if mine["ok"] else "  GROWTH beyond the tolerance"))
    ok = all(r["ok"] for r in results)
    say(f"# {'no growth' if ok else 'GROWTH'} beyond {args.tolerance:.0%} (objects: +{args.object_slack}) after "
        f"step {args.warmup}")
    if pipedap.rank() == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"world_size": pipedap.size(), "settings": vars(args), "runs": results, "ok": ok}, f, indent=1)
        say(f"# wrote {args.json}")
    pipedap.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

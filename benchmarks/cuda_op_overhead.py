"""What one collective on a CUDA tensor costs through the comm core, against torch.distributed's NCCL.

    PIPEDAP_ONE_RANK_THROUGH_ENGINE=1 mpirun -np 1 python benchmarks/cuda_op_overhead.py --json out.json

One GPU, one rank (PIPEDAP_ONE_RANK_THROUGH_ENGINE=1 sends a set of one rank through the engine and
NCCL instead of copying), so the figures are the host and launch cost of an operation, not the link.
For each size it times, alternating the two libraries in rounds:

* ``sync``: one all-reduce and a wait for it, repeated (the latency a layer waiting on its bucket sees);
* ``queued``: COUNT all-reduces submitted back to back, then all waited for (the engine's cost per
  operation when a plan submits many buckets at once, as PipeDAP's does in backward).

torch.distributed runs the same loops over its own NCCL process group (world size 1, on loopback).
Prints a table and writes JSON; medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import pipedap


def pipedap_sync(x: torch.Tensor, count: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        pipedap.allreduce_(x, op=pipedap.Sum, name="sync")
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def pipedap_queued(xs: list[torch.Tensor]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    handles = [pipedap.allreduce_async_(x, op=pipedap.Sum, name=f"queued.{i}") for i, x in enumerate(xs)]
    for handle in handles:
        pipedap.synchronize(handle)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(xs)


def torch_sync(x: torch.Tensor, count: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        dist.all_reduce(x)
        torch.cuda.current_stream().synchronize()  # what a host-side wait costs, like pipedap's
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def torch_queued(xs: list[torch.Tensor]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    works = [dist.all_reduce(x, async_op=True) for x in xs]
    for work in works:
        work.wait()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4,65536,4194304", help="comma-separated buffer sizes in bytes")
    parser.add_argument("--count", type=int, default=200, help="operations per timed loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_op_overhead: needs a CUDA GPU (none is visible)")
    pipedap.init()
    if pipedap.size() != 1:
        raise SystemExit("cuda_op_overhead: run it on one rank (mpirun -np 1), with PIPEDAP_ONE_RANK_THROUGH_ENGINE=1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        numel = max(1, size // 4)
        x = torch.ones(numel, device="cuda")
        xs = [torch.ones(numel, device="cuda") for _ in range(args.count)]
        times = {k: [] for k in ("pipedap_sync", "torch_sync", "pipedap_queued", "torch_queued")}
        pipedap_sync(x, 10)  # warm-up: communicators, allocator
        torch_sync(x, 10)
        for _ in range(args.rounds):
            times["pipedap_sync"].append(pipedap_sync(x, args.count))
            times["torch_sync"].append(torch_sync(x, args.count))
            times["pipedap_queued"].append(pipedap_queued(xs))
            times["torch_queued"].append(torch_queued(xs))
        row = {"bytes": numel * 4, **{k: statistics.median(v) * 1e6 for k, v in times.items()}}
        rows.append(row)
        print(f"{row['bytes']:>10} B  sync: pipedap {row['pipedap_sync']:8.1f} us  torch {row['torch_sync']:8.1f} us"
              f"   queued: pipedap {row['pipedap_queued']:8.1f} us/op  torch {row['torch_queued']:8.1f} us/op",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "count": args.count, "rounds": args.rounds,
                       "device": torch.cuda.get_device_name(0), "torch": torch.__version__}, f, indent=1)
    dist.destroy_process_group()
    pipedap.shutdown()


if __name__ == "__main__":
    main()

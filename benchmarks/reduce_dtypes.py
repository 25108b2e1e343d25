"""What a reduction costs per element in each dtype, on one host (shared memory, no link limit).

    mpirun -np 2 python benchmarks/reduce_dtypes.py --elements 25m --json out/reduce_dtypes.json

fp16/bf16 gradient compression halves the bytes on the link, but the comm core then adds
16-bit floats, converting each element to float32 and back ([Note: float16 with F16C] in
comm_core/src/dtype.cc). On a CPU host that time is taken from the core that computes.
This times pipedap's all-reduce (Average) of the same element count (ResNet-50's gradients:
25.6 M) in float32, float16 and bfloat16, in interleaved rounds, plus the casts that
DistributedOptimizer's compressed buckets add (float32 -> 16 bit before, back after).
Prints ns per element and writes JSON (rank 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import pipedap
from pipedap import engine
from pipedap.units import parse_size

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def time_allreduce(buffer: torch.Tensor, repeats: int) -> float:
    """Seconds per all-reduce, the slowest rank's median."""
    collective = engine.allreduce_collective(buffer, buffer, f"reduce_dtypes.{buffer.dtype}", pipedap.Average)
    engine.submit([collective]).wait()
    samples = []
    for _ in range(repeats):
        pipedap.barrier()
        start = time.perf_counter()
        engine.submit([collective]).wait()
        samples.append(time.perf_counter() - start)
    return max(pipedap.allgather_object(statistics.median(samples), name="reduce_dtypes.time"))


def time_casts(source: torch.Tensor, dtype: torch.dtype, repeats: int) -> float:
    """Seconds for the compressed bucket's two casts (pack and unpack) of ``source``."""
    wire = torch.empty_like(source, dtype=dtype)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        wire.copy_(source)
        source.copy_(wire)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", default="25m", help="elements per all-reduce (default 25m, k/m suffixes)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the dtypes (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="all-reduces per dtype and round (default 3)")
    parser.add_argument("--json", help="write the figures here (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a rank computes on one core
    pipedap.init()
    n = parse_size(args.elements) // pipedap.size() * pipedap.size()
    say = print if pipedap.rank() == 0 else (lambda *a, **k: None)
    say(f"# {pipedap.size()} ranks, all-reduce (Average) of {n / 1e6:.1f} M elements; {args.rounds} rounds x "
        f"{len(DTYPES)} dtypes x {args.repeats} repeats")
    buffers = {name: torch.randn(n, generator=torch.Generator().manual_seed(pipedap.rank())).to(dtype)
               for name, dtype in DTYPES.items()}
    seconds: dict[str, list[float]] = {name: [] for name in DTYPES}
    for r in range(args.rounds):
        order = list(DTYPES)[r % len(DTYPES):] + list(DTYPES)[:r % len(DTYPES)]
        for name in order:
            seconds[name].append(time_allreduce(buffers[name], args.repeats))
    casts = {name: time_casts(buffers["float32"], dtype, args.repeats)
             for name, dtype in DTYPES.items() if name != "float32"}
    rows = {}
    for name in DTYPES:
        t = statistics.median(seconds[name])
        rows[name] = {"seconds": t, "ns_per_element": t / n * 1e9, "rounds": seconds[name],
                      "casts_seconds": casts.get(name)}
        extra = f", casts to and from float32 {casts[name] * 1e3:.0f} ms" if name in casts else ""
        say(f"  {name:>9}: {t * 1e3:8.1f} ms ({t / n * 1e9:.2f} ns per element){extra}")
    if pipedap.rank() == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"world_size": pipedap.size(), "elements": n, "dtypes": rows}, f, indent=2)
        say(f"# wrote {args.json}")
    pipedap.shutdown()


if __name__ == "__main__":
    main()

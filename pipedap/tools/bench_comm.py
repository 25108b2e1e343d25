"""Collective benchmark: comm_core against mpi4py on the same buffers, in the same run.

Run under MPI, e.g.::

    mpirun -np 2 python -m pipedap.tools.bench_comm --json out/bench_comm_np2.json

Prints an nccl-tests-style table (size, op, time, algbw, busbw) for both
libraries and their busbw ratio, then the per-operation overhead of a 4-byte
all-reduce. busbw = algbw * (n-1)/n for reduce-scatter and all-gather and
2(n-1)/n for all-reduce, where algbw = buffer bytes / time.

``--choose`` first installs the measured choice of ring or MPI per size
(``pipedap.algorithms``; measured with the cost model, or loaded from its cache);
``--each-algorithm`` also times the comm core forced to each, so the table shows
what ``auto`` gains: its time over the faster of the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import pipedap
from pipedap import algorithms, engine, settings
from pipedap.algorithms import Buffers
from pipedap.units import parse_size

OPS = ("reducescatter", "allgather", "allreduce")
DEFAULT_SIZES = [4, 4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def time_pipedap(buffers: Buffers, op: str, iters: int, algorithm: str = "auto") -> float:
    collective = buffers.collective(f"bench.{op}")
    collective.spec.algorithm = algorithm
    for _ in range(2):
        engine.submit([collective]).wait()
    pipedap.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        engine.submit([collective]).wait()
    return (time.perf_counter() - start) / iters


def time_mpi4py(buffers: Buffers, op: str, iters: int, mpi_comm) -> float:
    src, dst = buffers.src.numpy(), buffers.dst.numpy()
    call = {"reducescatter": lambda: mpi_comm.Reduce_scatter_block(src, dst),
            "allgather": lambda: mpi_comm.Allgather(src, dst),
            "allreduce": lambda: mpi_comm.Allreduce(src, dst)}[op]
    for _ in range(2):
        call()
    mpi_comm.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - start) / iters


def agreed_time(seconds: float, mpi_comm) -> float:
    """The slowest rank's time: a collective is as fast as its slowest member."""
    from mpi4py import MPI

    return mpi_comm.allreduce(seconds, op=MPI.MAX)


def bus_factor(op: str, world: int) -> float:
    return (world - 1) / world * (2 if op == "allreduce" else 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipedap.tools.bench_comm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="comma-separated buffer sizes (bytes, or with k/m suffix); default 4 B .. 64 MB")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds to spend per (size, op, library)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--choose", action="store_true",
                        help="first install the measured choice of ring or MPI (pipedap.choose_algorithms)")
    parser.add_argument("--each-algorithm", action="store_true",
                        help="also time the comm core forced to the ring and to MPI's collectives")
    args = parser.parse_args(argv)

    pipedap.init()
    from mpi4py import MPI

    world, rank = pipedap.size(), pipedap.rank()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ops = args.ops.split(",")
    say = print if rank == 0 else (lambda *a, **k: None)
    table = None
    if args.choose:
        say("# choosing ring or MPI per size (cost model: loaded from its cache, or measured, about 1 min)")
        table = algorithms.choose_algorithms()
        say(f"# auto: {algorithms.describe(table) if table else 'ring from PIPEDAP_RING_MIN_BYTES'}")
    forced = ("ring", "mpi") if args.each_algorithm else ()
    libraries = ["pipedap", *(f"pipedap_{a}" for a in forced), "mpi4py"]
    say(f"# pipedap.tools.bench_comm: {world} ranks, {len(sizes)} sizes x {len(ops)} ops x {len(libraries)} "
        f"libraries, about {len(sizes) * len(ops) * len(libraries) * args.repeats * args.min_time:.0f} s")
    say(f"# {'size':>10} {'op':>14} | {'pipedap us':>11} {'algbw':>7} {'busbw':>7} | "
        f"{'mpi4py us':>11} {'algbw':>7} {'busbw':>7} | busbw ratio"
        + (" | ring us, mpi us | faster / auto, faster / auto's choice forced" if forced else ""))
    rows = []
    for nbytes in sizes:
        for op in ops:
            buffers = Buffers(op, nbytes, world)
            probe = agreed_time(time_mpi4py(buffers, op, 3, MPI.COMM_WORLD), MPI.COMM_WORLD)
            iters = max(3, min(10_000, int(args.min_time / max(probe, 1e-7))))
            times = {lib: [] for lib in libraries}
            for _ in range(args.repeats):  # alternate, so drift hits all alike
                for lib in libraries:
                    seconds = (time_mpi4py(buffers, op, iters, MPI.COMM_WORLD) if lib == "mpi4py" else
                               time_pipedap(buffers, op, iters, lib.removeprefix("pipedap_")
                                            if lib != "pipedap" else "auto"))
                    times[lib].append(agreed_time(seconds, MPI.COMM_WORLD))
            row = {"bytes": buffers.nbytes, "op": op, "iters": iters, "auto_runs": engine.algorithm_for(op, buffers.nbytes)}
            for lib in times:
                t = statistics.median(times[lib])
                algbw = buffers.nbytes / t / 1e9
                row[lib] = {"time_us": t * 1e6, "algbw_GBps": algbw, "busbw_GBps": algbw * bus_factor(op, world)}
            row["busbw_ratio"] = row["pipedap"]["busbw_GBps"] / row["mpi4py"]["busbw_GBps"]
            if forced:  # auto's own run, and its choice timed forced (free of the drift between the runs)
                faster = min(row[f"pipedap_{a}"]["time_us"] for a in forced)
                row["auto_over_faster"] = faster / row["pipedap"]["time_us"]
                row["choice_over_faster"] = faster / row[f"pipedap_{row['auto_runs']}"]["time_us"]
            rows.append(row)
            p, m = row["pipedap"], row["mpi4py"]
            say(f"  {buffers.nbytes:>10} {op:>14} | {p['time_us']:>11.1f} {p['algbw_GBps']:>7.3f} "
                f"{p['busbw_GBps']:>7.3f} | {m['time_us']:>11.1f} {m['algbw_GBps']:>7.3f} {m['busbw_GBps']:>7.3f} "
                f"| {row['busbw_ratio']:.3f}"
                + (f" | {row['pipedap_ring']['time_us']:.1f}, {row['pipedap_mpi']['time_us']:.1f} | "
                   f"{row['auto_over_faster']:.3f}, {row['choice_over_faster']:.3f} ({row['auto_runs']})"
                   if forced else ""))

    small = Buffers("allreduce", 4, world)
    overhead = {
        "pipedap_us": statistics.median(agreed_time(time_pipedap(small, "allreduce", 2000), MPI.COMM_WORLD)
                                        for _ in range(args.repeats)) * 1e6,
        "mpi4py_us": statistics.median(agreed_time(time_mpi4py(small, "allreduce", 2000, MPI.COMM_WORLD),
                                                   MPI.COMM_WORLD) for _ in range(args.repeats)) * 1e6,
    }
    overhead["difference_us"] = overhead["pipedap_us"] - overhead["mpi4py_us"]
    say(f"# 4-byte allreduce: pipedap {overhead['pipedap_us']:.1f} us, mpi4py {overhead['mpi4py_us']:.1f} us "
        f"(+{overhead['difference_us']:.1f} us)")
    large = [r["busbw_ratio"] for r in rows if r["bytes"] >= 4 << 20]
    if large:
        say(f"# busbw ratio pipedap/mpi4py for >= 4 MB: min {min(large):.3f}, "
            f"geometric mean {float(np.exp(np.mean(np.log(large)))):.3f}")
    if forced:
        for key, what in (("auto_over_faster", "auto's run"), ("choice_over_faster", "auto's choice, timed forced")):
            worst = min(rows, key=lambda r: r[key])
            say(f"# the faster of ring and MPI over {what}: min {worst[key]:.3f} ({worst['op']} {worst['bytes']} B)")
    result = {"world_size": world, "rows": rows, "overhead_4B_allreduce": overhead,
              "mpi_library": MPI.Get_library_version().splitlines()[0],
              "algorithm": settings.get("PIPEDAP_ALGORITHM"), "algorithm_table": table}
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        say(f"# wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

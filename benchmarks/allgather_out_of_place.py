"""The ring's all-gather out of place, each run alone: the median time per size, as JSON on rank 0.

    mpirun -np 2 --bind-to core python benchmarks/allgather_out_of_place.py LABEL

Each of 40 timed runs (after 5 untimed) starts after a barrier, so that the time is the
operation's own and not that of a queue of them; the figure is the slowest rank's median.
To compare two builds, run it alternately under each build's PYTHONPATH (the README of
benchmarks/results/algorithms/ shows how).
"""

import json
import statistics
import sys
import time

import torch
from mpi4py import MPI

import pipedap
from pipedap import engine

SIZES = (1 << 20, 4 << 20, 16 << 20)  # bytes of the gathered output


def main() -> None:
    pipedap.init()
    comm, world = MPI.COMM_WORLD, pipedap.size()
    medians = {}
    for nbytes in SIZES:
        n = nbytes // 4 // world * world
        collective = engine.allgather_collective(torch.ones(n // world), torch.zeros(n), f"ag.{nbytes}")
        collective.spec.algorithm = "ring"
        seconds = []
        for _ in range(45):
            comm.Barrier()
            start = time.perf_counter()
            engine.submit([collective]).wait()
            seconds.append(time.perf_counter() - start)
        medians[nbytes] = comm.allreduce(statistics.median(seconds[5:]), op=MPI.MAX) * 1e6
    if pipedap.rank() == 0:
        print(json.dumps({"build": sys.argv[1] if len(sys.argv) > 1 else "", "median_us": medians}), flush=True)


if __name__ == "__main__":
    main()

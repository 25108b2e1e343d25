"""Rank 0's CPU time while it waits for a late rank 1 (an all-reduce, then a barrier), three times.

Prints "rank 0 waited W s, cpu C ms" per wait ([Note: patient waits] in comm_core/src/mpi_util.h).
"""

import sys
import time

import torch

import pipedap

LATE = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
pipedap.init()
R = pipedap.rank()
x = torch.ones(1000)
pipedap.allreduce(x, name="warm")


def timed(what, call):
    if R == 1:
        time.sleep(LATE)
    cpu, wall = time.process_time(), time.perf_counter()
    call()
    if R == 0:
        print(f"rank 0 waited {time.perf_counter() - wall:.4f} s, cpu {1e3 * (time.process_time() - cpu):.1f} ms "
              f"({what})", flush=True)


for k in range(3):
    timed("allreduce", lambda name=f"late.{k}": pipedap.allreduce(x, name=name))
    timed("barrier", pipedap.barrier)

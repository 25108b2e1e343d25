"""Ranks that submit different things in the middle of training (argv: case, then sizes and schedules).

Two ranks train a small MLP with DistributedOptimizer. At step INJECT_AT the
user's code desynchronises the ranks in one of these ways:

  extra   rank 1 alone calls allreduce(name="extra")
  size    allreduce(name="probe") of n elements on rank 0 and n + 1 on rank 1
  dtype   allreduce(name="probe") in float32 on rank 0, float64 on rank 1
  root    broadcast(name="probe") rooted at rank 0 on rank 0, at rank 1 on rank 1
  name    rank 1 submits a second async "probe" while its first is in flight:
          a ValueError there at once (Horovod's), nothing submitted; rank 0 gets no error

Sizes: "small" (400 bytes: MPI's own collectives) or "large" (400 kB: the ring).
For each (size, schedule) every rank prints "<size> <schedule> ERROR <message>"
for the first CommError (ValueError for "name") it gets. Where the ranks stay aligned (every case but
"extra") training goes on to the end, the ranks' parameters must still agree
("FINISHED"), and the next (size, schedule) runs in the same job. "extra"
leaves the ranks desynchronised for good: it takes one size and schedule.
Finally each rank allocates and frees memory and prints "ALIVE": a corrupted
heap tends to be detected by then (AddressSanitizer reports the bad write itself).
"""

import os
import sys
import time

import torch
from torch import nn

import pipedap as hvd

case = sys.argv[1]
runs = [(size, schedule) for size in sys.argv[2].split(",") for schedule in sys.argv[3].split(",")]
hvd.init()
R, P = hvd.rank(), hvd.size()
STEPS, INJECT_AT = 10, 5


def desynchronise(n: int) -> None:
    if case == "extra":
        if R == 1:
            hvd.allreduce(torch.ones(n), name="extra")
    elif case == "size":
        hvd.allreduce(torch.ones(n + R), name="probe")
    elif case == "dtype":
        hvd.allreduce(torch.ones(n, dtype=torch.float32 if R == 0 else torch.float64), name="probe")
    elif case == "root":
        hvd.broadcast(torch.ones(n), root_rank=R, name="probe")
    elif case == "name":
        if R == 0:
            time.sleep(0.5)  # so rank 1's first "probe" is surely still in flight when it submits the second
        first = hvd.allreduce_async(torch.ones(n), name="probe")
        try:
            if R == 1:
                hvd.allreduce_async(torch.ones(n), name="probe")  # refused at once: nothing was submitted
        finally:
            hvd.synchronize(first)  # the ranks stay aligned
    else:
        raise SystemExit(f"unknown case {case}")


def train(size: str, schedule: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model=model, schedule=schedule)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    torch.manual_seed(R)
    failed = False
    for step in range(STEPS):
        try:
            opt.zero_grad()
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            if step == INJECT_AT:
                desynchronise({"small": 100, "large": 100_000}[size])
        except (hvd.CommError, ValueError) as e:
            print(f"rank {R}: {size} {schedule} ERROR {e}", flush=True)
            failed = True
            if case == "extra":
                return
    if not failed:
        print(f"rank {R}: {size} {schedule} NO ERROR", flush=True)
    opt.synchronize()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = hvd.allgather(params.unsqueeze(0))
    assert torch.equal(gathered[0], gathered[1]), "ranks' parameters differ after the error"
    print(f"rank {R}: {size} {schedule} FINISHED", flush=True)


if case == "extra" and len(runs) > 1:
    raise SystemExit("extra desynchronises the ranks for good: give one size and one schedule")
for size, schedule in runs:
    train(size, schedule)
churn = [torch.randn(int(torch.randint(1, 1 << 18, ()))) for _ in range(200)]
del churn
print(f"rank {R}: ALIVE", flush=True)
if case == "extra":
    # Desynchronised for good: skip the drain at exit (it would wait for the timeout). First
    # wait, outside the engine, until every rank has said ALIVE: the launcher kills the others
    # as soon as one rank leaves without finalizing.
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()
    os._exit(0)

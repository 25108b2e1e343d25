"""Data-parallel training that tests/test_faults.py disturbs from outside (run under mpirun on the testbed).

argv: MODE STEPS. Every rank prints ``rank R: step K`` when step K starts, so the test knows
when to inject its fault, and at the end ``rank R: done <checksum>`` (the parameters' sum,
equal on every rank). MODE ``train`` runs undisturbed from inside (the test takes a link
down or slows it); ``kill``: rank 1 SIGKILLs itself during step 5's backward (the process
just vanishes: no exception, no MPI finalize); ``extra``: rank 1 submits one collective
more than rank 0 at step 3 (a desynchronised rank).
"""

import os
import signal
import sys

import torch
import torch.nn.functional as F
from torch import nn

import pipedap as hvd

mode, steps = sys.argv[1], int(sys.argv[2])
hvd.init()
R = hvd.rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 1536), nn.Tanh(), nn.Linear(1536, 1536), nn.Tanh(), nn.Linear(1536, 10))  # 11 MB
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model=model,
                               schedule="dear")


def vanish(grad):
    os.kill(os.getpid(), signal.SIGKILL)


for step in range(steps):
    print(f"rank {R}: step {step}", flush=True)
    g = torch.Generator().manual_seed(100 * step + R)
    x, y = torch.randn(16, 256, generator=g), torch.randint(0, 10, (16,), generator=g)
    if mode == "kill" and R == 1 and step == 5:
        model[0].weight.register_hook(vanish)  # mid-iteration: other buckets' reduce-scatters are in flight
    if mode == "extra" and R == 1 and step == 3:
        hvd.allreduce(torch.ones(4), name="extra.op")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
hvd.flush(model)
print(f"rank {R}: done {sum(p.double().sum().item() for p in model.parameters()):.12e}", flush=True)
hvd.shutdown()

"""Two models trained at once on two overlapping process sets, each against single-process training.

Run under mpirun with 3 ranks: model A trains on ranks {0, 1}, model B on ranks
{1, 2}; rank 1 trains both, interleaving their backward passes and updates, so
the engine thread of rank 1 carries both sets' collectives. Each model must
match a reference that trains on its set's whole batch in one process.
Usage: process_set_training.py SCHEDULE_A SCHEDULE_B. Exits non-zero on a mismatch.
"""

import copy
import sys

import torch
from torch import nn

import pipedap as hvd

hvd.init()
R, P = hvd.rank(), hvd.size()
assert P == 3, "run with 3 ranks"
B, STEPS, TOL = 4, 12, 1e-5


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(seed: int, step: int, n: int):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


class Job:
    """One model on one process set, with its single-process reference."""

    def __init__(self, seed: int, ranks: list[int], schedule: str):
        self.seed, self.set = seed, hvd.add_process_set(ranks)
        self.model = make_model(seed)
        self.reference = copy.deepcopy(self.model)
        self.ref_opt = torch.optim.Adam(self.reference.parameters(), lr=0.01)
        self.opt = None
        if self.set.included():
            self.opt = hvd.DistributedOptimizer(torch.optim.Adam(self.model.parameters(), lr=0.01),
                                                model=self.model, schedule=schedule, process_set=self.set,
                                                fusion_bytes=0)

    def backward(self, step: int) -> None:
        members = self.set.size()
        x, y = batch(self.seed, step, B * members)
        mine = slice(self.set.rank() * B, (self.set.rank() + 1) * B)
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(x[mine]), y[mine]).backward()
        self.ref_opt.zero_grad()
        for r in range(members):  # the whole batch in one process: mean over shards of the shard means
            shard = slice(r * B, (r + 1) * B)
            (nn.functional.cross_entropy(self.reference(x[shard]), y[shard]) / members).backward()

    def step(self) -> None:
        self.opt.step()
        self.ref_opt.step()

    def check(self, what: str) -> None:
        hvd.flush(self.model)
        for (name, p), q in zip(self.model.named_parameters(), self.reference.parameters()):
            diff = (p - q).abs().max().item()
            if not diff <= TOL:  # (NaN differs too)
                sys.exit(f"rank {R}: {what}: '{name}' differs from single-process training by {diff}")


jobs = [Job(1, [0, 1], sys.argv[1]), Job(2, [1, 2], sys.argv[2])]
mine = [job for job in jobs if job.opt is not None]
for step in range(STEPS):
    for job in mine:  # rank 1: both backward passes first, then both steps (interleaved on the engine)
        job.backward(step)
    for job in mine:
        job.step()
for job, name in zip(jobs, "AB"):
    if job.opt is not None:
        job.check(f"model {name} on {job.set}")
hvd.barrier()
for job in jobs:
    hvd.remove_process_set(job.set)
print(f"rank {R}: process-set training OK ({len(mine)} model(s))")

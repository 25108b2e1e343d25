"""pipedap.save_checkpoint / load_checkpoint at 2 ranks: a failed save, disagreeing ranks, another world size.

argv: DIRECTORY. Prints ``rank R: ok`` at the end; any failed check raises (non-zero exit).
"""

import sys
from pathlib import Path

import torch
from torch import nn

import pipedap
from pipedap.checkpoint import read_manifest

directory = Path(sys.argv[1])
pipedap.init()
rank = pipedap.rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
optimizer = pipedap.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model=model, schedule="dear")


def train_step():
    optimizer.zero_grad()
    model(torch.randn(6, 4)).sum().backward()
    optimizer.step()


assert pipedap.load_checkpoint(directory, model, optimizer) is None  # nothing saved yet: start fresh
train_step()
pipedap.save_checkpoint(directory, 10, model, optimizer)

# rank 1 cannot write its part of step 20: both ranks learn it, step 10 stays the latest
if rank == 1:
    (directory / "step-00000020" / "rank-00001.pt").mkdir(parents=True)
pipedap.barrier()
try:
    pipedap.save_checkpoint(directory, 20, model, optimizer)
except pipedap.CheckpointError as e:
    message = str(e)
else:
    raise AssertionError("a save that rank 1 could not write passed")
assert "checkpoint of step 20" in message and "rank 1: IsADirectoryError" in message and "rank 0" not in message, message
assert read_manifest(directory)["step"] == 10

train_step()
pipedap.save_checkpoint(directory, 30, model, optimizer, extra={"epoch": 3}, keep=2)
pipedap.barrier()  # rank 0 removes the old folders after the others went on
assert sorted(p.name for p in directory.glob("step-*")) == ["step-00000010", "step-00000030"]  # 20: incomplete
saved = {k: v.clone() for k, v in model.state_dict().items()}

# ranks that see different folders are told so, on both ranks
try:
    pipedap.load_checkpoint(directory if rank == 0 else directory / "elsewhere", model, optimizer)
except pipedap.CheckpointError as e:
    assert "the ranks see different checkpoints" in str(e) and "{0: 30, 1: None}" in str(e), str(e)
else:
    raise AssertionError("ranks that saw different checkpoints loaded")

train_step()  # move away from the saved state, then come back to it
found = pipedap.load_checkpoint(directory, model, optimizer)
assert (found.step, found.world_size, found.extra) == (30, 2, {"epoch": 3}), found
assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())

# at another world size (1 rank): the whole state loads, rank 0's buffers, and rank 0 says so
alone = pipedap.add_process_set([0])
if rank == 0:
    torch.manual_seed(5)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    plain = torch.optim.Adam(fresh.parameters(), lr=0.1)
    found = pipedap.load_checkpoint(directory, fresh, plain, process_set=alone)
    assert found.world_size == 2 and found.step == 30
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert len(plain.state_dict()["state"]) == 6
pipedap.barrier()
print(f"rank {rank}: ok", flush=True)
pipedap.shutdown()

"""Training that saves a checkpoint every 10 steps and resumes from the last one (tests/test_restart.py).

argv: OUT STEPS CHECKPOINT_DIR SCHEDULE OPTIMIZER [KILL_AT]. float64, a model with dropout
(its random numbers must resume too) and a BatchNorm (per-rank buffers), an LR scheduler
saved as ``extra``. With KILL_AT, rank 1 SIGKILLs itself in the backward of step KILL_AT on
the first attempt (``PIPEDAP_RESTART_COUNT=0``, set by pipedap.tools.launch): the process
vanishes mid-iteration. At the end each rank r writes its parameters, buffers, optimizer
state and generator state to OUT.r. OPTIMIZER ``sgd`` (momentum, Nesterov) or ``adamw-sharded`` (shard_update).
"""

import os
import signal
import sys

import torch
import torch.nn.functional as F
from torch import nn

import pipedap

out, steps, directory, schedule, optimizer_name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
kill_at = int(sys.argv[6]) if len(sys.argv) > 6 else None
torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)
pipedap.init()
rank = pipedap.rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Dropout(0.2), nn.Linear(64, 64), nn.Tanh(),
                      nn.Linear(64, 4))
torch.manual_seed(1000 + rank)  # each rank its own dropout stream
if optimizer_name == "sgd":
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    optimizer = pipedap.DistributedOptimizer(base, model=model, schedule=schedule)
else:
    base = torch.optim.AdamW(model.parameters(), lr=0.01)
    optimizer = pipedap.DistributedOptimizer(base, model=model, schedule=schedule, shard_update=True)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.8)

step = 0
found = pipedap.load_checkpoint(directory, model, optimizer)
if found is not None:
    step = found.step
    scheduler.load_state_dict(found.extra["scheduler"])
    print(f"rank {rank}: resumed from step {step} (saved at {found.world_size} ranks)", flush=True)


def vanish(grad):
    os.kill(os.getpid(), signal.SIGKILL)


while step < steps:
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    if step == kill_at and rank == 1 and os.environ.get("PIPEDAP_RESTART_COUNT") == "0":
        print(f"rank {rank}: vanishing in step {step}", flush=True)
        model[0].weight.register_hook(vanish)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    scheduler.step()
    step += 1
    if step % 10 == 0:
        pipedap.save_checkpoint(directory, step, model, optimizer, extra={"scheduler": scheduler.state_dict()})

pipedap.flush(model)
optimizer_state = optimizer.state_dict()  # every rank (collective with shard_update)
torch.save({"model": model.state_dict(), "optimizer": optimizer_state, "lr": scheduler.get_last_lr(),
            "generator": torch.get_rng_state()}, f"{out}.{rank}")
print(f"rank {rank}: done at step {step}", flush=True)
pipedap.shutdown()

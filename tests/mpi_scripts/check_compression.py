"""DistributedOptimizer with compression=fp16/bf16 against float32 (run under mpirun; argv[1] picks a part).

``curve``: for every schedule, 300 steps of a small classifier from the same start on the
same data, compressed and not; the loss curves (averaged over 10-step windows) must agree
within 1%, and the update must stay in float32 (parameters and Adam's state).
``wire``: every reduce-scatter, all-gather and all-reduce of the optimizer moves half of
float32's bytes, the gradients handed to the update are float32, and clip_grad_norm_'s
norm (from the compressed shards) is float32's within the wire dtype's rounding.
Exits non-zero on the first failure.
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

import pipedap as hvd
from pipedap import engine

hvd.init()
R, P = hvd.rank(), hvd.size()
STEPS, B, WINDOW = 300, 16, 10
SCHEDULES = ("wfbp", "dear", "pipedap")
COMPRESSIONS = {"fp16": hvd.Compression.fp16, "bf16": hvd.Compression.bf16}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def data(step: int):
    """This rank's batch of a learnable problem: labels from a fixed random teacher."""
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(32, 10, generator=teacher)
    g = torch.Generator().manual_seed(1000 * step + R)
    x = torch.randn(B, 32, generator=g)
    return x, (x @ w).argmax(dim=1)


def train(schedule: str, compression) -> list[float]:
    model = make_model()
    opt = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=2e-3), model=model,
                                   schedule=schedule, compression=compression)
    losses = []
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    hvd.flush(model)
    for p in model.parameters():
        assert p.dtype == torch.float32, p.dtype
        for value in opt.state[p].values():
            assert not value.is_floating_point() or value.dtype == torch.float32, value.dtype
    return losses


def windows(losses: list[float]) -> torch.Tensor:
    return torch.tensor(losses).view(-1, WINDOW).mean(dim=1)


def run_curve() -> None:
    for schedule in SCHEDULES:
        reference = windows(train(schedule, hvd.Compression.none))
        assert reference[-1] < 0.5 * reference[0], f"{schedule}: float32 did not learn: {reference.tolist()}"
        for name, compression in COMPRESSIONS.items():
            curve = windows(train(schedule, compression))
            worst = ((curve - reference).abs() / reference).max().item()
            print(f"rank {R}: {schedule} {name}: loss {reference[0]:.4f} -> {reference[-1]:.4f} (float32), "
                  f"{curve[-1]:.4f} ({name}); largest difference of a {WINDOW}-step mean {100 * worst:.3f}%",
                  flush=True)
            assert worst <= 0.01, f"{schedule} {name}: the loss curve differs by {100 * worst:.2f}% from float32's"
    print(f"rank {R}: curve OK", flush=True)


def run_wire() -> None:
    for schedule in SCHEDULES:
        moved = {}
        for name, compression in (("none", hvd.Compression.none), *COMPRESSIONS.items()):
            ops = []
            engine.add_completion_listener(ops.extend)
            model = make_model()
            seen = []
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                           schedule=schedule, compression=compression, fusion_bytes=0)
            for step in range(8):
                x, y = data(step)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.synchronize()
                seen.extend(p.grad.dtype for p in model.parameters())
                with opt.skip_synchronize():
                    opt.step()
            hvd.flush(model)
            engine.remove_completion_listener(ops.extend)
            assert set(seen) == {torch.float32}, f"{schedule} {name}: the update saw gradients of {set(seen)}"
            moved[name] = sum(op.nbytes for op in ops if op.kind in ("reducescatter", "allgather", "allreduce")
                              and op.name.split(".")[0] in ("rs", "ag", "ar"))
        for name in COMPRESSIONS:
            ratio = moved[name] / moved["none"]
            print(f"rank {R}: {schedule} {name}: {moved[name]} of float32's {moved['none']} bytes ({ratio:.3f})",
                  flush=True)
            assert moved["none"] > 0 and ratio == 0.5, f"{schedule} {name}: moved {ratio:.3f} of float32's bytes"
    for schedule in SCHEDULES:
        norms = {}
        for name, compression in (("none", hvd.Compression.none), *COMPRESSIONS.items()):
            model = make_model()
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                           schedule=schedule, compression=compression)
            x, y = data(0)
            F.cross_entropy(model(x), y).backward()
            norms[name] = hvd.clip_grad_norm_(opt, 1e9).item()
            opt.step()
            hvd.flush(model)
        for name in COMPRESSIONS:
            error = abs(norms[name] / norms["none"] - 1)
            assert error < 1e-2, f"{schedule} {name}: gradient norm {norms[name]} against float32's {norms['none']}"
    print(f"rank {R}: wire OK", flush=True)


{"curve": run_curve, "wire": run_wire}[sys.argv[1]]()
hvd.shutdown()

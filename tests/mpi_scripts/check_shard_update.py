"""DistributedOptimizer(shard_update=True) beyond check_optimizer.py's matrix (run under mpirun).

``memory``: Adam's state bytes per rank, sharded against unsharded (about 1/N).
``compression``: with fp16/bf16 the reduce-scatters move half of float32's bytes, the
all-gathers move the float32 parameters, and the parameters equal the unsharded
compressed run's exactly (both update float32 with the same reduced gradients).
``save DIR`` then ``resume DIR`` (at another world size): float64, a global batch that does
not depend on the world size; ``save`` checkpoints at step 4, with state_dict() (whole,
torch's format) and sharded_state_dict() (a file per rank); ``resume`` loads each (also
the parts into an unsharded optimizer, and the whole state into a plain torch optimizer
before wrapping) and continues to step 10, which must equal uninterrupted single-process
training to 1e-9. Also broadcast_optimizer_state on a sharded optimizer (collective).
Exits non-zero on the first failure.
"""

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import pipedap as hvd
from pipedap import engine

hvd.init()
R, P = hvd.rank(), hvd.size()
GLOBAL_BATCH = 12  # divisible by 1, 2, 3, 4
SAVE_AT, STEPS = 4, 10
SCHEDULES = ("wfbp", "dear", "pipedap")


def make_model(hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 4))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": params[:2], "lr": 0.02}, {"params": params[2:]}], lr=0.01, weight_decay=0.1)


def batch(step: int):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)


def my_part(x):
    n = GLOBAL_BATCH // P
    return x[R * n : (R + 1) * n]


def train_steps(model, opt, steps) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(my_part(x)), my_part(y)).backward()
        opt.step()


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"rank {R}: {message}")


def run_memory() -> None:
    state_bytes = {}
    for shard in (False, True):
        model = make_model(hidden=256)
        opt = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model=model,
                                       schedule="dear", shard_update=shard)
        train_steps(model, opt, range(2))
        hvd.flush(model)
        state_bytes[shard] = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                                 if torch.is_tensor(v) and v.dim() > 0)
    ratio = state_bytes[True] / state_bytes[False]
    print(f"rank {R}: Adam state {state_bytes[True]} bytes sharded, {state_bytes[False]} unsharded "
          f"({ratio:.3f}; 1/{P} = {1 / P:.3f})", flush=True)
    check(abs(ratio - 1 / P) <= 0.02, f"sharded Adam state is {ratio:.3f} of the unsharded, not about 1/{P}")
    print(f"rank {R}: memory OK", flush=True)


def run_compression() -> None:
    for schedule in SCHEDULES:
        for name, compression in (("fp16", hvd.Compression.fp16), ("bf16", hvd.Compression.bf16)):
            params, moved = {}, {}
            for shard in (False, True):
                ops = []
                engine.add_completion_listener(ops.extend)
                model = make_model(hidden=32)
                opt = hvd.DistributedOptimizer(make_optimizer(model), model=model, schedule=schedule,
                                               compression=compression, shard_update=shard, fusion_bytes=0)
                train_steps(model, opt, range(STEPS))
                hvd.flush(model)
                engine.remove_completion_listener(ops.extend)
                params[shard] = [p.detach().clone() for p in model.parameters()]
                check(all(p.dtype == torch.float32 for p in model.parameters()), "parameters left float32")
                moved[shard] = {kind: sum(op.nbytes for op in ops if op.name.split(".")[0] == prefix)
                                for kind, prefix in (("reduce", "rs"), ("gather", "ag"))}
            same = all(torch.equal(a, b) for a, b in zip(params[False], params[True]))
            check(same, f"{schedule} {name}: sharded parameters differ from the unsharded compressed run's")
            # (wfbp's unsharded run all-reduces: compare the sharded reduce-scatters with DeAR's instead)
            gathered = moved[True]["gather"] / moved[True]["reduce"]
            print(f"rank {R}: {schedule} {name}: sharded run moved {moved[True]['reduce']} bytes in reduce-scatters "
                  f"and {moved[True]['gather']} in all-gathers ({gathered:.2f}x: float32 parameters)", flush=True)
            check(gathered == 2.0, f"{schedule} {name}: the all-gathers should carry float32 parameters, twice the "
                                   f"16-bit reduce-scatters' bytes, not {gathered:.2f}x")
    print(f"rank {R}: compression OK", flush=True)


def run_save(directory: str) -> None:
    torch.set_default_dtype(torch.float64)
    for schedule in SCHEDULES:
        model = make_model()
        opt = hvd.DistributedOptimizer(make_optimizer(model), model=model, schedule=schedule, shard_update=True)
        train_steps(model, opt, range(SAVE_AT))
        whole = opt.state_dict()  # collective: every rank calls it
        part = opt.sharded_state_dict()
        check(len(part["ranges"]) < len(whole["state"]) + len(list(model.parameters())), "ranges")
        torch.save(part, os.path.join(directory, f"{schedule}.part{R}.pt"))
        if R == 0:
            torch.save({"model": model.state_dict(), "opt": whole, "world_size": P},
                       os.path.join(directory, f"{schedule}.whole.pt"))
        before = copy.deepcopy(whole)
        hvd.broadcast_optimizer_state(opt, root_rank=0)  # collective too; the state stays what it was
        after = opt.state_dict()
        check(all(torch.equal(before["state"][i][k], after["state"][i][k]) for i in before["state"]
                  for k in before["state"][i]), f"{schedule}: broadcast_optimizer_state changed the state")
    print(f"rank {R}: save OK at {P} ranks", flush=True)


def run_resume(directory: str) -> None:
    torch.set_default_dtype(torch.float64)
    for schedule in SCHEDULES:
        reference = make_model()
        ref_opt = make_optimizer(reference)
        for step in range(STEPS):
            x, y = batch(step)
            ref_opt.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            ref_opt.step()
        saved = torch.load(os.path.join(directory, f"{schedule}.whole.pt"))
        check(saved["world_size"] != P, "resume must run at another world size than save")
        parts = [torch.load(os.path.join(directory, f"{schedule}.part{r}.pt")) for r in range(saved["world_size"])]
        for how in ("state_dict", "sharded_state_dict", "plain torch optimizer", "sharded_state_dict, unsharded"):
            model = make_model()
            model.load_state_dict(saved["model"])
            base = make_optimizer(model)
            if how == "plain torch optimizer":  # loaded before wrapping: each rank keeps its part
                base.load_state_dict(saved["opt"])
            opt = hvd.DistributedOptimizer(base, model=model, schedule=schedule, shard_update="unsharded" not in how)
            if how == "state_dict":
                opt.load_state_dict(saved["opt"])
            elif how.startswith("sharded_state_dict"):
                opt.load_sharded_state_dict(parts)
            train_steps(model, opt, range(SAVE_AT, STEPS))
            hvd.flush(model)
            worst = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
            check(worst <= 1e-9, f"{schedule}: saved at {saved['world_size']} ranks, resumed at {P} from {how}: "
                                 f"parameters differ from uninterrupted training by {worst:.3g}")
            print(f"rank {R}: {schedule}: saved at {saved['world_size']} ranks, resumed at {P} from {how}: "
                  f"largest difference {worst:.1e}", flush=True)
        try:
            opt.load_sharded_state_dict(parts[:-1])
            check(False, "a sharded checkpoint without one rank's part was accepted")
        except ValueError as err:
            check("every rank" in str(err), f"unclear error: {err}")
    print(f"rank {R}: resume OK at {P} ranks", flush=True)


part = sys.argv[1]
{"memory": run_memory, "compression": run_compression,
 "save": lambda: run_save(sys.argv[2]), "resume": lambda: run_resume(sys.argv[2])}[part]()
hvd.shutdown()

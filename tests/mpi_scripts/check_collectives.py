"""Every collective and dtype against values computed from rank and size (run under mpirun).

Usage: check_collectives.py [cpu|cuda]. With cuda, every tensor lives on the
GPU of this rank's local rank and goes over NCCL. Inputs are small integers, exact in every dtype, so sums compare exactly;
averages of half types allow one rounding. Exits non-zero on the first failure.
"""

import math
import sys

import torch

import pipedap as hvd

hvd.init()
R, P = hvd.rank(), hvd.size()
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cpu"
if DEVICE == "cuda":
    torch.cuda.set_device(hvd.local_rank())
torch.set_default_device(DEVICE)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.int8,
          torch.int16]
if DEVICE == "cuda":
    DTYPES.remove(torch.int16)  # NCCL has no 16-bit integer type (a CommError says so)
# 0 and 1 elements, not divisible by P, and large enough for the ring path (>= 64 KiB)
SIZES = [0, 1, 7, 1000, 100_003]


def value(rank: int, n: int, dtype) -> torch.Tensor:
    """Rank r's input: (r + 1) * (i % 7 + 1), at most 4 * 7 = 28 (sum over 4 ranks: 70)."""
    return ((rank + 1) * (torch.arange(n) % 7 + 1)).to(dtype)


def total(n: int, dtype) -> torch.Tensor:
    return sum(value(r, n, torch.int64) for r in range(P)) if P else None


def average(summed: torch.Tensor, dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return (summed.to(torch.float64) / P).to(dtype)
    return torch.div(summed, P, rounding_mode="trunc").to(dtype)


def check(got, want, what):
    got, want = got.cpu(), want.cpu()
    tol = 1e-2 if got.dtype in (torch.float16, torch.bfloat16) else 0
    if got.shape != want.shape or not torch.allclose(got.to(torch.float64), want.to(torch.float64), rtol=tol, atol=0):
        sys.exit(f"rank {R}: {what}: got {got.flatten()[:8].tolist()} shape {tuple(got.shape)}, "
                 f"want {want.flatten()[:8].tolist()} shape {tuple(want.shape)}")


for dtype in DTYPES:
    for n in SIZES:
        tag = f"{dtype} n={n}"
        x = value(R, n, dtype)
        # allreduce: sum, average, in place
        check(hvd.allreduce(x, op=hvd.Sum, name=f"ar.{tag}"), total(n, dtype).to(dtype), f"allreduce sum {tag}")
        check(hvd.allreduce(x, name=f"avg.{tag}"), average(total(n, dtype), dtype), f"allreduce average {tag}")
        # min, max (ranks' values grow with the rank) and product (of ranks 1..P: exact in the wide types)
        check(hvd.allreduce(x, op=hvd.Min, name=f"min.{tag}"), value(0, n, dtype), f"allreduce min {tag}")
        check(hvd.allreduce(x, op=hvd.Max, name=f"max.{tag}"), value(P - 1, n, dtype), f"allreduce max {tag}")
        if dtype in (torch.float32, torch.float64, torch.int32, torch.int64):
            want = torch.full((n,), float(math.factorial(P))).to(dtype)
            check(hvd.allreduce(torch.full((n,), R + 1).to(dtype), op=hvd.Product, name=f"prod.{tag}"), want,
                  f"allreduce product {tag}")
        y = x.clone()
        hvd.allreduce_(y, op=hvd.Sum, name=f"ar_.{tag}")
        check(y, total(n, dtype).to(dtype), f"allreduce_ {tag}")
        check(x, value(R, n, dtype), f"allreduce left its input alone {tag}")
        # allgather: rank r contributes r + 1 rows (first dims differ)
        rows = value(R, (R + 1) * 3, dtype).view(R + 1, 3)
        want = torch.cat([value(r, (r + 1) * 3, dtype).view(r + 1, 3) for r in range(P)])
        check(hvd.allgather(rows, name=f"ag.{tag}"), want, f"allgather {tag}")
        # reducescatter along dim 0 with n rows of 2: the first n % P ranks get one more row
        m = value(R, n * 2, dtype).view(n, 2)
        summed = sum(value(r, n * 2, torch.int64).view(n, 2) for r in range(P))
        start = sum(n // P + (r < n % P) for r in range(R))
        mine = summed[start : start + n // P + (R < n % P)]
        check(hvd.reducescatter(m, op=hvd.Sum, name=f"rs.{tag}"), mine.to(dtype), f"reducescatter sum {tag}")
        check(hvd.reducescatter(m, name=f"rsavg.{tag}"), average(mine, dtype), f"reducescatter average {tag}")
        check(hvd.reducescatter(m, op=hvd.Max, name=f"rsmax.{tag}"),
              value(P - 1, n * 2, dtype).view(n, 2)[start : start + n // P + (R < n % P)], f"reducescatter max {tag}")
        # alltoall: rank r sends j + 1 rows of (r + 1) to rank j, so it receives its own rank + 1 rows from each
        sent = torch.cat([torch.full((j + 1, 2), R + 1) for j in range(P)]).to(dtype)
        got, splits = hvd.alltoall(sent, torch.arange(1, P + 1, dtype=torch.int32), name=f"a2a.{tag}")
        check(got, torch.cat([torch.full((R + 1, 2), r + 1) for r in range(P)]).to(dtype), f"alltoall {tag}")
        check(splits, torch.full((P,), R + 1, dtype=torch.int32), f"alltoall received splits {tag}")
        # broadcast from every root, copy and in place
        for root in range(P):
            check(hvd.broadcast(x, root, name=f"bc.{root}.{tag}"), value(root, n, dtype), f"broadcast root {root} {tag}")
            z = x.clone()
            hvd.broadcast_(z, root, name=f"bc_.{root}.{tag}")
            check(z, value(root, n, dtype), f"broadcast_ root {root} {tag}")

# 64 MB in each collective (16 Mi float32)
big = torch.full((16 << 20,), float(R + 1))
check(hvd.allreduce(big, op=hvd.Sum, name="big.ar"), torch.full_like(big, P * (P + 1) / 2), "allreduce 64 MB")
check(hvd.reducescatter(big, op=hvd.Sum, name="big.rs"),
      torch.full(((16 << 20) // P + (R < (16 << 20) % P),), P * (P + 1) / 2), "reducescatter 64 MB")
part = torch.full((4 << 20,), float(R))
check(hvd.allgather(part, name="big.ag"), torch.arange(P, dtype=torch.float32).repeat_interleave(4 << 20), "allgather 64 MB")

# 1,000 small operations in flight at once
handles = [hvd.allreduce_async(torch.tensor([float(R + i)]), op=hvd.Sum, name=f"small.{i}") for i in range(1000)]
for i, h in enumerate(handles):
    check(hvd.synchronize(h), torch.tensor([float(P * i + P * (P - 1) / 2)]), f"small op {i}")

# a grouped submission: RS of one buffer with AG of another and an AR, large (ring) and small (MPI)
from pipedap import engine  # noqa: E402

for n in (P * 40_000, P * 3):
    a = value(R, n, torch.float32)
    shard = torch.empty(n // P)
    b = torch.full((n // P,), float(R))
    gathered = torch.empty(n)
    c = value(R, n, torch.float32)
    c_out = torch.empty(n)
    group = [engine.reducescatter_collective(a, shard, f"g.rs.{n}", op=hvd.Sum),
             engine.allgather_collective(b, gathered, f"g.ag.{n}"),
             engine.allreduce_collective(c, c_out, f"g.ar.{n}", op=hvd.Average)]
    rs, ag, ar = engine.submit(group).wait()
    check(rs, total(n, torch.float32).to(torch.float32)[R * (n // P) : (R + 1) * (n // P)], f"group reducescatter n={n}")
    check(ag, torch.arange(P, dtype=torch.float32).repeat_interleave(n // P), f"group allgather n={n}")
    check(ar, average(total(n, torch.float32), torch.float32), f"group allreduce n={n}")

# in place, as the optimizer does it: the shard is a view into the bucket, RS into it, AG from it
for n in (P * 40_000, P * 3):
    bucket = value(R, n, torch.float32)
    k = n // P
    shard = bucket[R * k : (R + 1) * k]
    engine.submit([engine.reducescatter_collective(bucket, shard, f"inplace.rs.{n}", op=hvd.Average)]).wait()
    want = average(total(n, torch.float32), torch.float32)
    check(shard, want[R * k : (R + 1) * k], f"in-place reducescatter n={n}")
    engine.submit([engine.allgather_collective(shard, bucket, f"inplace.ag.{n}")]).wait()
    check(bucket, want, f"in-place allgather n={n}")

# half types round once per addition, like torch's float32 add then cast (exact at P == 2: one addition)
if P == 2:
    for dtype in (torch.float16, torch.bfloat16):
        for n in (5, 50_000):
            mine = torch.randn(n, generator=torch.Generator().manual_seed(R)).to(dtype)
            other = torch.randn(n, generator=torch.Generator().manual_seed(1 - R)).to(dtype)
            want = (mine.float() + other.float()).to(dtype)
            got = hvd.allreduce(mine, op=hvd.Sum, name=f"round.{dtype}.{n}")
            if not torch.equal(got, want):
                sys.exit(f"rank {R}: {dtype} sum of {n} not rounded like torch: {got[:4]} vs {want[:4]}")
    # every float16 bit pattern but NaN (subnormals, overflow to inf; the vectorised kernels' tails:
    # 63490 is not a multiple of 8), summed and averaged with a permutation of them
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    every = every[~every.isnan()]
    mine = every if R == 0 else every[torch.randperm(len(every), generator=torch.Generator().manual_seed(3))]
    pair = hvd.allgather(mine.unsqueeze(0), name="every.half.pair")
    total = (pair[0].float() + pair[1].float()).half()
    for op, want in ((hvd.Sum, total), (hvd.Average, (total.float() / 2).half())):
        got = hvd.allreduce(mine, op=op, name=f"every.half.{op}")
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        if not bool(same.all()):
            i = int((~same).nonzero()[0])
            sys.exit(f"rank {R}: float16 {op} of {pair[0][i].item()!r} and {pair[1][i].item()!r} gave {got[i].item()!r}, "
                     f"torch {want[i].item()!r}")

# gradients flow through allreduce (sum: each rank's input feeds every rank's output)
x = torch.ones(4, requires_grad=True)
hvd.allreduce(x, op=hvd.Sum, name="autograd").sum().backward()
check(x.grad, torch.full((4,), float(P)), "allreduce backward")

# a cross-rank mismatch is a CommError (a RuntimeError, as Horovod's) on every rank, and the ranks go on
if P > 1:
    try:
        hvd.allgather(torch.ones(2, R + 1), name="mismatched")
        sys.exit("allgather of (2, r + 1) tensors should raise")
    except hvd.CommError as e:
        assert isinstance(e, RuntimeError) and "same shape on every rank except dim 0" in str(e), e
    check(hvd.allgather(torch.full((1, 2), float(R)), name="after.mismatch"),
          torch.arange(P, dtype=torch.float32).repeat_interleave(2).view(P, 2), "allgather after a mismatch")

# a deferred submission (how host all-gathers are sized on the engine thread) fails where its resolver
# refuses, or returns other operations than it placed, before any data moves; the ranks go on
if DEVICE == "cpu":
    placeholder = engine.unsized(engine.core.OpKind.ALLGATHER, "deferred", torch.ones(2))

    def refuse():
        raise ValueError("no sizes today")

    def rename():
        return [engine.unsized(engine.core.OpKind.ALLGATHER, "renamed", torch.ones(2)).spec]

    for resolver, words in ((refuse, "no sizes today"), (rename, "the resolver returned allgather 'renamed'")):
        try:
            engine.core.submit_deferred([placeholder.spec], resolver, process_set=0).wait(-1)
            sys.exit(f"a deferred submission whose resolver does {resolver.__name__} should fail")
        except hvd.CommError as e:
            assert words in str(e) and "was not run" in str(e), e
    check(hvd.allgather(torch.full((R + 1,), float(R)), name="after.deferred"),
          torch.cat([torch.full((r + 1,), float(r)) for r in range(P)]), "allgather after refused deferred ones")

# objects, barrier, poll
obj = hvd.broadcast_object({"rank": R, "data": list(range(R + 3))}, root_rank=P - 1)
assert obj == {"rank": P - 1, "data": list(range(P + 2))}, obj
hvd.barrier()
h = hvd.allreduce_async(torch.ones(3), name="poll")
hvd.synchronize(h)
try:
    hvd.poll(h)
    sys.exit("poll of a synchronized handle should raise")
except ValueError:
    pass

# whether this run's collectives went through the engine (always, except one rank's shortcut)
path = "the engine" if engine.submit([engine.barrier_collective()]).timings() is not None else "local copies"
print(f"rank {R} of {P}: all collectives OK (through {path})")

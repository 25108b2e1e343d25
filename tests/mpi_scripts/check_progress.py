"""A ring all-gather's progress ([Note: all-gather progress] in comm_core/src/op.h), under mpirun.

Every rank gathers a large block from every other; the output starts as -1 everywhere. After each
``Work.wait_delivered(0, k)``, the first k bytes of the other ranks' blocks, in the order the ring
delivers them (ranks r-1, r-2, ...), must hold their values. Prints how many waits returned before
the all-gather had ended (the progress seen part-way), and that a reduce-scatter, which reports
none, is waited for to its end.
"""

import sys

import torch

import pipedap as hvd
from pipedap import engine

hvd.init()
R, P = hvd.rank(), hvd.size()
N = 4 << 20  # float32 elements per rank: 16 MB, 64 messages of PIPEDAP_MESSAGE_BYTES=256 KB
CHECKS = 16  # waits per all-gather
ORDER = [(R - k) % P for k in range(1, P)]  # the other ranks' blocks, in the order they arrive
OTHER_BYTES = (P - 1) * N * 4


def values(rank: int) -> torch.Tensor:
    return torch.arange(N, dtype=torch.float32) + rank * N


def last_arrived(out: torch.Tensor, nbytes: int) -> tuple[int, float, float]:
    """(rank, value, want) of the last element of the first ``nbytes`` in arrival order: read at once
    after a wait, so that a report ahead of the data finds it missing."""
    block, i = ORDER[(nbytes // 4 - 1) // N], (nbytes // 4 - 1) % N
    return block, float(out[block * N + i]), float(values(block)[i])


def check_arrived(out: torch.Tensor, nbytes: int, what: str) -> None:
    """The first ``nbytes`` of the other blocks in arrival order hold their values."""
    left = nbytes // 4
    for block in ORDER:
        n = min(left, N)
        got = out[block * N:block * N + n]
        if not torch.equal(got, values(block)[:n]):
            wrong = int((got != values(block)[:n]).nonzero()[0])
            sys.exit(f"rank {R}: {what}: {nbytes} bytes reported delivered, but element {wrong} of rank {block}'s "
                     f"block is {float(got[wrong])}")
        left -= n
        if left == 0:
            return


early = 0
for trial in range(3):
    out = torch.full((P * N,), -1.0)
    work = engine.submit([engine.allgather_collective(values(R), out, f"progress.{trial}")])
    for i in range(1, CHECKS + 1):
        need = OTHER_BYTES * i // CHECKS
        work.wait_delivered(0, need)
        block, got, want = last_arrived(out, need)
        early += not work.done()
        if got != want:
            sys.exit(f"rank {R}: trial {trial}: {need} bytes reported delivered, but the last of them (of rank "
                     f"{block}'s block) is {got}, not {want}")
        check_arrived(out, need, f"trial {trial}, wait {i} of {CHECKS}")
    work.wait()
    check_arrived(out, OTHER_BYTES, f"trial {trial}, after the wait")
    if not torch.equal(out[R * N:(R + 1) * N], values(R)):
        sys.exit(f"rank {R}: trial {trial}: its own block was not copied")

# a reduce-scatter reports no progress: wait_delivered returns at its end
shard = torch.empty(N)
work = engine.submit([engine.reducescatter_collective(torch.ones(P * N), shard, "progress.rs", hvd.Sum)])
work.wait_delivered(0, 1)
if not work.done():
    sys.exit(f"rank {R}: wait_delivered on a reduce-scatter returned before its end")
if not torch.equal(work.wait()[0], torch.full((N,), float(P))):
    sys.exit(f"rank {R}: the reduce-scatter's result is wrong")
print(f"rank {R} of {P}: progress OK; {early} of {3 * CHECKS} waits returned before the all-gather ended", flush=True)

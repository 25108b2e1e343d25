"""Process sets in the engine, on 3 ranks, with raw OpSpecs on torch tensors (argv[1]: the case).

  collectives  sets A = {0, 1} and B = {1, 2}: every collective on each, small (MPI's
               collectives) and large (the ring), with rank-dependent values, interleaved on
               rank 1 with each other and with the world, checked exactly; broadcast roots
               relative to the set; then the errors: a non-member's submission, an unknown
               set, mismatched, invalid and duplicate add_process_set lists, a desynchronised
               submission inside B (rank 0 goes on), remove_process_set. Ends with
               "rank R: process sets OK".
  stall        rank 2 never submits on B: rank 1's stall report names it; the timeout ends the job.
  cycle        A, B and C = {0, 2} used in a cyclic order across ranks: the stall reports name
               the set and operation each rank runs first; the timeout ends the job.
"""

import sys
import time

import torch

import pipedap as hvd
from pipedap import _comm_core as core
from pipedap.process_sets import ProcessSet, add_process_set, global_process_set, remove_process_set

case = sys.argv[1]
hvd.init()
R, P = hvd.rank(), hvd.size()
assert P == 3, "run on 3 ranks"
F32 = core.DType.FLOAT32
SIZES = (5, 20_000)  # 20 000 float32 = 80 kB: the ring (PIPEDAP_RING_MIN_BYTES is 64 KiB)


def value(rank: int, n: int) -> torch.Tensor:
    """World rank `rank`'s input: small integers, exact in float32 sums."""
    return (rank + 1) * (torch.arange(n, dtype=torch.float32) % 7 + 1)


def spec(kind, name, x, out, counts, root=0, reduce=core.ReduceOp.SUM):
    return core.OpSpec(kind, name, x.data_ptr(), out.data_ptr(), counts, F32, reduce, root)


def expect_error(what: str, call, *words: str, error=core.CommError) -> str:
    """Runs call(), which must raise `error` whose message holds every one of `words`."""
    try:
        call()
    except error as e:
        message = str(e)
        missing = [w for w in words if w not in message]
        if missing:
            sys.exit(f"rank {R}: {what}: {missing} not in the error: {message}")
        print(f"rank {R}: {what} ERROR {message}", flush=True)
        return message
    sys.exit(f"rank {R}: {what}: no {error.__name__}")


class Checks:
    """Submissions whose results are checked once every one of them finished."""

    def __init__(self):
        self.pending = []  # (handle, output, expected, what)

    def submit(self, ps, ops, outputs, expected, what):
        handle = core.submit(ops, process_set=ps.process_set_id)
        self.pending += [(handle, out, want, what) for out, want in zip(outputs, expected)]

    def verify(self):
        for handle, out, want, what in self.pending:
            handle.wait()
            if not torch.equal(out, want):
                sys.exit(f"rank {R}: {what}: got {out[:6].tolist()}, want {want[:6].tolist()}")
        self.pending = []


def submit_every_collective(ps, n: int, checks: Checks, keep: list) -> None:
    """Every collective on set `ps` with n elements (n + i for member i where counts differ)."""
    members, me, k = ps.ranks, ps.rank(), len(ps.ranks)
    tag = f"set {ps.process_set_id} n={n}"
    x = value(R, n)
    total = sum(value(r, n) for r in members)
    ar, avg = torch.empty(n), torch.empty(n)
    checks.submit(ps, [spec(core.OpKind.ALLREDUCE, f"ar.{tag}", x, ar, [n])], [ar], [total], f"allreduce {tag}")
    checks.submit(ps, [spec(core.OpKind.ALLREDUCE, f"avg.{tag}", x, avg, [n], reduce=core.ReduceOp.AVERAGE)],
                  [avg], [total / k], f"allreduce average {tag}")
    counts = [n + i for i in range(k)]  # uneven blocks
    rs_in = value(R, sum(counts))
    rs_out, ag_out = torch.empty(counts[me]), torch.empty(sum(counts))
    ag_in = value(R, counts[me])
    rs_want = sum(value(r, sum(counts)) for r in members)[sum(counts[:me]):sum(counts[: me + 1])]
    ag_want = torch.cat([value(r, counts[i]) for i, r in enumerate(members)])
    checks.submit(ps, [spec(core.OpKind.REDUCESCATTER, f"rs.{tag}", rs_in, rs_out, counts),  # one group
                       spec(core.OpKind.ALLGATHER, f"ag.{tag}", ag_in, ag_out, counts)],
                  [rs_out, ag_out], [rs_want, ag_want], f"reducescatter + allgather group {tag}")
    bc = torch.empty(n)
    checks.submit(ps, [spec(core.OpKind.BROADCAST, f"bc.{tag}", x, bc, [n], root=k - 1)], [bc],
                  [value(members[-1], n)], f"broadcast from set rank {k - 1} (world rank {members[-1]}) {tag}")
    keep += [x, ar, avg, rs_in, rs_out, ag_in, ag_out, bc]


def allreduce(ps, n: int, name: str) -> torch.Tensor:
    x, out = value(R, n), torch.empty(n)
    core.submit([spec(core.OpKind.ALLREDUCE, name, x, out, [n])], process_set=ps.process_set_id).wait()
    return out


def collectives() -> None:
    a = add_process_set([1, 0])  # sorted, as Horovod does
    b = add_process_set(ProcessSet([1, 2]))
    assert (a.process_set_id, a.ranks, b.process_set_id, b.ranks) == (1, [0, 1], 2, [1, 2]), (a, b)
    assert core.process_set_ids() == [0, 1, 2] and global_process_set.ranks == [0, 1, 2]
    assert core.process_set_rank(1) == [0, 1, -1][R] and core.process_set_rank(2) == [-1, 0, 1][R]
    assert a.size() == b.size() == 2 and global_process_set.rank() == R
    mine = [ps for ps in (a, b) if ps.included()]  # rank 1: both, interleaved
    outsider = {0: b, 2: a}.get(R)
    if outsider is not None:
        expect_error("outsider rank()", outsider.rank, f"rank {R} is not a member", error=ValueError)

    checks, keep = Checks(), []
    for n in SIZES:
        for ps in mine:
            submit_every_collective(ps, n, checks, keep)
        x, world = value(R, n), torch.empty(n)  # a world operation between them
        checks.submit(global_process_set, [spec(core.OpKind.ALLREDUCE, f"world n={n}", x, world, [n])],
                      [world], [sum(value(r, n) for r in range(P))], f"world allreduce n={n}")
        keep += [x, world]
    checks.verify()
    print(f"rank {R}: collectives on both sets OK", flush=True)

    x = torch.ones(4)
    if outsider is not None:
        expect_error("non-member", lambda: core.submit([spec(core.OpKind.ALLREDUCE, "x", x, x, [4])],
                                                       process_set=outsider.process_set_id),
                     f"rank {R} is not a member of process set {outsider.process_set_id} (ranks "
                     f"{', '.join(map(str, outsider.ranks))})")
    expect_error("unknown set", lambda: core.submit([spec(core.OpKind.ALLREDUCE, "x", x, x, [4])], process_set=7),
                 "process set 7 does not exist (existing: 0, 1, 2)")
    for ps in mine:
        expect_error("bad counts", lambda ps=ps: core.submit([spec(core.OpKind.ALLGATHER, "x", x, x, [1, 1, 2])],
                                                             process_set=ps.process_set_id),
                     "needs 2 count(s), got 3 (one per member of the set)", error=ValueError)
        expect_error("bad root", lambda ps=ps: core.submit([spec(core.OpKind.BROADCAST, "x", x, x, [4], root=2)],
                                                           process_set=ps.process_set_id),
                     "root rank 2 is not in [0, 2) (roots are ranks within the set)", error=ValueError)

    expect_error("mismatched lists", lambda: add_process_set([0] if R == 0 else [2]),
                 "rank 0 submitted add_process_set [0]; ranks 1, 2 submitted add_process_set [2]")
    expect_error("duplicate", lambda: add_process_set([0, 1]), "these ranks already form process set 1 (ranks 0, 1)")
    expect_error("out of range", lambda: add_process_set([0, 3]), "rank 3 is not in [0, 3)")
    expect_error("unsorted", lambda: core.add_process_set([1, 0]), "unique and in ascending order")
    expect_error("empty", lambda: add_process_set([]), "needs at least one rank")

    if R in (1, 2):  # inside B only, at the same position, different sizes: named by world rank
        expect_error("desync", lambda: allreduce(b, 3 + R, "probe"),
                     "operations differ between ranks at operation #", "of process set 2 (ranks 1, 2): rank 1 "
                     "submitted allreduce 'probe' (4 float32); rank 2 submitted allreduce 'probe' (5 float32)")
        assert torch.equal(allreduce(b, 3, "after.desync"), value(1, 3) + value(2, 3)), "B after the desync"
    if R in (0, 1):
        assert torch.equal(allreduce(a, 3, "a.after"), value(0, 3) + value(1, 3)), "A after B's desync"
        print(f"rank {R}: A goes on", flush=True)
    assert torch.equal(allreduce(global_process_set, 2, "world.after"), sum(value(r, 2) for r in range(P)))

    assert remove_process_set(a) and a.process_set_id is None and core.process_set_ids() == [0, 2]
    assert not remove_process_set(global_process_set)
    expect_error("removed set", lambda: core.submit([spec(core.OpKind.ALLREDUCE, "x", x, x, [4])], process_set=1),
                 "process set 1 does not exist (existing: 0, 2)")
    expect_error("remove the world", lambda: core.remove_process_set(0), "process set 0 is the world")
    expect_error("remove twice", lambda: core.remove_process_set(1), "process set 1 does not exist")
    again = add_process_set([0, 1])
    assert again.process_set_id == 3, again  # ids are never reused
    if again.included():
        assert torch.equal(allreduce(again, 3, "again"), value(0, 3) + value(1, 3))
    print(f"rank {R}: process sets OK", flush=True)


def stall() -> None:
    add_process_set([0, 1])
    b = add_process_set([1, 2])
    if R == 1:
        allreduce(b, 2, "stalled.op")
        print(f"rank {R}: NOT ABORTED", flush=True)
    time.sleep(120)  # rank 2 never submits it; rank 0 is not in B


def cycle() -> None:
    sets = {ranks: add_process_set(list(ranks)) for ranks in ((0, 1), (1, 2), (0, 2))}
    first, then = {0: ((0, 1), (0, 2)), 1: ((1, 2), (0, 1)), 2: ((0, 2), (1, 2))}[R]
    x, y = value(R, 2), value(R, 2)
    handles = [core.submit([spec(core.OpKind.ALLREDUCE, f"on {ranks}", t, t, [2])],
                           process_set=sets[ranks].process_set_id) for ranks, t in ((first, x), (then, y))]
    for h in handles:
        h.wait()
    print(f"rank {R}: NOT ABORTED", flush=True)


{"collectives": collectives, "stall": stall, "cycle": cycle}[case]()

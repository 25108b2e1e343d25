"""Point-to-point transfers through pipedap.engine.send / recv (argv[1]: the case).

  transfers  on 2 or 3 ranks, each rank sending to the next and receiving from the previous one:
             every dtype x shapes from 0-d to 4-D, tags received out of order, three sends on one
             tag received in order, a 100 MiB tensor, a send + receive exchange as one submission,
             a receive posted before an all-reduce whose matching send comes after it on the peer,
             a process set with global-rank peers (3 ranks), argument errors, and mismatched
             size / dtype / multi-segment sends (each followed by a good transfer on the same tag).
             Every result is checked exactly. Ends with "rank R: p2p OK".
  stall      rank 0 receives from rank 1 with tag 7, rank 1 from rank 0 with tag 8: neither sends.
             The stall reports name each transfer, its peer and tag, and what the peer waits for;
             the timeout ends the job.
"""

import sys
import time

import torch

import pipedap as hvd
from pipedap import engine
from pipedap.process_sets import add_process_set

case = sys.argv[1]
hvd.init()
R, P = hvd.rank(), hvd.size()
NEXT, PREV = (R + 1) % P, (R - 1) % P
SHAPES = [(), (0,), (7,), (3, 4), (2, 3, 4), (2, 1, 3, 2)]


def fail(message: str) -> None:
    sys.exit(f"rank {R}: {message}")


def payload(src: int, shape, dtype, salt: int = 0) -> torch.Tensor:
    """What rank `src` sends: small integers, exact in every dtype."""
    n = torch.Size(shape).numel()
    return ((torch.arange(n) * 7 + src + salt) % 100).to(dtype).reshape(shape)


def expect_equal(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        fail(f"{what}: got {got.flatten()[:6].tolist()} {tuple(got.shape)}, want {want.flatten()[:6].tolist()}")


def expect_error(what: str, call, *words: str, error=ValueError) -> str:
    try:
        call()
    except error as e:
        missing = [w for w in words if w not in str(e)]
        if missing:
            fail(f"{what}: {missing} not in the error: {e}")
        print(f"rank {R}: {what} ERROR {e}", flush=True)
        return str(e)
    fail(f"{what}: no {error.__name__}")


def every_dtype_and_shape() -> None:
    """Every send and receive is posted before any is waited for: many transfers outstanding at once."""
    sends, recvs = [], []
    tag = 0
    for dtype in engine.DTYPES:
        for shape in SHAPES:
            sends.append(engine.send(payload(R, shape, dtype), NEXT, tag))
            out = torch.full(shape, 99).to(dtype)
            recvs.append((engine.recv(out, PREV, tag), payload(PREV, shape, dtype), f"{dtype} {shape} tag {tag}"))
            tag += 1
    for work, want, what in recvs:
        (got,) = work.wait()
        expect_equal(what, got, want)
    for work in sends:
        work.wait()
    print(f"rank {R}: {tag} dtype x shape transfers OK", flush=True)


def tags_and_order() -> None:
    # the receiver posts tag 2 before tag 1; the sender sends tag 1 first
    a, b = torch.zeros(5), torch.zeros(5)
    second = engine.recv(b, PREV, 2, name="second")
    first = engine.recv(a, PREV, 1, name="first")
    s1 = engine.send(payload(R, (5,), torch.float32, 1), NEXT, 1)
    s2 = engine.send(payload(R, (5,), torch.float32, 2), NEXT, 2)
    expect_equal("tag 2 posted first", second.wait()[0], payload(PREV, (5,), torch.float32, 2))
    expect_equal("tag 1 posted second", first.wait()[0], payload(PREV, (5,), torch.float32, 1))
    # three sends on one tag arrive in order
    outs = [torch.zeros(3, dtype=torch.int64) for _ in range(3)]
    works = [engine.recv(o, PREV, 3) for o in outs]
    sent = [engine.send(payload(R, (3,), torch.int64, k), NEXT, 3) for k in range(3)]
    for k, w in enumerate(works):
        expect_equal(f"same tag #{k}", w.wait()[0], payload(PREV, (3,), torch.int64, k))
    for w in (s1, s2, *sent):
        w.wait()
    if works[0].collectives[0].spec.name != f"recv.{PREV}.3" or sent[0].collectives[0].spec.name != f"send.{NEXT}.3":
        fail(f"default names: {works[0].collectives[0].spec.name}, {sent[0].collectives[0].spec.name}")
    print(f"rank {R}: tags out of order and one tag in order OK", flush=True)


def large() -> None:
    n = 100 * 2**20 // 8  # 100 MiB of float64: 50 segments of PIPEDAP_MESSAGE_BYTES (2 MiB)
    out = torch.zeros(n, dtype=torch.float64)
    start = time.monotonic()
    work = engine.recv(out, PREV, 10, name="big")
    engine.send(torch.arange(n, dtype=torch.float64) + R * 0.5, NEXT, 10, name="big").wait()
    work.wait()
    expect_equal("100 MiB", out, torch.arange(n, dtype=torch.float64) + PREV * 0.5)
    print(f"rank {R}: 100 MiB OK in {time.monotonic() - start:.2f} s", flush=True)


def exchange() -> None:
    """PipeDream's exchange: one send and one receive submitted as one unit."""
    out = torch.zeros(4, 4)
    work = engine.submit([engine.transfer(hvd.engine.core.OpKind.SEND, payload(R, (4, 4), torch.float32), NEXT, 20,
                                          "grad.out"),
                          engine.transfer(hvd.engine.core.OpKind.RECV, out, PREV, 20, "grad.in")])
    work.wait()
    expect_equal("exchange", out, payload(PREV, (4, 4), torch.float32))
    print(f"rank {R}: exchange OK", flush=True)


def receive_before_a_collective() -> None:
    """Rank 0 receives from rank 1, then all-reduces; rank 1 all-reduces, then sends. A receive that
    blocked rank 0's engine would never let the all-reduce start: deadlock. Then the same the other way."""
    n = 2**20  # 8 MiB of float64 (several segments) and a 4 MiB ring all-reduce
    for receiver, sender in ((0, 1), (1, 0)):
        out = torch.zeros(n, dtype=torch.float64)
        work = engine.recv(out, sender, 30 + receiver) if R == receiver else None
        total = hvd.allreduce(torch.full((n,), float(R + 1)), op=hvd.Sum, name=f"between.{receiver}")
        if R == sender:
            engine.send(torch.arange(n, dtype=torch.float64), receiver, 30 + receiver).wait()
        if work is not None:
            work.wait()
            expect_equal("received before the all-reduce", out, torch.arange(n, dtype=torch.float64))
        expect_equal("all-reduce between", total, torch.full((n,), float(P * (P + 1) // 2)))
    print(f"rank {R}: receive before a collective OK", flush=True)


def process_sets() -> None:
    singles = [add_process_set([r]) for r in range(P)]  # every rank creates every set, in one order
    expect_error("one-rank set", lambda: engine.send(torch.ones(1), R, 0, process_set=singles[R]), "has one rank")
    if P < 3:
        return
    ends = add_process_set([0, 2])  # global peers 0 and 2 are ranks 0 and 1 of the set
    if R in (0, 2):
        peer = 2 - R
        out = torch.zeros(6, dtype=torch.int32)
        work = engine.recv(out, peer, 0, process_set=ends)
        engine.send(payload(R, (6,), torch.int32), peer, 0, process_set=ends).wait()
        expect_equal("process set", work.wait()[0], payload(peer, (6,), torch.int32))
        expect_error("peer outside the set", lambda: engine.send(torch.ones(1), 1, 0, process_set=ends),
                     "peer 1 is not in", "peers are global ranks")
        print(f"rank {R}: process set {{0, 2}} with global peers OK", flush=True)
    hvd.barrier()


def argument_errors() -> None:
    expect_error("self", lambda: engine.send(torch.ones(1), R, 0), f"peer {R} is this rank")
    expect_error("tag", lambda: engine.recv(torch.ones(1), PREV, 40000), "tag 40000 is not in [0, 32767]")
    expect_error("not contiguous", lambda: engine.recv(torch.ones(4, 4).t(), PREV, 0), "not contiguous")
    mixed = [engine.transfer(hvd.engine.core.OpKind.SEND, torch.ones(1), NEXT, 0, "s"),
             engine.allreduce_collective(torch.ones(1), torch.ones(1), "ar")]
    expect_error("mixed", lambda: engine.submit(mixed), "cannot mix point-to-point operations")


def mismatches() -> None:
    """Each bad receive fails naming both sides and leaves its buffer untouched; the next transfer of the
    same tag is intact (the bad one's data was drained). The sends all complete."""
    cases = [  # (what, tag, sent, received into)
        ("size", 5, torch.ones(500), torch.full((1000,), -1.0)),
        ("dtype", 6, torch.ones(8, dtype=torch.float64), torch.full((8,), -1.0)),
        ("segments", 7, torch.ones(5 * 2**20 // 4), torch.full((10,), -1.0)),  # 5 MiB: 3 segments to drain
    ]
    for what, tag, sent, into in cases:
        bad = engine.recv(into, PREV, tag, name="act.3")
        good_out = torch.zeros(3)
        good = engine.recv(good_out, PREV, tag)
        engine.send(sent, NEXT, tag, name="x").wait()
        engine.send(payload(R, (3,), torch.float32), NEXT, tag).wait()
        want = (f"rank {R} expected 'act.3' {into.numel()} {str(into.dtype)[6:]} from rank {PREV} with tag {tag}; "
                f"rank {PREV} sent 'x' {sent.numel()} {str(sent.dtype)[6:]}")
        expect_error(f"mismatch {what}", bad.wait, want, "Nothing was written", error=hvd.CommError)
        if not torch.all(into == -1):
            fail(f"mismatch {what}: the receive buffer was written")
        expect_equal(f"after the mismatch {what}", good.wait()[0], payload(PREV, (3,), torch.float32))


if case == "transfers":
    every_dtype_and_shape()
    tags_and_order()
    large()
    exchange()
    receive_before_a_collective()
    process_sets()
    argument_errors()
    mismatches()
    total = hvd.allreduce(torch.tensor([float(R)]), op=hvd.Sum, name="after")  # the collectives still agree
    expect_equal("all-reduce after", total, torch.tensor([float(P * (P - 1) // 2)]))
    print(f"rank {R}: p2p OK", flush=True)
elif case == "stall":  # run with short PIPEDAP_STALL_SECONDS and PIPEDAP_TIMEOUT_SECONDS
    engine.recv(torch.zeros(4), 1 - R, 7 + R, name=f"never.sent.{R}").wait()
    print(f"rank {R}: NOT ABORTED", flush=True)
else:
    fail(f"unknown case {case}")

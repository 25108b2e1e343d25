"""The send_tensor / receive_tensor harness (PipeDream's communication tests), at any size >= 2.

Every rank sends to every other rank: every dtype in several shapes, each
under its own tag; receives are posted in the reverse of the send order, so
each must be matched by its tag. Then a receive is shown to be in flight before
its data is sent, and a 100 MB tensor goes around the ring. Prints
``COMM rank <r> OK``; a wrong tensor raises (and aborts the job).
"""

import torch

import pipedap
from pipedap import comm
from pipedap.pipeline.communication import TensorSpec, receive_tensor, send_tensor

pipedap.init()
R, P = pipedap.rank(), pipedap.size()
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
          torch.uint8]
SHAPES = [(), (7,), (3, 5), (2, 3, 4, 5), (0, 4)]
MESSAGES = [(d, s) for d in DTYPES for s in SHAPES]


def content(sender: int, receiver: int, tag: int, spec: TensorSpec) -> torch.Tensor:
    """A tensor that only this (sender, receiver, tag) produces."""
    n = torch.Size(spec.shape).numel()
    values = (torch.arange(n, dtype=torch.float64) * 7 + sender * 31 + receiver * 17 + tag) % 100
    return values.reshape(spec.shape).to(spec.dtype)


def check(received: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if received.dtype != expected.dtype or received.shape != expected.shape or not torch.equal(received, expected):
        raise AssertionError(f"rank {R}: {what}: got {received.dtype} {list(received.shape)} {received.flatten()[:5]}"
                             f", expected {expected.dtype} {list(expected.shape)} {expected.flatten()[:5]}")


# every dtype and shape, one tag each, to and from every peer; receives posted in reverse tag order
specs = [TensorSpec(shape, dtype) for dtype, shape in MESSAGES]
peers = [q for q in range(P) if q != R]
receives = {(q, t): receive_tensor(specs[t], q, t) for q in peers for t in reversed(range(len(specs)))}
sends = [send_tensor(content(R, q, t, spec), q, t) for q in peers for t, spec in enumerate(specs)]
for (q, t), handle in receives.items():
    check(handle.wait(), content(q, R, t, specs[t]), f"tag {t} from rank {q} ({specs[t]})")
for work in sends:
    work.wait()

# a receive is in flight, not done, until its sender sends (after the barrier); it overlaps other work
nxt, prev = (R + 1) % P, (R - 1) % P
spec = TensorSpec((1000,), torch.float32)
pending = receive_tensor(spec, prev, 9999)
assert not pending.done(), f"rank {R}: a receive completed before anything was sent"
comm.barrier()
sent = send_tensor(content(R, nxt, 9999, spec), nxt, 9999)
check(pending.wait(), content(prev, R, 9999, spec), "the late message")
sent.wait()

# 100 MB around the ring
big = TensorSpec((25 * 1024 * 1024,), torch.float32)
pending = receive_tensor(big, prev, 4242)
sent = send_tensor(content(R, nxt, 4242, big), nxt, 4242)
check(pending.wait(), content(prev, R, 4242, big), "the 100 MB tensor")
sent.wait()
comm.barrier()
print(f"COMM rank {R} OK ({len(MESSAGES)} dtypes x shapes from each of {len(peers)} peers, 100 MB ring)", flush=True)

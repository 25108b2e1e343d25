"""Horovod's semantics that its own test suite checks, checked here without it (run under mpirun).

Each check stands for tests of Horovod's test_torch.py (tests/compat/ runs those): the gradient of
every collective against finite differences of the global loss it is the gradient of; scaling of
integer tensors; grouped operations; alltoall's errors; join; a name reused while in flight;
operations in flight across a barrier; a shape mismatch of equal element count; the timeline; sparse
gradients; SyncBatchNorm. Prints "rank R of P: <check> OK" per check and exits non-zero on the first
failure.
"""

import json
import os
import sys
import tempfile
import time

import torch

import pipedap as hvd

hvd.init()
R, P = hvd.rank(), hvd.size()
torch.manual_seed(0)


def ok(what: str) -> None:
    print(f"rank {R} of {P}: {what} OK", flush=True)


def close(got, want, what, tol=1e-9):
    if got.shape != want.shape or not torch.allclose(got.double(), want.double(), rtol=tol, atol=tol):
        sys.exit(f"rank {R}: {what}: got {got.flatten()[:6].tolist()} {tuple(got.shape)}, "
                 f"want {want.flatten()[:6].tolist()} {tuple(want.shape)}")


def raises(error, call, what):
    try:
        call()
    except error as e:
        return str(e)
    sys.exit(f"rank {R}: {what}: no {error.__name__}")


# --- gradients: each collective's backward against finite differences of its global loss ----------
#
# Rank r's input x_r and upstream weights w_r are seeded by r, so every rank can rebuild all of them.
# The local loss is L_r = sum(w_r * y_r); the global loss is scale * sum_r L_r, scale being the
# convention pipedap shares with Horovod (see pipedap.comm's docstring).

ROWS = 2 * P + 1  # not divisible by P: uneven reducescatter blocks


def inputs(r: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, 3, generator=torch.Generator().manual_seed(100 + r), dtype=torch.float64)


def weights(r: int, shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(200 + r), dtype=torch.float64)


def rs_rows(r: int) -> slice:
    start = sum(ROWS // P + (q < ROWS % P) for q in range(r))
    return slice(start, start + ROWS // P + (r < ROWS % P))


def a2a_splits(r: int) -> list[int]:  # rank r sends (r + j) % 3 rows to rank j
    return [(r + j) % 3 for j in range(P)]


def a2a_rows(r: int) -> int:
    return sum(a2a_splits(r)) + 1  # one row more than it sends: that row gets no gradient


# name -> (distributed forward on this rank, one-process forward of every rank's output, loss scale)
CASES = {
    "allreduce Sum": (lambda x: hvd.allreduce(x, op=hvd.Sum), lambda xs: [sum(xs)] * P, 1.0, ROWS),
    "allreduce Average": (lambda x: hvd.allreduce(x), lambda xs: [sum(xs) / P] * P, 1.0, ROWS),
    "allgather": (lambda x: hvd.allgather(x), lambda xs: [torch.cat(xs)] * P, 1.0 / P, None),
    "broadcast": (lambda x: hvd.broadcast(x, P - 1), lambda xs: [xs[P - 1]] * P, 1.0 / P, ROWS),
    "reducescatter Sum": (lambda x: hvd.reducescatter(x, op=hvd.Sum),
                          lambda xs: [sum(xs)[rs_rows(r)] for r in range(P)], float(P), ROWS),
    "reducescatter Average": (lambda x: hvd.reducescatter(x),
                              lambda xs: [(sum(xs) / P)[rs_rows(r)] for r in range(P)], float(P), ROWS),
    "alltoall": (lambda x: hvd.alltoall(x, torch.tensor(a2a_splits(R)))[0],
                 lambda xs: [torch.cat([xs[i][sum(a2a_splits(i)[:j]):][: a2a_splits(i)[j]] for i in range(P)])
                             for j in range(P)], 1.0, "a2a"),
    "grouped_allreduce": (lambda x: hvd.grouped_allreduce([x, 2 * x], op=hvd.Sum)[1], lambda xs: [2 * sum(xs)] * P,
                          1.0, ROWS),
    "grouped_allgather": (lambda x: hvd.grouped_allgather([x])[0], lambda xs: [torch.cat(xs)] * P, 1.0 / P, None),
    "grouped_reducescatter": (lambda x: hvd.grouped_reducescatter([x], op=hvd.Sum)[0],
                              lambda xs: [sum(xs)[rs_rows(r)] for r in range(P)], float(P), ROWS),
}


def rows_of(r: int, rows) -> int:
    return r + 1 if rows is None else a2a_rows(r) if rows == "a2a" else rows


def check_gradient(name, forward, reference, scale, rows) -> None:
    xs = [inputs(r, rows_of(r, rows)) for r in range(P)]
    ys = reference(xs)
    ws = [weights(r, y.shape) for r, y in enumerate(ys)]
    x = xs[R].clone().requires_grad_()
    y = forward(x)
    close(y.detach(), ys[R], f"{name} forward")
    (ws[R] * y).sum().backward()

    def global_loss(mine: torch.Tensor) -> float:
        return scale * sum(float((w * y).sum()) for w, y in zip(ws, reference(xs[:R] + [mine] + xs[R + 1:])))

    eps, fd = 1e-6, torch.empty_like(xs[R])
    for i in range(fd.numel()):
        up, down = xs[R].clone(), xs[R].clone()
        up.view(-1)[i] += eps
        down.view(-1)[i] -= eps
        fd.view(-1)[i] = (global_loss(up) - global_loss(down)) / (2 * eps)
    close(x.grad, fd, f"{name} gradient against finite differences", tol=1e-6)
    ok(f"gradient of {name}")


for name, case in CASES.items():
    check_gradient(name, *case)

# --- integer and half tensors are scaled as Horovod scales them -----------------------------------

for dtype in (torch.int32, torch.int64, torch.float16):
    t = (torch.arange(12) - 5).to(dtype) * (R + 1)
    got = hvd.allreduce(t, op=hvd.Sum, prescale_factor=0.37, postscale_factor=1.9)
    wide = torch.float64 if not dtype.is_floating_point else torch.float32
    scaled = [((torch.arange(12) - 5).to(dtype) * (r + 1)).to(wide).mul(0.37).to(dtype) for r in range(P)]
    want = (sum(s.to(wide) for s in scaled).to(dtype).to(wide) * 1.9).to(dtype)
    close(got, want, f"allreduce prescale/postscale {dtype}", tol=1e-3 if dtype == torch.float16 else 0)
    rs = hvd.reducescatter(torch.ones(P, 2, dtype=dtype), op=hvd.Sum, postscale_factor=0.5)
    close(rs, (torch.full((1, 2), float(P), dtype=wide) * 0.5).to(dtype), f"reducescatter postscale {dtype}")
ok("integer and half scaling")

# --- grouped operations equal one operation per tensor ----------------------------------------------

tensors = [torch.full((3, 2), float(R + i)) for i in range(4)]
for got, t in zip(hvd.grouped_allreduce(tensors, op=hvd.Max), tensors):
    close(got, hvd.allreduce(t, op=hvd.Max), "grouped_allreduce")
in_place = [t.clone() for t in tensors]
hvd.grouped_allreduce_(in_place)
for got, t in zip(in_place, tensors):
    close(got, hvd.allreduce(t), "grouped_allreduce_")
handle = hvd.grouped_allgather_async([torch.ones(R + 1, 2)])
result = hvd.synchronize(handle)
assert isinstance(result, list) and len(result) == 1, f"a grouped handle gives a list, got {type(result)}"
close(result[0], torch.ones(P * (P + 1) // 2, 2), "grouped_allgather")
for got, t in zip(hvd.grouped_reducescatter(tensors), tensors):
    close(got, hvd.reducescatter(t), "grouped_reducescatter")
ok("grouped operations")

# --- alltoall's errors: local ones are ValueErrors, cross-rank ones CommErrors on every rank --------

raises(ValueError, lambda: hvd.alltoall(torch.ones(P + 1)), "alltoall of rows not divisible by the ranks")
raises(ValueError, lambda: hvd.alltoall(torch.ones(P - 1), torch.ones(P, dtype=torch.int32)), "splits past the rows")
raises(ValueError, lambda: hvd.alltoall(torch.ones(P), torch.ones(P)), "float splits")
message = raises(hvd.CommError, lambda: hvd.alltoall(torch.ones(P, R + 1)), "alltoall of different row shapes")
assert "shape" in message, message
close(hvd.alltoall(torch.full((P, 2), float(R)))[R:R + 1], torch.full((1, 2), float(R)), "alltoall after an error")
ok("alltoall errors")

# --- a name in flight is refused at once, on the rank that reuses it -------------------------------

busy = hvd.allreduce_async(torch.ones(8 << 20), name="busy")  # keeps the next one queued (in flight)
first = hvd.allreduce_async(torch.ones(3), name="duplicate")
message = raises(ValueError, lambda: hvd.allreduce_async(torch.ones(3), name="duplicate"), "a name reused in flight")
assert "still in flight" in message, message
hvd.synchronize(busy)
close(hvd.synchronize(first), torch.ones(3), "the first of two same-named operations")
close(hvd.allreduce(torch.ones(3), name="duplicate"), torch.ones(3), "the name once free again")

# A name stays held until its caller saw the operation finish: synchronized or polled it, or
# something submitted after it (one engine thread runs them in order), or passed a barrier.
held = hvd.allreduce_async(torch.ones(3), name="held")
hvd.synchronize(hvd.allreduce_async(torch.ones(3), name="after held"))
again = hvd.allreduce_async(torch.ones(3), name="held")  # free: what came after it was synchronized
time.sleep(0.5)  # `again` has finished by now, but this rank has not seen it finish
message = raises(ValueError, lambda: hvd.allreduce_async(torch.ones(3), name="held"), "a name not yet synchronized")
assert "not yet synchronized" in message, message
for handle in (held, again):
    close(hvd.synchronize(handle), torch.ones(3), "operations of one name, one after the other")
ok("a name in flight")

# --- a barrier is not matched in the order of the collectives: one in flight across it -------------
# Horovod's duplicate-name tests: rank 0 starts an operation before a barrier, the others after it.

def start(kind: str):
    if kind == "allreduce":
        return hvd.allreduce_async(torch.full((2 * P, 3), float(R)), name=kind)
    if kind == "allgather":
        return hvd.allgather_async(torch.full((R + 1, 3), float(R)), name=kind)  # first dims differ
    if kind == "broadcast":
        return hvd.broadcast_async(torch.full((2, 3), float(R)), root_rank=P - 1, name=kind)
    return hvd.reducescatter_async(torch.full((2 * P, 3), float(R)), name=kind)


expected_results = {
    "allreduce": torch.full((2 * P, 3), (P - 1) / 2),
    "allgather": torch.cat([torch.full((r + 1, 3), float(r)) for r in range(P)]),
    "broadcast": torch.full((2, 3), float(P - 1)),
    "reducescatter": torch.full((2, 3), (P - 1) / 2),
}
for kind, want in expected_results.items():
    for before in range(P):  # each rank in turn starts it before the barrier
        if R == before:
            handle = start(kind)
            raises(ValueError, lambda k=kind: start(k), f"{kind} started twice before the barrier")
        hvd.barrier()
        if R != before:
            handle = start(kind)
            raises(ValueError, lambda k=kind: start(k), f"{kind} started twice after the barrier")
        close(hvd.synchronize(handle), want, f"{kind} across a barrier")
        hvd.barrier()
ok("operations in flight across a barrier")

# --- the same element count in another shape is a mismatch, as in Horovod --------------------------

shape = (6, 2) if R == 0 else (2, 6)
message = raises(hvd.CommError, lambda: hvd.allreduce(torch.ones(shape), name="reshaped"), "allreduce reshaped")
assert "shape [6, 2]" in message and "shape [2, 6]" in message, message
ok("shape mismatch")

# --- join: every rank joins first once; the others' all-reduces count it as zeros ------------------

for first_to_join in range(P):
    if R == first_to_join:
        last = hvd.join()
    else:
        t = torch.full((5,), float(R + 1))
        close(hvd.allreduce(t, op=hvd.Sum, name="during join"), torch.full((5,), float(sum(
            r + 1 for r in range(P) if r != first_to_join))), "allreduce sum while a rank has joined")
        close(hvd.allreduce(t, name="average during join"), torch.full((5,), sum(
            r + 1 for r in range(P) if r != first_to_join) / P), "allreduce average while a rank has joined")
        message = raises(hvd.CommError, lambda: hvd.allgather(torch.ones(2)), "allgather while a rank has joined")
        assert f"rank {first_to_join} has joined" in message, message
        last = hvd.join()
    assert last != first_to_join, f"join returned the first rank to join ({last})"
    assert hvd.allgather_object(last) == [last] * P, "join returned different ranks"
close(hvd.allreduce(torch.ones(2), op=hvd.Sum), torch.full((2,), float(P)), "allreduce after join")
ok("join")

# --- the timeline names each operation and stays valid JSON ----------------------------------------

with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "timeline.json")
    hvd.start_timeline(path, mark_cycles=True)
    hvd.allreduce(torch.ones(3), name="timed")
    hvd.allgather(torch.ones(1), name="gathered")
    hvd.stop_timeline()
    if R == 0:
        events = json.load(open(path))
        names = {e["args"].get("name") for e in events if e.get("ph") == "M"}
        assert {"allreduce.timed", "allgather.gathered"} <= names, names
        kinds = {e.get("name") for e in events}
        assert {"NEGOTIATE_ALLREDUCE", "ALLREDUCE", "CYCLE_START"} <= kinds, kinds
    else:
        assert not os.path.exists(path), "only rank 0 writes the timeline"
ok("timeline")

# --- sparse: the sparse all-reduce, and an embedding's sparse gradients through the optimizer -------

dense = torch.zeros(6, 3)
dense[R % 6] = R + 1.0
reduced = hvd.sparse_allreduce_async(dense.to_sparse(), name="sparse", op=hvd.Average)()
assert reduced.is_sparse
close(reduced.to_dense(), hvd.allreduce(dense), "sparse_allreduce_async")

for sparse_as_dense in (False, True):
    torch.manual_seed(1)
    model = torch.nn.Embedding(10, 3, sparse=True)
    reference = torch.nn.Embedding(10, 3, sparse=True)
    reference.load_state_dict(model.state_dict())
    opt = hvd.DistributedOptimizer(torch.optim.SparseAdam(list(model.parameters()), lr=0.1),
                                   named_parameters=model.named_parameters(), sparse_as_dense=sparse_as_dense)
    batches = [torch.tensor([[r % 10, (r + 3) % 10]]) for r in range(P)]
    model(batches[R]).sum().backward()
    opt.step()
    ref_opt = torch.optim.SparseAdam(list(reference.parameters()), lr=0.1)
    (sum(reference(b).sum() for b in batches) / P).backward()
    ref_opt.step()
    close(model.weight.detach(), reference.weight.detach(), f"sparse embedding, sparse_as_dense={sparse_as_dense}",
          tol=1e-6)
ok("sparse gradients")

# --- an optimizer on a process set this rank is not in steps locally (Horovod's rule) ----------------

first_only = hvd.add_process_set([0])
torch.manual_seed(R)
model = torch.nn.Linear(3, 1)
local = torch.nn.Linear(3, 1)
local.load_state_dict(model.state_dict())
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), named_parameters=model.named_parameters(),
                               process_set=first_only)
local_opt = torch.optim.SGD(local.parameters(), lr=0.5)
for m, o in ((model, opt), (local, local_opt)):
    m(torch.ones(2, 3)).sum().backward()
    o.step()
close(model.weight.detach(), local.weight.detach(), "an optimizer outside its process set")
hvd.remove_process_set(first_only)
ok("optimizer outside its process set")

# --- SyncBatchNorm equals BatchNorm over the ranks' batches together ---------------------------------

batches = [torch.randn(r + 2, 3, 4, generator=torch.Generator().manual_seed(300 + r), dtype=torch.float64)
           for r in range(P)]
sync, plain = hvd.SyncBatchNorm(3).double(), torch.nn.BatchNorm1d(3).double()
for module in (sync, plain):
    module.weight.data = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
x = batches[R].clone().requires_grad_()
out = sync(x)
together = torch.cat(batches).requires_grad_()
reference = plain(together)
rows = slice(sum(b.shape[0] for b in batches[:R]), sum(b.shape[0] for b in batches[:R + 1]))
close(out.detach(), reference[rows].detach(), "SyncBatchNorm forward")
upstream = [weights(r, b.shape) for r, b in enumerate(batches)]
(upstream[R] * out).sum().backward()
(torch.cat(upstream) * reference).sum().backward()
close(x.grad, together.grad[rows], "SyncBatchNorm input gradient (of the summed loss)")
grads = hvd.allreduce(torch.cat([sync.weight.grad, sync.bias.grad]), op=hvd.Sum)
close(grads, torch.cat([plain.weight.grad, plain.bias.grad]), "SyncBatchNorm parameter gradients, summed")
close(sync.running_var, plain.running_var, "SyncBatchNorm running variance")
close(sync.running_mean, plain.running_mean, "SyncBatchNorm running mean")
ok("SyncBatchNorm")

print(f"rank {R} of {P}: all Horovod semantics OK", flush=True)

"""Horovod-compatible collectives on torch tensors (``import pipedap as hvd``).

The ``*_async`` functions return an integer handle at once; ``synchronize(handle)``
waits and returns the result, ``poll(handle)`` says whether it finished. Semantics
follow ``horovod.torch`` (v0.28): ``allgather`` concatenates along dim 0 and first
dimensions may differ; ``reducescatter`` splits dim 0, the first ``d0 % size``
ranks receiving one extra row; ``Average`` is the default op. Every collective
takes ``process_set=`` (default: every rank); ``root_rank`` is a global rank, as
in Horovod.

Operations match across ranks by *order*: every rank must call the same
collectives in the same order (see :mod:`pipedap.engine`, which these wrap).

Gradients follow Horovod's conventions, each the gradient of a global loss built
from the ranks' local losses L_r: ``allreduce`` of the summed loss sum_r L_r;
``allgather`` and ``broadcast`` of the averaged loss (1/size) sum_r L_r;
``reducescatter`` and ``alltoall`` of size x sum_r L_r and sum_r L_r respectively
(``reducescatter``'s factor is Horovod's: its backward is the all-gather of the
upstream gradient, times size for Sum).
"""

from __future__ import annotations

import itertools
import pickle
import threading
from typing import Any

import torch

from pipedap import engine
from pipedap.compression import Compression
from pipedap.engine import Average, Sum, Work, core
from pipedap.process_sets import ProcessSet, global_process_set

# --- handles -------------------------------------------------------------------

_works: dict[int, tuple[Work, bool]] = {}  # handle -> (work, whether synchronize returns a list)
_works_lock = threading.Lock()
_handle_ids = itertools.count(1)


def new_handle(work: Work, grouped: bool = False) -> int:
    """A new integer handle for ``work``; ``grouped``: its result is a list, however long."""
    with _works_lock:
        handle = next(_handle_ids)
        _works[handle] = (work, grouped)
    return handle


def _work(handle: int) -> tuple[Work, bool]:
    try:
        return _works[handle]
    except KeyError:
        raise ValueError(f"handle {handle} is unknown or was already synchronized") from None


def poll(handle: int) -> bool:
    """True when the operation behind ``handle`` has finished (``synchronize`` will not wait)."""
    return _work(handle)[0].done()


def synchronize(handle: int):
    """Wait for ``handle`` and return its result: a tensor, a list for a grouped operation, and
    ``(output, received_splits)`` for ``alltoall_async``."""
    work, grouped = _work(handle)
    try:
        results = work.wait()
    finally:
        # The tensors stay referenced until the engine is done with them: after
        # Ctrl-C the operation may still be moving data into them.
        if work.done():
            with _works_lock:
                _works.pop(handle, None)
    return list(results) if grouped else results[0] if len(results) == 1 else results


# --- arguments -------------------------------------------------------------------

_auto_names = itertools.count()


def _name(name: str | None, kind: str) -> str:
    """``name``, or a new one from a per-rank counter (unique among this rank's operations; not agreed
    across ranks, see engine.AUTO_NAME)."""
    return name if name is not None else f"{kind}{engine.AUTO_NAME}{next(_auto_names)}"


def resolve_op(op, average: bool | None):
    if average is not None:
        if op is not None:
            raise ValueError("give either op= or the deprecated average=, not both")
        return Average if average else Sum
    return Average if op is None else op


def check_member(process_set: ProcessSet, name: str, outsider_ok: bool = False) -> int:
    """This rank's rank within ``process_set`` (an error naming the set if it is not a member; -1 with
    ``outsider_ok``)."""
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"{name}: process_set must be a pipedap ProcessSet, not {type(process_set).__name__}")
    if process_set.process_set_id is None:
        raise ValueError(f"{name}: {process_set} is not registered; pass it to pipedap.add_process_set() first")
    if not process_set.included():
        if outsider_ok:
            return -1
        raise ValueError(f"{name}: rank {engine.rank()} is not in {process_set}; call it on the set's ranks only")
    return process_set.rank()


def _root_in_set(root_rank: int, process_set: ProcessSet, name: str) -> int:
    """A global root rank as its rank within the set."""
    ranks = process_set.ranks
    if root_rank not in ranks:
        raise ValueError(f"{name}: root_rank {root_rank} is not in {process_set} (ranks {list(ranks)})")
    return list(ranks).index(root_rank)


def reducescatter_counts(rows: int, row_elems: int, members: int) -> list[int]:
    """Elements each member receives when ``rows`` rows are split as Horovod does."""
    return [(rows // members + (r < rows % members)) * row_elems for r in range(members)]


# --- Horovod-compatible collectives ----------------------------------------------


def scaled(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor * factor`` in ``tensor``'s dtype, computed as Horovod does: integers in float64,
    16-bit floats in float32 (then rounded back), other floats in their own precision."""
    if tensor.is_floating_point() and tensor.element_size() > 2:
        return tensor * factor
    wide = torch.float64 if not tensor.is_floating_point() else torch.float32
    return (tensor.to(wide) * factor).to(tensor.dtype)


def _prescaled(tensor: torch.Tensor, output: torch.Tensor | None, factor: float) -> torch.Tensor:
    """The tensor to reduce: ``tensor`` scaled by ``factor`` (in place when the result goes back into it)."""
    if factor == 1.0:
        return tensor
    return tensor.copy_(scaled(tensor, factor)) if output is tensor else scaled(tensor, factor)


def _postscale(factor: float):
    """What to apply to a reduced result: None, or scaling it in place by ``factor``."""
    return None if factor == 1.0 else (lambda t: t.copy_(scaled(t, factor)))


def allreduce_spec(tensor, output, name, op, prescale_factor, postscale_factor, process_set) -> engine.Collective:
    """A checked all-reduce of ``tensor`` into ``output`` (None: a new tensor), its shape agreed across ranks."""
    engine.check_op(op, name)
    engine.check_tensor(tensor, name)
    check_member(process_set, name)
    output = torch.empty_like(tensor) if output is None else output
    c = engine.allreduce_collective(_prescaled(tensor, output, prescale_factor), output, name, op, process_set,
                                    shape=tensor.shape)
    c.after = _chain(c.after, _postscale(postscale_factor))
    return c


def _chain(first, then):
    """Two optional in-place steps applied to a result one after the other."""
    if first is None or then is None:
        return first or then
    return lambda t: then(first(t))


def _allreduce_async(tensor, output, average, name, op, prescale_factor, postscale_factor, process_set) -> int:
    """``output=None``: allocate a new result tensor."""
    c = allreduce_spec(tensor, output, _name(name, "allreduce"), resolve_op(op, average), prescale_factor,
                        postscale_factor, process_set)
    return new_handle(engine.submit([c]))


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=global_process_set) -> int:
    """Start averaging (default) or summing ``tensor`` over the set's ranks; the input is not modified."""
    return _allreduce_async(tensor, None, average, name, op, prescale_factor, postscale_factor, process_set)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=global_process_set) -> int:
    """In-place :func:`allreduce_async`."""
    return _allreduce_async(tensor, tensor, average, name, op, prescale_factor, postscale_factor, process_set)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=global_process_set):
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


class _AllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, name, prescale, postscale, process_set):
        ctx.op, ctx.prescale, ctx.postscale, ctx.process_set = op, prescale, postscale, process_set
        return synchronize(_allreduce_async(tensor, None, None, name, op, prescale, postscale, process_set))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # autograd may hand over an expanded (stride-0) gradient
        reduced = allreduce(grad, op=ctx.op, prescale_factor=ctx.prescale, postscale_factor=ctx.postscale,
                            process_set=ctx.process_set)
        return reduced, None, None, None, None, None


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0,
              postscale_factor=1.0, process_set=global_process_set):
    """Average (default) or sum ``tensor`` over the set's ranks; differentiable, input not modified."""
    op = resolve_op(op, average)
    compressed, ctx = compression.compress(tensor)
    reduced = _AllreduceFn.apply(compressed, op, name, prescale_factor, postscale_factor, process_set)
    return compression.decompress(reduced, ctx)


def _shape_exchange(tensor: torch.Tensor, name: str, process_set: ProcessSet):
    """The all-gather of every member's shape of ``tensor``, and a function that reads the shapes
    (checked: the same but for dim 0) once it ran."""
    if tensor.dim() == 0:
        raise ValueError(f"{name}: allgather needs a tensor with at least one dimension")
    max_dims = 8
    if tensor.dim() > max_dims:
        raise ValueError(f"{name}: at most {max_dims} dimensions are supported, got {tensor.dim()}")
    members = process_set.size()
    mine = torch.zeros(max_dims + 1, dtype=torch.int64, device="cpu")
    mine[0] = tensor.dim()
    mine[1 : tensor.dim() + 1] = torch.tensor(tensor.shape, dtype=torch.int64, device="cpu")
    everyone = torch.empty(members * (max_dims + 1), dtype=torch.int64, device="cpu")

    def shapes() -> list[torch.Size]:
        rows = everyone.view(members, max_dims + 1)
        found = [torch.Size(row[1 : int(row[0]) + 1].tolist()) for row in rows]
        for r, s in enumerate(found):
            if s[1:] != tensor.shape[1:]:  # every member sees every shape: each refuses, and no data moves
                raise engine.CommError(
                    f"{name}: allgather needs the same shape on every rank except dim 0; "
                    f"rank {engine.rank()} has {tuple(tensor.shape)}, rank {process_set.ranks[r]} has {tuple(s)}"
                )
        return found

    return engine.allgather_collective(mine, everyone, f"{name}.shapes", process_set), shapes


def allgather_work(tensors: list[torch.Tensor], names: list[str], process_set: ProcessSet) -> engine.Work:
    """All-gathers of ``tensors`` (checked; first dims may differ) as one submission, after one that
    exchanges their shapes. On host tensors nothing waits here: the all-gathers are sized on the
    engine thread when they come up, so a rank may reach a barrier with one in flight (as in Horovod).
    CUDA tensors wait here for the exchange: the engine thread does not allocate device memory."""
    exchanges = [_shape_exchange(t, n, process_set) for t, n in zip(tensors, names)]
    shapes_work = engine.submit([c for c, _ in exchanges])

    def build() -> list[engine.Collective]:
        built = []
        for tensor, name, (_, shapes) in zip(tensors, names, exchanges):
            found = shapes()
            row = int(torch.Size(tensor.shape[1:]).numel())
            output = tensor.new_empty((sum(s[0] for s in found), *tensor.shape[1:]))
            built.append(engine.collective(core.OpKind.ALLGATHER, name, tensor, output, [s[0] * row for s in found],
                                           process_set=process_set))
        return built

    if any(t.is_cuda for t in tensors):
        shapes_work.wait()
        return engine.submit(build())
    return engine.submit_deferred(
        [engine.unsized(core.OpKind.ALLGATHER, n, t, process_set) for t, n in zip(tensors, names)], build)


def allgather_async(tensor, name=None, process_set=global_process_set) -> int:
    """Start concatenating ``tensor`` from every member along dim 0 (first dims may differ)."""
    name = _name(name, "allgather")
    engine.check_tensor(tensor, name)
    check_member(process_set, name)
    if engine.alone(process_set):
        return new_handle(engine.completed(tensor.clone()))
    return new_handle(allgather_work([tensor], [name], process_set))


class _AllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.rows, ctx.process_set = tensor.shape[0], process_set
        return synchronize(allgather_async(tensor, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad.contiguous(), op=Average, process_set=ctx.process_set)
        rows = allgather(torch.tensor([ctx.rows], dtype=torch.int64, device="cpu"), process_set=ctx.process_set)
        offset = int(rows[: ctx.process_set.rank()].sum())
        return reduced.narrow(0, offset, ctx.rows), None, None


def allgather(tensor, name=None, process_set=global_process_set):
    """Concatenate ``tensor`` from every member along dim 0; differentiable."""
    return _AllgatherFn.apply(tensor, name, process_set)


def check_reducescatter(tensor, name, op, process_set) -> int:
    """This rank's rank within the set, once the arguments are checked."""
    engine.check_op(op, name)
    engine.check_tensor(tensor, name)
    mine = check_member(process_set, name)
    if tensor.dim() == 0:
        raise ValueError(f"{name}: reducescatter needs a tensor with at least one dimension")
    return mine


def reducescatter_spec(tensor, name, op, process_set, prescale_factor, postscale_factor) -> engine.Collective:
    """A checked reduce-scatter of ``tensor`` along dim 0 into a new tensor (Horovod's row split)."""
    mine = check_reducescatter(tensor, name, op, process_set)
    row = int(torch.Size(tensor.shape[1:]).numel())
    counts = reducescatter_counts(tensor.shape[0], row, process_set.size())
    output = tensor.new_empty((counts[mine] // row if row else 0, *tensor.shape[1:]))
    c = engine.collective(core.OpKind.REDUCESCATTER, name, _prescaled(tensor, None, prescale_factor), output, counts,
                          op, process_set=process_set, shape=tensor.shape)
    c.after = _chain(c.after, _postscale(postscale_factor))
    return c


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0,
                        postscale_factor=1.0) -> int:
    """Start reducing ``tensor`` over the set's ranks and splitting the result along dim 0.

    Member r receives rows [start_r, start_r + rows_r) where the first ``d0 % size``
    members get ``d0 // size + 1`` rows and the others ``d0 // size``.
    """
    name = _name(name, "reducescatter")
    if engine.alone(process_set):
        check_reducescatter(tensor, name, op, process_set)
        return new_handle(engine.completed(scaled(scaled(tensor, prescale_factor), postscale_factor)))
    return new_handle(engine.submit([reducescatter_spec(tensor, name, op, process_set, prescale_factor,
                                                      postscale_factor)]))


class _ReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, process_set, prescale_factor, postscale_factor):
        ctx.op, ctx.process_set, ctx.scale = op, process_set, prescale_factor * postscale_factor
        return synchronize(reducescatter_async(tensor, name, op, process_set, prescale_factor, postscale_factor))

    @staticmethod
    def backward(ctx, grad):
        factor = ctx.scale * (ctx.process_set.size() if ctx.op == Sum else 1)
        gathered = allgather(grad.contiguous(), process_set=ctx.process_set)
        return (gathered * factor if factor != 1 else gathered), None, None, None, None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average, process_set=global_process_set,
                  prescale_factor=1.0, postscale_factor=1.0):
    """Reduce ``tensor`` over the set's ranks and return this rank's dim-0 slice; differentiable."""
    compressed, ctx = compression.compress(tensor)
    reduced = _ReducescatterFn.apply(compressed, name, op, process_set, prescale_factor, postscale_factor)
    return compression.decompress(reduced, ctx)


def _broadcast_async(tensor, output, root_rank: int, name, process_set) -> int:
    """``output=None``: allocate a new result tensor."""
    name = _name(name, "broadcast")
    engine.check_tensor(tensor, name)
    check_member(process_set, name)
    root = _root_in_set(root_rank, process_set, name)
    output = torch.empty_like(tensor) if output is None else output
    return new_handle(engine.submit([engine.collective(core.OpKind.BROADCAST, name, tensor, output, [tensor.numel()],
                                                    root=root, process_set=process_set, shape=tensor.shape)]))


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    """Start copying ``tensor`` from ``root_rank`` to every member; the input is not modified."""
    return _broadcast_async(tensor, None, root_rank, name, process_set)


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    """In-place :func:`broadcast_async`."""
    return _broadcast_async(tensor, tensor, root_rank, name, process_set)


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


class _BroadcastFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return synchronize(broadcast_async(tensor, root_rank, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad.contiguous(), op=Average, process_set=ctx.process_set)
        return (reduced if engine.rank() == ctx.root_rank else torch.zeros_like(reduced)), None, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """Copy ``tensor`` from ``root_rank`` to every member; differentiable."""
    return _BroadcastFn.apply(tensor, root_rank, name, process_set)


def _alltoall_splits(tensor: torch.Tensor, splits, name: str, members: int) -> list[int]:
    """Rows of ``tensor`` for each member, in set rank order (checked here: a ValueError names the fix)."""
    rows = tensor.shape[0]
    if splits is None:
        if rows % members:
            raise ValueError(f"{name}: the first dimension ({rows}) is not divisible by the {members} ranks; pass "
                             "splits= to say how many rows go to each")
        return [rows // members] * members
    if isinstance(splits, torch.Tensor):
        if splits.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: splits must be an int32 or int64 tensor, got {splits.dtype}")
        values = splits.flatten().tolist()
    elif all(isinstance(v, int) for v in splits):
        values = list(splits)
    else:
        raise ValueError(f"{name}: splits must be a tensor or list of integers, got {splits!r}")
    if len(values) != members:
        raise ValueError(f"{name}: {len(values)} splits for {members} ranks; give one row count per rank")
    if min(values) < 0:
        raise ValueError(f"{name}: splits {values} hold a negative row count")
    if sum(values) > rows:
        raise ValueError(f"{name}: splits {values} send {sum(values)} rows, but the tensor has {rows}")
    return values


def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set) -> int:
    """Start sending ``splits[r]`` rows of ``tensor`` (in order along dim 0) to each member r and
    receiving theirs; ``synchronize`` returns ``(output, received_splits)``.

    ``splits`` defaults to an equal split of dim 0. The row counts are exchanged first (one small
    all-gather), so this waits for that exchange. Shapes beyond dim 0 must be the same on every rank.
    """
    name = _name(name, "alltoall")
    engine.check_tensor(tensor, name)
    mine = check_member(process_set, name)
    if tensor.dim() == 0:
        raise ValueError(f"{name}: alltoall needs a tensor with at least one dimension")
    members = process_set.size()
    send = _alltoall_splits(tensor, splits, name, members)
    # received_splits: like splits (dtype, device), else int32 on the CPU, as Horovod's
    like = splits if isinstance(splits, torch.Tensor) else torch.empty(0, dtype=torch.int32, device="cpu")
    if engine.alone(process_set):
        received = torch.tensor(send, dtype=like.dtype, device=like.device)
        return new_handle(engine.completed(tensor.narrow(0, 0, send[0]).clone(), lambda out: (out, received)))
    everyone = torch.empty(members * members, dtype=torch.int64, device="cpu")
    engine.submit([engine.allgather_collective(torch.tensor(send, dtype=torch.int64, device="cpu"), everyone,
                                               f"{name}.splits", process_set)]).wait()
    matrix = everyone.view(members, members)  # matrix[i, j]: rows member i sends to member j
    received = matrix[:, mine].to(dtype=like.dtype, device=like.device)
    row = int(torch.Size(tensor.shape[1:]).numel())
    output = tensor.new_empty((int(received.sum()), *tensor.shape[1:]))
    c = engine.collective(core.OpKind.ALLTOALL, name, tensor, output, (matrix * row).flatten().tolist(),
                          process_set=process_set, shape=tensor.shape[1:])
    c.after = lambda out: (out, received)
    return new_handle(engine.submit([c]))


class _AlltoallFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        output, received = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.received, ctx.rows, ctx.process_set = received, tensor.shape[0], process_set
        if splits is None:
            return output
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx, grad, *unused):
        back, _ = synchronize(alltoall_async(grad.contiguous(), ctx.received, process_set=ctx.process_set))
        if back.shape[0] < ctx.rows:  # rows beyond the splits' sum were not sent: no gradient
            back = torch.cat([back, back.new_zeros((ctx.rows - back.shape[0], *back.shape[1:]))])
        return back, None, None, None


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """Send ``splits[r]`` rows of ``tensor`` to each member r and concatenate what arrives, in rank
    order; differentiable. Returns the output, and with ``splits`` given also the received splits."""
    return _AlltoallFn.apply(tensor, splits, name, process_set)


def join(device: int = -1) -> int:
    """Wait, taking part in the others' all-reduces with zeros, until every rank called join;
    return the rank that joined last (the same on every rank).

    For data that runs out unevenly: a rank that has no batch left calls ``join()`` and the
    others' gradient all-reduces go on (an average still divides by the world's size, as in
    Horovod). Other collectives raise a CommError on the ranks that call them while a rank
    has joined. ``device`` is accepted for Horovod's signature: the zeros live in host memory,
    so collectives on CUDA tensors are among those refused during a join.
    """
    if engine.size() == 1:
        return engine.rank()
    last = torch.zeros(1, dtype=torch.int64)
    spec = core.OpSpec(core.OpKind.JOIN, "join", 0, last.data_ptr())
    engine.submit([engine.Collective(spec, (last,), result=last)]).wait()
    return int(last)


def sparse_allreduce_async(tensor, name, op, process_set=global_process_set):
    """Start reducing a sparse COO ``tensor`` as Horovod does: all-gather its indices and values
    (no densifying). Returns a function that waits and returns the reduced sparse tensor."""
    if op not in (Average, Sum):
        raise ValueError(f"{name}: a sparse allreduce sums or averages (op=Sum or Average), not {op!r}")
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.sparse_coo:
        raise TypeError(f"{name}: sparse_allreduce_async needs a sparse COO tensor; use allreduce for dense ones")
    indices = allgather_async(tensor._indices().t().contiguous(), f"{name}.indices", process_set)
    values = allgather_async(tensor._values().contiguous(), f"{name}.values", process_set)

    def wait():
        gathered_values = synchronize(values)
        gathered_indices = synchronize(indices)
        if op == Average:
            gathered_values = gathered_values / process_set.size()
        return torch.sparse_coo_tensor(gathered_indices.t(), gathered_values, tensor.shape, check_invariants=True)

    return wait


def barrier(process_set=global_process_set) -> None:
    """Wait until every member reached this point and this rank's earlier operations finished.

    As in Horovod and MPI, a barrier is not matched in the order of the collectives: an
    operation submitted before it may be one that another rank submits after its barrier.
    """
    check_member(process_set, "barrier")
    engine.meet(process_set).wait()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None, process_set=global_process_set) -> Any:
    """Pickle ``obj`` on ``root_rank`` and return it on every member."""
    name = name or "broadcast_object"  # no counter: ranks that ran other unnamed operations still match
    check_member(process_set, name)
    if process_set.size() == 1:
        return obj
    is_root = engine.rank() == root_rank
    raw = pickle.dumps(obj) if is_root else b""
    length = torch.tensor([len(raw)], dtype=torch.int64, device="cpu")
    broadcast_(length, root_rank, f"{name}.length", process_set)
    data = torch.empty(int(length), dtype=torch.uint8, device="cpu")
    if is_root:
        data.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    broadcast_(data, root_rank, f"{name}.data", process_set)
    return pickle.loads(data.numpy().tobytes())


def allgather_object(obj: Any, name: str | None = None, process_set=global_process_set) -> list:
    """Pickle ``obj`` on every member; return every member's object, in the set's rank order."""
    name = name or "allgather_object"  # no counter: ranks that ran other unnamed operations still match
    check_member(process_set, name)
    if process_set.size() == 1:
        return [obj]
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    lengths = allgather(torch.tensor([data.numel()], dtype=torch.int64, device="cpu"), f"{name}.lengths",
                        process_set=process_set).tolist()
    everything = allgather(data, f"{name}.data", process_set=process_set)
    return [pickle.loads(chunk.numpy().tobytes()) for chunk in everything.split(lengths)]

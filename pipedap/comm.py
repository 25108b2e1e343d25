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

_works: dict[int, Work] = {}
_works_lock = threading.Lock()
_handle_ids = itertools.count(1)


def _handle(work: Work) -> int:
    with _works_lock:
        handle = next(_handle_ids)
        _works[handle] = work
    return handle


def _work(handle: int) -> Work:
    try:
        return _works[handle]
    except KeyError:
        raise ValueError(f"handle {handle} is unknown or was already synchronized") from None


def poll(handle: int) -> bool:
    """True when the operation behind ``handle`` has finished (``synchronize`` will not wait)."""
    return _work(handle).done()


def synchronize(handle: int):
    """Wait for ``handle`` and return its result tensor."""
    work = _work(handle)
    try:
        results = work.wait()
    finally:
        # The tensors stay referenced until the engine is done with them: after
        # Ctrl-C the operation may still be moving data into them.
        if work.done():
            with _works_lock:
                _works.pop(handle, None)
    return results[0] if len(results) == 1 else results


# --- arguments -------------------------------------------------------------------

_auto_names = itertools.count()


def _name(name: str | None, kind: str) -> str:
    """Auto-generated names are the same on every rank that calls the same sequence."""
    return name if name is not None else f"{kind}.noname.{next(_auto_names)}"


def _resolve_op(op, average: bool | None):
    if average is not None:
        if op is not None:
            raise ValueError("give either op= or the deprecated average=, not both")
        return Average if average else Sum
    return Average if op is None else op


def check_member(process_set: ProcessSet, name: str) -> int:
    """This rank's rank within ``process_set`` (an error naming the set if it is not a member)."""
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"{name}: process_set must be a pipedap ProcessSet, not {type(process_set).__name__}")
    if process_set.process_set_id is None:
        raise ValueError(f"{name}: {process_set} is not registered; pass it to pipedap.add_process_set() first")
    if not process_set.included():
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


def _allreduce_async(tensor, output, average, name, op, prescale_factor, postscale_factor, process_set) -> int:
    """``output=None``: allocate a new result tensor."""
    name = _name(name, "allreduce")
    op = _resolve_op(op, average)
    engine.check_op(op, name)
    engine.check_tensor(tensor, name)
    check_member(process_set, name)
    output = torch.empty_like(tensor) if output is None else output
    if prescale_factor != 1.0:
        tensor = tensor * prescale_factor if output is not tensor else tensor.mul_(prescale_factor)
    c = engine.allreduce_collective(tensor, output, name, op, process_set)
    if postscale_factor != 1.0:
        c.after = lambda t: t.mul_(postscale_factor)
    return _handle(engine.submit([c]))


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
    op = _resolve_op(op, average)
    compressed, ctx = compression.compress(tensor)
    reduced = _AllreduceFn.apply(compressed, op, name, prescale_factor, postscale_factor, process_set)
    return compression.decompress(reduced, ctx)


def _exchange_shapes(tensor: torch.Tensor, name: str, process_set: ProcessSet) -> list[torch.Size]:
    """Every member's shape (blocking: one small all-gather through the engine)."""
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
    engine.submit([engine.allgather_collective(mine, everyone, f"{name}.shapes", process_set)]).wait()
    shapes = [torch.Size(row[1 : int(row[0]) + 1].tolist()) for row in everyone.view(members, max_dims + 1)]
    for r, s in enumerate(shapes):
        if s[1:] != tensor.shape[1:]:  # every member sees every shape: each raises, and none submits the data
            raise engine.CommError(
                f"{name}: allgather needs the same shape on every rank except dim 0; "
                f"rank {engine.rank()} has {tuple(tensor.shape)}, rank {process_set.ranks[r]} has {tuple(s)}"
            )
    return shapes


def allgather_async(tensor, name=None, process_set=global_process_set) -> int:
    """Start concatenating ``tensor`` from every member along dim 0 (first dims may differ).

    The shapes are exchanged first, so this waits for that small exchange.
    """
    name = _name(name, "allgather")
    engine.check_tensor(tensor, name)
    check_member(process_set, name)
    if engine.alone(process_set):
        return _handle(engine.completed(tensor.clone()))
    shapes = _exchange_shapes(tensor, name, process_set)
    row = tensor[0].numel() if tensor.shape[0] else int(torch.Size(tensor.shape[1:]).numel())
    output = tensor.new_empty((sum(s[0] for s in shapes), *tensor.shape[1:]))
    counts = [s[0] * row for s in shapes]
    return _handle(engine.submit([engine.collective(core.OpKind.ALLGATHER, name, tensor, output, counts,
                                                    process_set=process_set)]))


class _AllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.rows, ctx.process_set = tensor.shape[0], process_set
        return synchronize(allgather_async(tensor, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad.contiguous(), op=Sum, process_set=ctx.process_set)
        rows = allgather(torch.tensor([ctx.rows], dtype=torch.int64, device="cpu"), process_set=ctx.process_set)
        offset = int(rows[: ctx.process_set.rank()].sum())
        return reduced.narrow(0, offset, ctx.rows), None, None


def allgather(tensor, name=None, process_set=global_process_set):
    """Concatenate ``tensor`` from every member along dim 0; differentiable."""
    return _AllgatherFn.apply(tensor, name, process_set)


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set) -> int:
    """Start reducing ``tensor`` over the set's ranks and splitting the result along dim 0.

    Member r receives rows [start_r, start_r + rows_r) where the first ``d0 % size``
    members get ``d0 // size + 1`` rows and the others ``d0 // size``.
    """
    name = _name(name, "reducescatter")
    engine.check_op(op, name)
    engine.check_tensor(tensor, name)
    mine = check_member(process_set, name)
    if tensor.dim() == 0:
        raise ValueError(f"{name}: reducescatter needs a tensor with at least one dimension")
    if engine.alone(process_set):
        return _handle(engine.completed(tensor.clone()))
    row = int(torch.Size(tensor.shape[1:]).numel())
    counts = reducescatter_counts(tensor.shape[0], row, process_set.size())
    output = tensor.new_empty((counts[mine] // row if row else 0, *tensor.shape[1:]))
    return _handle(engine.submit([engine.collective(core.OpKind.REDUCESCATTER, name, tensor, output, counts, op,
                                                    process_set=process_set)]))


class _ReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, process_set):
        ctx.op, ctx.process_set = op, process_set
        return synchronize(reducescatter_async(tensor, name, op, process_set))

    @staticmethod
    def backward(ctx, grad):
        gathered = allgather(grad.contiguous(), process_set=ctx.process_set)
        return (gathered / ctx.process_set.size() if ctx.op == Average else gathered), None, None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average, process_set=global_process_set):
    """Reduce ``tensor`` over the set's ranks and return this rank's dim-0 slice; differentiable."""
    compressed, ctx = compression.compress(tensor)
    return compression.decompress(_ReducescatterFn.apply(compressed, name, op, process_set), ctx)


def _broadcast_async(tensor, output, root_rank: int, name, process_set) -> int:
    """``output=None``: allocate a new result tensor."""
    name = _name(name, "broadcast")
    engine.check_tensor(tensor, name)
    check_member(process_set, name)
    root = _root_in_set(root_rank, process_set, name)
    output = torch.empty_like(tensor) if output is None else output
    return _handle(engine.submit([engine.collective(core.OpKind.BROADCAST, name, tensor, output, [tensor.numel()],
                                                    root=root, process_set=process_set)]))


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
        reduced = allreduce(grad.contiguous(), op=Sum, process_set=ctx.process_set)
        return (reduced if engine.rank() == ctx.root_rank else torch.zeros_like(reduced)), None, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """Copy ``tensor`` from ``root_rank`` to every member; differentiable."""
    return _BroadcastFn.apply(tensor, root_rank, name, process_set)


def barrier(process_set=global_process_set) -> None:
    """Wait until every member reached this point (and all earlier operations ran)."""
    check_member(process_set, "barrier")
    engine.submit([engine.barrier_collective(process_set=process_set)]).wait()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None, process_set=global_process_set) -> Any:
    """Pickle ``obj`` on ``root_rank`` and return it on every member."""
    name = _name(name, "broadcast_object")
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
    name = _name(name, "allgather_object")
    check_member(process_set, name)
    if process_set.size() == 1:
        return [obj]
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    lengths = allgather(torch.tensor([data.numel()], dtype=torch.int64, device="cpu"), f"{name}.lengths",
                        process_set=process_set).tolist()
    everything = allgather(data, f"{name}.data", process_set=process_set)
    return [pickle.loads(chunk.numpy().tobytes()) for chunk in everything.split(lengths)]

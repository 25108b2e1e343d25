"""Horovod's grouped collectives: a list of tensors reduced, gathered or scattered as one submission.

A group is agreed and run as one unit by the engine (its ring advances every operation step by step
together), so it costs one start-up instead of one per tensor. ``synchronize`` on a grouped handle
returns a list, in the order of the input. Names: ``name`` is the base; tensor i is ``name.i``.
Arguments, defaults and gradients are those of the single-tensor functions in :mod:`pipedap.comm`.
"""

from __future__ import annotations

import itertools

import torch

from pipedap import comm, engine
from pipedap.compression import Compression
from pipedap.engine import Average, Sum
from pipedap.process_sets import global_process_set

_auto_names = itertools.count()


def _names(name: str | None, kind: str, tensors) -> list[str]:
    """One name per tensor from the base ``name`` (auto-generated alike on every rank)."""
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError(f"grouped_{kind}: expected a non-empty list of tensors, got {type(tensors).__name__}")
    base = name if name is not None else f"grouped_{kind}{engine.AUTO_NAME}{next(_auto_names)}"
    return [f"{base}.{i}" for i in range(len(tensors))]


# --- allreduce -------------------------------------------------------------------


def _grouped_allreduce_async(tensors, in_place, average, name, op, prescale_factor, postscale_factor,
                             process_set) -> int:
    op = comm.resolve_op(op, average)
    collectives = [comm.allreduce_spec(t, t if in_place else None, n, op, prescale_factor, postscale_factor,
                                        process_set)
                   for t, n in zip(tensors, _names(name, "allreduce", tensors))]
    return comm.new_handle(engine.submit(collectives), grouped=True)


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                            process_set=global_process_set) -> int:
    """Start averaging (default) or reducing every tensor of the list over the set's ranks."""
    return _grouped_allreduce_async(tensors, False, average, name, op, prescale_factor, postscale_factor,
                                    process_set)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                             process_set=global_process_set) -> int:
    """In-place :func:`grouped_allreduce_async`."""
    return _grouped_allreduce_async(tensors, True, average, name, op, prescale_factor, postscale_factor,
                                    process_set)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=global_process_set) -> list:
    return comm.synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                                     process_set))


class _GroupedAllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, name, prescale, postscale, process_set, *tensors):
        ctx.op, ctx.prescale, ctx.postscale, ctx.process_set = op, prescale, postscale, process_set
        return tuple(comm.synchronize(grouped_allreduce_async(list(tensors), None, name, op, prescale, postscale,
                                                              process_set)))

    @staticmethod
    def backward(ctx, *grads):
        reduced = grouped_allreduce([g.contiguous() for g in grads], op=ctx.op, prescale_factor=ctx.prescale,
                                    postscale_factor=ctx.postscale, process_set=ctx.process_set)
        return (None, None, None, None, None, *reduced)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0,
                      postscale_factor=1.0, process_set=global_process_set) -> list:
    """Average (default) or reduce every tensor of the list over the set's ranks; differentiable."""
    op = comm.resolve_op(op, average)
    compressed = [compression.compress(t) for t in tensors]
    reduced = _GroupedAllreduceFn.apply(op, name, prescale_factor, postscale_factor, process_set,
                                        *(c for c, _ in compressed))
    return [compression.decompress(r, ctx) for r, (_, ctx) in zip(reduced, compressed)]


# --- allgather -------------------------------------------------------------------


def grouped_allgather_async(tensors, name=None, process_set=global_process_set) -> int:
    """Start concatenating each tensor of the list from every member along dim 0 (first dims may differ)."""
    names = _names(name, "allgather", tensors)
    for tensor, n in zip(tensors, names):
        engine.check_tensor(tensor, n)
        comm.check_member(process_set, n)
    if engine.alone(process_set):
        return comm.new_handle(engine.completed_group([t.clone() for t in tensors]), grouped=True)
    return comm.new_handle(comm.allgather_work(list(tensors), names, process_set), grouped=True)


class _GroupedAllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, process_set, *tensors):
        ctx.rows, ctx.process_set = [t.shape[0] for t in tensors], process_set
        return tuple(comm.synchronize(grouped_allgather_async(list(tensors), name, process_set)))

    @staticmethod
    def backward(ctx, *grads):
        reduced = grouped_allreduce([g.contiguous() for g in grads], op=Average, process_set=ctx.process_set)
        rows = comm.allgather(torch.tensor(ctx.rows, dtype=torch.int64).view(1, -1), process_set=ctx.process_set)
        offsets = rows[: ctx.process_set.rank()].sum(dim=0).tolist()
        return (None, None, *(r.narrow(0, o, n) for r, o, n in zip(reduced, offsets, ctx.rows)))


def grouped_allgather(tensors, name=None, process_set=global_process_set) -> list:
    """Concatenate each tensor of the list from every member along dim 0; differentiable."""
    return list(_GroupedAllgatherFn.apply(name, process_set, *tensors))


# --- reducescatter ------------------------------------------------------------------


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=global_process_set,
                                prescale_factor=1.0, postscale_factor=1.0) -> int:
    """Start reducing each tensor of the list and splitting it along dim 0 as ``reducescatter`` does."""
    names = _names(name, "reducescatter", tensors)
    if engine.alone(process_set):
        for t, n in zip(tensors, names):
            comm.check_reducescatter(t, n, op, process_set)
        results = [comm.scaled(comm.scaled(t, prescale_factor), postscale_factor) for t in tensors]
        return comm.new_handle(engine.completed_group(results), grouped=True)
    collectives = [comm.reducescatter_spec(t, n, op, process_set, prescale_factor, postscale_factor)
                   for t, n in zip(tensors, names)]
    return comm.new_handle(engine.submit(collectives), grouped=True)


class _GroupedReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, process_set, prescale, postscale, *tensors):
        ctx.op, ctx.process_set, ctx.scale = op, process_set, prescale * postscale
        return tuple(comm.synchronize(grouped_reducescatter_async(list(tensors), name, op, process_set, prescale,
                                                                  postscale)))

    @staticmethod
    def backward(ctx, *grads):
        factor = ctx.scale * (ctx.process_set.size() if ctx.op == Sum else 1)
        gathered = grouped_allgather([g.contiguous() for g in grads], process_set=ctx.process_set)
        return (None, None, None, None, None, *(g * factor if factor != 1 else g for g in gathered))


def grouped_reducescatter(tensors, name=None, compression=Compression.none, op=Average,
                          process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0) -> list:
    """Reduce each tensor of the list over the set's ranks and return this rank's dim-0 slices; differentiable."""
    compressed = [compression.compress(t) for t in tensors]
    reduced = _GroupedReducescatterFn.apply(name, op, process_set, prescale_factor, postscale_factor,
                                            *(c for c, _ in compressed))
    return [compression.decompress(r, ctx) for r, (_, ctx) in zip(reduced, compressed)]

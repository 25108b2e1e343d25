"""PipeDAP: decoupled all-reduce scheduling for data-parallel PyTorch training.

Use it like Horovod (``import pipedap as hvd`` works for scripts that use the
collectives below)::

    import pipedap
    pipedap.init()
    x = pipedap.allreduce(torch.ones(3))          # average over all ranks

The collectives live in :mod:`pipedap.comm` (over :mod:`pipedap.engine`) and
need the compiled ``comm_core``; it is loaded on first use, so the pure-Python parts
(``pipedap.planner``) import on machines without MPI.
"""

from __future__ import annotations

import importlib

import pipedap.heap
import pipedap.log  # noqa: F401  every record of the "pipedap" logger names its rank

pipedap.heap.retain()  # [Note: retained heap]: before the job's large tensors are allocated

__version__ = "0.1.0"

# name -> module that defines it; loaded on first attribute access
_LAZY = dict.fromkeys(
    ("init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
     "nccl_built", "cuda_built", "mpi_built", "mpi_enabled", "gloo_built", "gloo_enabled", "ccl_built",
     "ddl_built", "rocm_built", "mpi_threads_supported", "CommError", "Average", "Sum", "Adasum", "Min", "Max",
     "Product"),
    "pipedap.engine",
)
_LAZY.update(dict.fromkeys(
    ("allreduce", "allreduce_async", "allreduce_", "allreduce_async_",
     "allgather", "allgather_async", "reducescatter", "reducescatter_async",
     "broadcast", "broadcast_async", "broadcast_", "broadcast_async_",
     "barrier", "synchronize", "poll", "broadcast_object", "allgather_object", "alltoall", "alltoall_async",
     "join", "sparse_allreduce_async"),
    "pipedap.comm",
))
_LAZY.update(dict.fromkeys(
    ("grouped_allreduce", "grouped_allreduce_async", "grouped_allreduce_", "grouped_allreduce_async_",
     "grouped_allgather", "grouped_allgather_async", "grouped_reducescatter", "grouped_reducescatter_async"),
    "pipedap.grouped",
))
_LAZY.update(dict.fromkeys(("start_timeline", "stop_timeline"), "pipedap.op_timeline"))
_LAZY["SyncBatchNorm"] = "pipedap.sync_batch_norm"
_LAZY.update(dict.fromkeys(("ProcessSet", "add_process_set", "remove_process_set", "global_process_set"),
                           "pipedap.process_sets"))
_LAZY.update(dict.fromkeys(("DistributedOptimizer", "flush", "clip_grad_norm_"), "pipedap.optimizer"))
_LAZY.update(dict.fromkeys(("broadcast_parameters", "broadcast_optimizer_state"), "pipedap.functions"))
_LAZY["Compression"] = "pipedap.compression"
_LAZY["choose_algorithms"] = "pipedap.algorithms"
_LAZY.update(dict.fromkeys(("save_checkpoint", "load_checkpoint", "CheckpointError"), "pipedap.checkpoint"))

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipedap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(list(globals()) + __all__)

"""How the pipeline's ranks talk: PipeDAP's engine under an MPI launcher, else torch.distributed with gloo.

A transport moves tensors between two ranks (``send`` / ``recv``, matched by
peer and tag, returning handles with ``done()`` / ``wait()``), lets every rank
agree on an object (the start-up checks), makes one group per replicated stage
and wraps a stage's optimizer so that its replicas average their gradients.

* :class:`EngineTransport` (mpirun, or its PMI/PMIx peers): the engine's
  point-to-point operations and ``pipedap.DistributedOptimizer`` on a process
  set per stage, with every data-parallel schedule (wfbp, dear, pipedap).
* :class:`TorchTransport` (PipeDream's per-rank command lines, or torchrun):
  ``torch.distributed`` with gloo, rendezvous at MASTER_ADDR:MASTER_PORT.
  A replicated stage averages its gradients like wfbp (:class:`AveragingOptimizer`);
  dear and pipedap need the engine.

:func:`connect` picks one per process; the first call decides.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pipedap import gloo, settings

log = logging.getLogger("pipedap")

DEFAULT_TIMEOUT_SECONDS = 300.0  # gloo: how long a rank waits for a peer before failing, naming it
DEFAULT_MASTER_PORT = 29500  # PipeDream's and torch.distributed's default
BUCKET_BYTES = 4 << 20  # gloo replicas: gradients are averaged in flat buckets of about this size


# [Note: polling in a pipeline] A stage posts its next receives ahead and they wait for
# the neighbour's compute: seconds. The engine thread polls them, sleeping at most
# PIPEDAP_POLL_MAX_SLEEP_US between polls (default 200 us, tuned for collectives), on the core
# that also computes. VGG-16 in 2 stages (batch 16, 112 px, 2 ranks pinned to a core each):
# 5.15 s per minibatch with 200 us, 4.50 s with 5 ms. So the pipeline's default is 5 ms
# (a receive completes at most 5 ms late, against seconds of compute); a value the user set wins.
PIPELINE_POLL_MAX_SLEEP_US = "5000"


class EngineTransport:
    """PipeDAP's engine (MPI, NCCL where compiled): started by an MPI launcher."""

    name = "engine (MPI)"

    def __init__(self):
        import pipedap

        os.environ.setdefault("PIPEDAP_POLL_MAX_SLEEP_US", PIPELINE_POLL_MAX_SLEEP_US)  # [Note: polling in a pipeline]
        pipedap.init()
        self.rank, self.size = pipedap.rank(), pipedap.size()

    def send(self, tensor: torch.Tensor, peer: int, tag: int, name: str | None = None):
        from pipedap import engine

        return engine.send(tensor, peer, tag, name=name)

    def recv(self, tensor: torch.Tensor, peer: int, tag: int, name: str | None = None):
        from pipedap import engine

        return engine.recv(tensor, peer, tag, name=name)

    def all_gather_object(self, obj, what: str) -> list:
        from pipedap import comm

        return comm.allgather_object(obj, name=f"pipeline.{what}")

    def stage_group(self, ranks: Sequence[int]):
        """A process set of ``ranks`` (the world's when it is every rank); every rank calls it in the same order."""
        from pipedap.process_sets import add_process_set, global_process_set

        return global_process_set if len(ranks) == self.size else add_process_set(list(ranks))

    def stage_optimizer(self, optimizer: torch.optim.Optimizer, module: nn.Module, group, replicas: int,
                        backward_passes: int, dp_schedule: str) -> torch.optim.Optimizer:
        import pipedap

        return pipedap.DistributedOptimizer(optimizer, model=module, schedule=dp_schedule,
                                            backward_passes_per_step=backward_passes, process_set=group)

    def flush(self, module: nn.Module) -> None:
        """Apply the pending (lazy: dear, pipedap) updates of ``module``'s optimizer."""
        import pipedap

        pipedap.flush(module)

    def remove_groups(self, groups: list) -> None:
        from pipedap.process_sets import global_process_set, remove_process_set

        for group in groups:
            if group is not global_process_set:
                remove_process_set(group)

    def close(self) -> None:
        """Nothing: the engine lives as long as the process (pipedap's other users may share it)."""


class _TorchWork:
    """A gloo send or receive in flight; a failure names the peer and how to look for the cause."""

    def __init__(self, work, what: str, rank: int, peer: int):
        self._work, self._what, self._rank, self._peer = work, what, rank, peer

    def done(self) -> bool:
        return self._work.is_completed()

    def wait(self) -> None:
        try:
            self._work.wait()
        except RuntimeError as err:
            raise peer_failed(self._what, self._rank, self._peer, err) from None


def peer_failed(what: str, rank: int, peer: int, err: Exception) -> RuntimeError:
    """The error of a gloo transfer that failed because its peer went away (at posting or at waiting)."""
    return RuntimeError(f"rank {rank}: {what} rank {peer} failed: rank {peer} died, stalled or was stopped (look at "
                        f"its output) [{err}]")


class TorchTransport:
    """torch.distributed with gloo: CPU tensors; rendezvous at ``master_addr:master_port`` (a TCP store)."""

    name = "torch.distributed (gloo)"

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS):
        import torch.distributed as dist

        from pipedap import log as rank_logging

        self.dist, self.rank, self.size = dist, rank, world_size
        rank_logging.start(rank)  # pipedap's records say this rank (no launcher variable says it)
        if not dist.is_initialized():
            gloo.init_gloo(f"tcp://{master_addr}:{master_port}", rank, world_size,
                           datetime.timedelta(seconds=timeout))
            # A process group (its gloo threads) left to the interpreter's teardown can abort the exit
            # ("terminate called without an active exception": 8 of 30 three-rank exits on a loaded machine)
            atexit.register(self.close)

    def send(self, tensor: torch.Tensor, peer: int, tag: int, name: str | None = None) -> _TorchWork:
        return self._post(self.dist.isend, tensor, peer, tag, "sending to")

    def recv(self, tensor: torch.Tensor, peer: int, tag: int, name: str | None = None) -> _TorchWork:
        return self._post(self.dist.irecv, tensor, peer, tag, "receiving from")

    def _post(self, post, tensor: torch.Tensor, peer: int, tag: int, what: str) -> _TorchWork:
        try:  # gloo fails at once when the peer's connection is already closed
            return _TorchWork(post(tensor, peer, tag=tag), what, self.rank, peer)
        except RuntimeError as err:
            raise peer_failed(what, self.rank, peer, err) from None

    def all_gather_object(self, obj, what: str) -> list:
        everyone = [None] * self.size
        self.dist.all_gather_object(everyone, obj)
        return everyone

    def stage_group(self, ranks: Sequence[int]):
        """A gloo group of ``ranks``, or None for one rank; every rank calls it in the same order (new_group's rule)."""
        if len(ranks) == self.size:
            return self.dist.group.WORLD
        return self.dist.new_group(list(ranks)) if len(ranks) > 1 else None

    def stage_optimizer(self, optimizer: torch.optim.Optimizer, module: nn.Module, group, replicas: int,
                        backward_passes: int, dp_schedule: str) -> torch.optim.Optimizer:
        return AveragingOptimizer(optimizer, group if replicas > 1 else None, replicas * backward_passes)

    def flush(self, module: nn.Module) -> None:
        """Nothing: gloo replicas average before each step, so no update is ever pending."""

    def remove_groups(self, groups: list) -> None:
        """Nothing: gloo groups go with the process group."""

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class AveragingOptimizer:
    """``optimizer`` whose step first turns the summed gradients into their mean over ``units`` (WFBP's semantics).

    The gradients of k accumulated backward passes on each of n replicas are
    summed over the replicas' ``group`` (gloo ``all_reduce`` of flat buckets;
    None: one replica) and divided by ``units`` = n·k, the same loss scaling as
    ``DistributedOptimizer(op=Average, backward_passes_per_step=k)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group, units: int):
        self.optimizer, self.group, self.units = optimizer, group, units

    def _buckets(self) -> list[list[torch.Tensor]]:
        """The gradients in parameter order, cut into buckets of one dtype and about BUCKET_BYTES."""
        buckets: list[list[torch.Tensor]] = []
        size = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not buckets or size >= BUCKET_BYTES or buckets[-1][0].dtype != p.grad.dtype:
                    buckets.append([])
                    size = 0
                buckets[-1].append(p.grad)
                size += p.grad.numel() * p.grad.element_size()
        return buckets

    def step(self) -> None:
        import torch.distributed as dist

        if self.group is not None:
            buckets = self._buckets()
            flats = [torch.cat([g.reshape(-1) for g in bucket]) for bucket in buckets]
            works = [dist.all_reduce(flat, group=self.group, async_op=True) for flat in flats]
            for flat, bucket, work in zip(flats, buckets, works):
                work.wait()
                flat.div_(self.units)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
        elif self.units != 1:
            for bucket in self._buckets():
                for g in bucket:
                    g.div_(self.units)
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


_connected = None


def under_mpi_launcher(environ=None) -> bool:
    """Whether an MPI launcher (mpirun, or its PMI/PMIx peers) started this process."""
    environ = os.environ if environ is None else environ
    return any(var in environ for var in settings.RANK_VARIABLES)


def connect(*, rank: int | None = None, world_size: int | None = None, master_addr: str | None = None,
            master_port: int | None = None, timeout: float | None = None, environ=None,
            make_engine: Callable[[], EngineTransport] = EngineTransport):
    """This process's transport, created on the first call: the engine under an MPI launcher, else gloo.

    Outside a launcher, each argument falls back to torch.distributed's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (default 29500), as torchrun sets
    it); ``timeout`` (seconds, default 300) bounds every wait for a peer.
    """
    global _connected
    if _connected is not None:
        return _connected
    environ = os.environ if environ is None else environ
    if under_mpi_launcher(environ):
        _connected = make_engine()
    else:
        rank = _pick(rank, environ, "RANK", "--rank", int)
        world_size = _pick(world_size, environ, "WORLD_SIZE", "the config's number of ranks", int)
        master_addr = _pick(master_addr, environ, "MASTER_ADDR", "--master_addr", str)
        master_port = _pick(master_port, environ, "MASTER_PORT", "--master_port", int, DEFAULT_MASTER_PORT)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the job's {world_size} ranks (0..{world_size - 1}); pass --rank "
                             "with a rank of the config's stage_to_rank_map")
        _connected = TorchTransport(rank, world_size, master_addr, master_port,
                                    DEFAULT_TIMEOUT_SECONDS if timeout is None else timeout)
    log.info("pipeline: rank %d of %d over %s", _connected.rank, _connected.size, _connected.name)
    return _connected


def _pick(value, environ, variable: str, flag: str, kind, default=None):
    """``value``, else the environment's ``variable``, else ``default``; an error naming what to pass."""
    if value is not None:
        return value
    if environ.get(variable):
        return kind(environ[variable])
    if default is not None:
        return default
    raise RuntimeError(
        f"no MPI launcher started this process (none of {', '.join(settings.RANK_VARIABLES)} is set), so the pipeline "
        f"runs over torch.distributed with gloo and needs {variable}: pass {flag} (or set {variable}), e.g. "
        "`python main_with_runtime.py --rank 0 --master_addr localhost` on every rank with its own --rank; "
        "or start every rank with `mpirun -np N python your_script.py`")

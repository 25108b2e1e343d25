"""The systems ``python -m pipedap.tools.bench`` compares: how each starts, distributes a model, stops.

* ``PipeDAP``, ``DeAR``, ``WFBP``, ``ByteScheduler``: :func:`pipedap.DistributedOptimizer` with
  that schedule (PipeDAP runs a plan: ``--plan FILE``, or one made now by
  :mod:`pipedap.tools.bench_plan`; PipeDAP and ByteScheduler without one plan online from
  their first measured steps; ByteScheduler's plan is its simulated piece order, see
  [Note: ByteScheduler as a plan] in :mod:`pipedap.planner.schedules`).
* ``DDP``: ``torch.nn.parallel.DistributedDataParallel`` over gloo in the same processes;
  pipedap (MPI) only supplies rank, size and the rendezvous address, then stays idle.
* ``Horovod``: ``horovod.torch`` (when it imports). pipedap is not initialised at all in
  such a run: both libraries would drive MPI from their own background thread in one
  process, which is only safe with MPI_THREAD_MULTIPLE and a matching finalize order.
"""

from __future__ import annotations

import abc
import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipedap import gloo
from pipedap.planner.plan import Plan

BASELINES = ("PipeDAP", "DeAR", "WFBP", "ByteScheduler", "DDP", "Horovod")
SCHEDULE_OF = {"PipeDAP": "pipedap", "DeAR": "dear", "WFBP": "wfbp", "ByteScheduler": "bytescheduler"}
PLANNED = {"pipedap": "optimal", "bytescheduler": "bytescheduler"}  # schedule -> planner; the others are built in

Say = Callable[[str], None]


class BenchError(Exception):
    """A benchmark that cannot run as asked; the message says why and what to do."""


def canonical(name: str) -> str:
    """The baseline's canonical spelling (case-insensitive), or BenchError listing them."""
    for baseline in BASELINES:
        if baseline.lower() == name.lower():
            return baseline
    raise BenchError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


def check_runnable(baseline: str) -> None:
    """Raise BenchError when ``baseline`` cannot run here, saying why."""
    if baseline == "Horovod":
        try:
            import horovod.torch  # noqa: F401
        except ImportError as err:
            raise BenchError(f"Horovod is not available: `import horovod.torch` failed ({err}). "
                             "Build it with scripts/build_horovod.sh, or pick another baseline.") from None


def compressed(compression: str) -> str:
    """The description's note of --compression."""
    return "" if compression == "none" else f", gradients sent as {compression}"


@dataclass
class Distributed:
    """A model and optimizer ready to train with one system, and what to report about it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    description: str
    facts: dict = field(default_factory=dict)  # threshold, plan source, planning facts
    # False while the system is still settling (online planning): timing must not start yet
    warm: Callable[[], bool] = lambda: True


class Runtime(abc.ABC):
    """What the benchmark needs from a system: ranks, objects across ranks, distributing a model."""

    name: str
    comm_events = False  # whether collectives reach a completion listener (timeline)

    @abc.abstractmethod
    def rank(self) -> int: ...

    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def local_rank(self) -> int: ...

    @abc.abstractmethod
    def barrier(self) -> None: ...

    @abc.abstractmethod
    def allgather_object(self, obj: Any) -> list: ...

    @abc.abstractmethod
    def distribute(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple,
                   loss: Callable, say: Say) -> Distributed:
        """Wrap model and optimizer (same initial weights on every rank); ``batch`` is this rank's."""

    @abc.abstractmethod
    def finish(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply what is still pending after the last step."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...

    def plan(self, optimizer: torch.optim.Optimizer) -> Plan | None:
        """The pipedap plan the optimizer runs now (None for systems without one)."""
        return None

    def planning(self, optimizer: torch.optim.Optimizer) -> dict:
        """How the plan was made when the optimizer planned it online ({} otherwise): see bench's ``planning``."""
        return {}

    def describe(self, dist: Distributed) -> str:
        """One line on how the model is distributed (after warmup: the plan may have changed)."""
        return dist.description

    def listen(self, listener: Callable | None) -> None:
        """Send every completed collective to ``listener`` (None: stop); only if ``comm_events``."""
        if listener is not None:
            raise NotImplementedError(f"{self.name} does not report its collectives")


class _OverLibrary(Runtime):
    """Ranks, barriers and objects across ranks from ``lib``: pipedap or horovod.torch, which share
    these calls (init, rank, size, local_rank, barrier, allgather_object, shutdown)."""

    def __init__(self, baseline: str, args: Any, lib: Any):
        self.name, self.args, self.lib = baseline, args, lib
        lib.init()

    def rank(self) -> int:
        return self.lib.rank()

    def size(self) -> int:
        return self.lib.size()

    def local_rank(self) -> int:
        return self.lib.local_rank()

    def barrier(self) -> None:
        self.lib.barrier()

    def allgather_object(self, obj: Any) -> list:
        return self.lib.allgather_object(obj, name="bench.gather")

    def shutdown(self) -> None:
        self.lib.shutdown()


class _OverPipedap(_OverLibrary):
    """Ranks and objects across ranks from pipedap (MPI)."""

    def __init__(self, baseline: str, args: Any):
        import pipedap

        super().__init__(baseline, args, pipedap)


class PipedapRuntime(_OverPipedap):
    """pipedap.DistributedOptimizer with the schedule of the PipeDAP, DeAR or WFBP baseline."""

    comm_events = True

    def __init__(self, baseline: str, args: Any):
        super().__init__(baseline, args)
        self._listener: Callable | None = None

    def distribute(self, model, optimizer, batch, loss, say) -> Distributed:
        from pipedap.tools import bench_plan

        args, schedule = self.args, SCHEDULE_OF[self.name]
        plan, facts = None, {"threshold_bytes": args.threshold}
        if schedule == "pipedap" and args.plan:
            plan, facts["plan_source"] = args.plan, f"file {args.plan}"
        elif schedule in PLANNED and args.bandwidth:
            plan, planning = bench_plan.plan_for_link(model, *batch, loss, bandwidth=args.bandwidth,
                                                      latency=args.latency, threshold=args.threshold, say=say,
                                                      wire_fraction=0.5 if args.compression != "none" else 1.0,
                                                      planner=PLANNED[schedule], shard_update=args.shard_update)
            facts.update(planning, plan_source="planned in this job for an assumed link")
        elif schedule in PLANNED and args.shard_update:
            facts["plan_source"] = "DeAR's order (shard_update moves every all-gather to the forward phase)"
        elif schedule in PLANNED:
            facts["plan_source"] = "planned online by DistributedOptimizer from its first measured steps"
            say("  no --plan: DistributedOptimizer runs DeAR while it measures the first steps, then plans "
                "and switches; the warmup lasts until it has switched")
        self.lib.broadcast_parameters(model.state_dict(), root_rank=0)
        optimizer = self.lib.DistributedOptimizer(optimizer, model=model, schedule=schedule, plan=plan,
                                                 fusion_bytes=args.threshold,
                                                 compression=getattr(self.lib.Compression, args.compression),
                                                 shard_update=args.shard_update)
        return Distributed(model, optimizer, f"pipedap.DistributedOptimizer, schedule {schedule}"
                           + compressed(args.compression) + (", sharded update" if args.shard_update else ""), facts,
                           warm=lambda: not optimizer.measuring)

    def plan(self, optimizer) -> Plan:
        return optimizer.plan

    def planning(self, optimizer) -> dict:
        return optimizer.planning or {}

    def describe(self, dist: Distributed) -> str:
        run = dist.optimizer.plan
        if run is None:  # world size 1: the plain optimizer, nothing to communicate
            return f"{dist.description}: one worker, no communication"
        merged = sum(len(sub) > 1 for sub in run.backward)
        return (f"{dist.description}: plan {run.schedule}, {len(run.groups)} buckets, {len(run.backward)} "
                f"backward / {len(run.forward)} forward submissions" + (f" ({merged} merged)" if merged else "")
                + (f", tied embedding split (bucket {', '.join(map(str, run.split))}"
                   + ("; lookup served from the shards" if run.defer else "") + ")" if run.split else ""))

    def listen(self, listener):
        from pipedap import engine

        if self._listener is not None:
            engine.remove_completion_listener(self._listener)
        self._listener = listener
        if listener is not None:
            engine.add_completion_listener(listener)

    def finish(self, optimizer):
        optimizer.synchronize()

    def shutdown(self):
        self.listen(None)
        super().shutdown()


class DDPRuntime(_OverPipedap):
    """torch DistributedDataParallel over gloo; pipedap only provides ranks and the rendezvous."""

    def __init__(self, baseline: str, args: Any):
        super().__init__(baseline, args)
        import torch.distributed as dist

        addr, port = self.lib.broadcast_object(_rendezvous(self.size() == self.lib.local_size())
                                              if self.rank() == 0 else None, name="bench.rendezvous")
        self.dist = dist
        gloo.init_gloo(f"tcp://{addr}:{port}", self.rank(), self.size(), datetime.timedelta(minutes=5))
        self.address = f"{addr}:{port}"

    def distribute(self, model, optimizer, batch, loss, say) -> Distributed:
        from torch.nn.parallel import DistributedDataParallel

        kw = {"bucket_cap_mb": self.args.threshold / 2**20} if self.args.threshold else {}
        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, **kw)  # broadcasts rank 0's weights
        if self.args.compression != "none":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            wrapped.register_comm_hook(None, getattr(default_hooks, f"{self.args.compression}_compress_hook"))
        cap = self.args.threshold or 25 * 2**20
        return Distributed(wrapped, optimizer, f"torch DDP over gloo (rendezvous {self.address}), "
                           f"buckets of {cap / 2**20:g} MiB" + compressed(self.args.compression),
                           {"threshold_bytes": cap})

    def finish(self, optimizer):
        """Nothing: DDP updates in step()."""

    def shutdown(self):
        self.dist.destroy_process_group()
        super().shutdown()


def _rendezvous(single_host: bool) -> tuple[str, int]:
    """Rank 0's address and a free port on it, for torch.distributed's TCP rendezvous.

    The address: ``MASTER_ADDR`` when set; else 127.0.0.1 for a single-host job; else the
    address of the interface ``GLOO_SOCKET_IFNAME`` names (dist.sh sets it from
    ETH_INTERFACE), or this host's name resolved.
    """
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    interface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
    if os.environ.get("MASTER_ADDR"):
        addr = os.environ["MASTER_ADDR"]
    elif single_host:
        addr = "127.0.0.1"
    elif interface:
        addr = _interface_address(interface)
    else:
        addr = socket.gethostbyname(socket.gethostname())
    return addr, port


def _interface_address(interface: str) -> str:
    """The IPv4 address of a network interface (Linux SIOCGIFADDR)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", interface.encode()[:15]))
        except OSError as err:
            raise BenchError(f"network interface {interface!r} (GLOO_SOCKET_IFNAME) has no IPv4 address: {err}; "
                             "set ETH_INTERFACE in configs/envs.conf or MASTER_ADDR") from None
    return socket.inet_ntoa(packed[20:24])


class HorovodRuntime(_OverLibrary):
    """horovod.torch's DistributedOptimizer; pipedap is not initialised in this process."""

    def __init__(self, baseline: str, args: Any):
        if args.threshold:  # read by hvd.init()
            os.environ["HOROVOD_FUSION_THRESHOLD"] = str(args.threshold)
        import horovod.torch as hvd

        super().__init__(baseline, args, hvd)

    def distribute(self, model, optimizer, batch, loss, say) -> Distributed:
        hvd = self.lib
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        wrapped = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                           compression=getattr(hvd.Compression, self.args.compression))
        hvd.broadcast_optimizer_state(wrapped, root_rank=0)
        import horovod

        threshold = int(os.environ.get("HOROVOD_FUSION_THRESHOLD", 64 * 2**20))
        return Distributed(model, wrapped, f"horovod.torch {horovod.__version__} DistributedOptimizer, "
                           f"fusion buffer {threshold / 2**20:g} MiB" + compressed(self.args.compression),
                           {"threshold_bytes": threshold})

    def finish(self, optimizer):
        """Nothing: Horovod updates in step()."""


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def start(baseline: str, args: Any) -> Runtime:
    """Initialise the communication of ``baseline`` (call :func:`check_runnable` first)."""
    if baseline in SCHEDULE_OF:
        return PipedapRuntime(baseline, args)
    if baseline == "DDP":
        return DDPRuntime(baseline, args)
    if baseline == "Horovod":
        return HorovodRuntime(baseline, args)
    raise BenchError(f"baseline {baseline} has no runtime")

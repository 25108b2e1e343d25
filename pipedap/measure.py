"""Where the planner meets the cluster: measured cost models, agreed profiles, one plan for all ranks.

The planner (pipedap.planner) is pure Python; this module feeds it numbers that
every rank agrees on, measured with the comm core:

* :func:`measure_cost_model` times reduce-scatter, all-gather and all-reduce over
  sizes at the current world size and fits ``T(M) = a + b*M`` per primitive;
  :func:`cost_model` caches that fit as JSON keyed by world size and host set.
* :func:`agree_profile` makes every rank plan from the same layer times (the
  element-wise maximum over ranks).
* :func:`plan_on_rank0` computes the plan once and broadcasts it, so every rank
  runs the same submissions in the same order.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pipedap import comm, engine, settings
from pipedap.planner import costmodel
from pipedap.planner.costmodel import CostModel, FitReport
from pipedap.planner.plan import Plan
from pipedap.planner.profile import Profile, elementwise_max

log = logging.getLogger("pipedap")

DEFAULT_SIZES = tuple(4 << (2 * i) for i in range(5, 13))  # 4 KiB .. 64 MiB, x4 steps
KIND_OPS = {"rs": "reducescatter", "ag": "allgather", "ar": "allreduce"}


def host_set() -> tuple[str, ...]:
    """The sorted host names of all ranks (the key of a cached cost model)."""
    return tuple(sorted(set(comm.allgather_object(socket.gethostname(), name="measure.hosts"))))


def _time_primitive(kind: str, nbytes: int, repeats: int) -> float:
    """Seconds per operation (median of `repeats`, slowest rank) for a float32 buffer of ~nbytes."""
    world = engine.size()
    n = max(world, nbytes // 4 // world * world)
    full, part = torch.ones(n), torch.ones(n // world)
    make = {"rs": lambda: engine.reducescatter_collective(full, part, f"measure.rs.{n}", engine.Sum),
            "ag": lambda: engine.allgather_collective(part, full, f"measure.ag.{n}"),
            "ar": lambda: engine.allreduce_collective(full, full, f"measure.ar.{n}", engine.Sum)}[kind]
    collective = make()
    engine.submit([collective]).wait()  # warm-up
    samples = []
    for _ in range(repeats):
        comm.barrier()
        start = time.perf_counter()
        engine.submit([collective]).wait()
        samples.append(time.perf_counter() - start)
    samples.sort()
    median = torch.tensor([samples[len(samples) // 2]], dtype=torch.float64)
    return float(comm.allgather(median, name=f"measure.t.{kind}.{n}").max())  # the slowest rank's


def measure_cost_model(sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5,
                       progress: Callable[[str], None] | None = None) -> tuple[CostModel, dict[str, FitReport]]:
    """Microbenchmark rs/ag/ar with the comm core at this world size; least-squares α-β fit per primitive."""
    if engine.size() < 2:
        raise ValueError("a cost model needs at least 2 ranks: launch with mpirun -np N (N >= 2)")
    samples: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KIND_OPS}
    for nbytes in sizes:
        for kind in KIND_OPS:
            seconds = _time_primitive(kind, nbytes, repeats)
            samples[kind].append((float(nbytes), seconds))
            if progress:
                progress(f"{KIND_OPS[kind]:>14} {nbytes:>10} B: {seconds * 1e6:10.1f} us")
    return costmodel.fit(samples, engine.size(), host_set())


def cost_model(path: str | os.PathLike | None = None, measure_if_missing: bool = True,
               sizes: Sequence[int] = DEFAULT_SIZES) -> CostModel:
    """The cost model for this world size and host set: from `path` (or the cache), else measured and cached.

    The cache is ``$PIPEDAP_CACHE_DIR/costmodel.json`` (default ``~/.cache/pipedap``).
    """
    cache = settings.get("PIPEDAP_CACHE_DIR")
    file = Path(path) if path else cache / "costmodel.json"
    hosts = host_set()
    if file.exists():
        try:
            return costmodel.load(file, engine.size(), hosts)
        except (ValueError, KeyError) as err:
            if path or not measure_if_missing:
                raise
            log.info("no cached cost model for %d ranks on %s (%s): measuring", engine.size(), ",".join(hosts), err)
    elif path:
        raise FileNotFoundError(f"cost model file {file} does not exist; create it with pipedap.measure.cost_model()")
    if not measure_if_missing:
        raise FileNotFoundError(f"no cost model for {engine.size()} ranks on {hosts} in {file}")
    model, reports = measure_cost_model(sizes)
    for kind, report in reports.items():
        log.info("cost model %s: rms relative residual %.1f%% over %d sizes", kind, 100 * report.rms_relative,
                 report.samples)
    if engine.rank() == 0:
        file.parent.mkdir(parents=True, exist_ok=True)
        costmodel.save(model, file)
    return model


def agree_profile(profile: Profile) -> Profile:
    """The element-wise maximum of every rank's profile: all ranks plan from the same numbers."""
    docs = comm.allgather_object(profile.to_dict(), name="measure.profile")
    return elementwise_max([Profile.from_dict(d) for d in docs])


def plan_on_rank0(compute: Callable[[], Plan]) -> Plan:
    """Compute the plan on rank 0 only and give it to every rank (identical digests by construction)."""
    doc = comm.broadcast_object(compute().to_dict() if engine.rank() == 0 else None, 0, name="measure.plan")
    return Plan.from_json(doc)

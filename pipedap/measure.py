"""Where the planner meets the cluster: measured cost models, agreed profiles, one plan for all ranks.

The planner (pipedap.planner) is pure Python; this module feeds it numbers that
every rank agrees on, measured with the comm core:

* :func:`measure_cost_model` times reduce-scatter, all-gather and all-reduce over
  sizes at the current world size, as the ring and as MPI's collectives, chooses
  the faster per size (pipedap.algorithms) and fits ``T(M) = a + b*M`` per primitive,
  and measures how much compute slows while the link is busy (pipedap.interference);
  :func:`cost_model` caches that fit and choice as JSON keyed by world size and host
  set, and installs the choice in the engine.
* :func:`agree_profile` makes every rank plan from the same layer times (the
  element-wise maximum over ranks); :func:`with_bucket_cost` adds to a profile
  what the reducer's path of a bucket costs the training thread.
* :func:`plan_on_rank0` computes the plan once and broadcasts it, so every rank
  runs the same submissions in the same order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pipedap import algorithms, comm, engine, interference, settings
from pipedap.buckets import build_bucket
from pipedap.planner import costmodel
from pipedap.planner.costmodel import CostModel, FitReport
from pipedap.planner.plan import Plan
from pipedap.planner.profile import Profile, elementwise_max
from pipedap.process_sets import ProcessSet, global_process_set

log = logging.getLogger("pipedap")

DEFAULT_SIZES = tuple(4 << (2 * i) for i in range(5, 13))  # 4 KiB .. 64 MiB, x4 steps


def host_set(process_set: ProcessSet = global_process_set) -> tuple[str, ...]:
    """The sorted host names of the set's ranks (the key of a cached cost model)."""
    names = comm.allgather_object(socket.gethostname(), name="measure.hosts", process_set=process_set)
    return tuple(sorted(set(names)))


def measure_cost_model(sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5,
                       progress: Callable[[str], None] | None = None, process_set: ProcessSet = global_process_set
                       ) -> tuple[CostModel, dict[str, FitReport]]:
    """Microbenchmark rs/ag/ar with the comm core over the set's ranks, ring and MPI each (pipedap.algorithms).

    The model holds the faster algorithm per kind and size (``model.algorithms``), a least-squares α-β
    fit per primitive of the times of the one chosen at each size (what ``auto`` runs once it is installed),
    and ``interference`` (unless ``PIPEDAP_INTERFERENCE=off``).
    """
    if engine.alone(process_set):
        raise ValueError("a cost model needs at least 2 ranks (launch with mpirun -np N, N >= 2), or a set of "
                         "one rank whose collectives go through the engine (PIPEDAP_ONE_RANK_THROUGH_ENGINE=1)")
    times = algorithms.measure(sizes, repeats, process_set, progress)
    samples: dict[str, list[tuple[float, float]]] = {kind: [] for kind in algorithms.KINDS}
    for (kind, nbytes), by_algorithm in times.items():
        samples[kind].append((float(nbytes), by_algorithm[algorithms.faster(by_algorithm, nbytes)]))
    model, reports = costmodel.fit(samples, process_set.size(), host_set(process_set), algorithms.choose(times))
    return dataclasses.replace(model, interference=measured_interference(process_set, progress)), reports


def measured_interference(process_set: ProcessSet = global_process_set,
                          progress: Callable[[str], None] | None = None) -> float:
    """σ of pipedap.interference, or 0 with ``PIPEDAP_INTERFERENCE=off`` or on a set of one rank, which
    has no link to slow its compute (collective)."""
    if not interference_on() or process_set.size() < 2:
        return 0.0
    return interference.measure(process_set, progress)


def interference_on() -> bool:
    """Whether σ is measured and planned with (``PIPEDAP_INTERFERENCE`` is not ``off``)."""
    return settings.get("PIPEDAP_INTERFERENCE") != "off"


def cost_model(path: str | os.PathLike | None = None, measure_if_missing: bool = True,
               sizes: Sequence[int] = DEFAULT_SIZES, process_set: ProcessSet = global_process_set) -> CostModel:
    """The cost model for the set's size and host set: from `path` (or the cache), else measured and cached.

    The cache is ``$PIPEDAP_CACHE_DIR/costmodel.json`` (default ``~/.cache/pipedap``).
    """
    cache = settings.get("PIPEDAP_CACHE_DIR")
    file = Path(path) if path else cache / "costmodel.json"
    hosts, world = host_set(process_set), process_set.size()
    if file.exists():
        try:
            model = costmodel.load(file, world, hosts)
            algorithms.install(model.algorithms, process_set)
            return model
        except (ValueError, KeyError) as err:
            if path or not measure_if_missing:
                raise
            log.info("no cached cost model for %d ranks on %s (%s): measuring", world, ",".join(hosts), err)
    elif path:
        raise FileNotFoundError(f"cost model file {file} does not exist; create it with pipedap.measure.cost_model()")
    if not measure_if_missing:
        raise FileNotFoundError(f"no cost model for {world} ranks on {hosts} in {file}")
    model, reports = measure_cost_model(sizes, process_set=process_set)
    for kind, report in reports.items():
        log.info("cost model %s: rms relative residual %.1f%% over %d sizes", kind, 100 * report.rms_relative,
                 report.samples)
    if process_set.rank() == 0:
        file.parent.mkdir(parents=True, exist_ok=True)
        costmodel.save(model, file)
    algorithms.install(model.algorithms, process_set)
    return model


def agree_profile(profile: Profile, process_set: ProcessSet = global_process_set) -> Profile:
    """The element-wise maximum of every member's profile: all members plan from the same numbers."""
    docs = comm.allgather_object(profile.to_dict(), name="measure.profile", process_set=process_set)
    return elementwise_max([Profile.from_dict(d) for d in docs])


HOST_COST_REPEATS = 30  # tiny buckets timed by bucket_host_cost
HOST_COST_WAIT_S = 10.0  # for one tiny bucket's collectives to complete: far beyond any link's start-up


def bucket_host_cost(device: torch.device | str = "cpu", repeats: int = HOST_COST_REPEATS,
                     process_set: ProcessSet = global_process_set) -> float:
    """Seconds the training thread spends per bucket on the reducer's path, the link's time left out
    (collective: every member calls it).

    A tiny bucket of two parameters (pipedap.buckets) goes through what the reducer does with every
    bucket: its gradients' used flags set, cast for the wire, its reduce-scatter
    and all-gather built and submitted, waited for, cast back, its gradients attached and its used
    parameters read. The median over `repeats` of that path's time, less the wait for completion:
    the link's start-up, which the cost model charges on the link.
    """
    members = process_set.size()
    named = [(name, torch.nn.Parameter(torch.zeros(2 * members, device=device))) for name in ("weight", "bias")]
    bucket = build_bucket(0, named, members, process_set.rank())
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        bucket.mark_used(range(len(bucket.params)))
        bucket.pack()
        works = [engine.submit([engine.reducescatter_collective(bucket.sent, bucket.sent_shard, f"measure.host.rs.{i}",
                                                                comm.Sum, process_set)]),
                 engine.submit([engine.allgather_collective(bucket.sent_shard, bucket.sent, f"measure.host.ag.{i}",
                                                            process_set)])]
        submitted = time.perf_counter()
        deadline = submitted + HOST_COST_WAIT_S
        while not all(work.done() for work in works):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"rank {engine.rank()}: a tiny bucket's collectives did not complete within "
                                   f"{HOST_COST_WAIT_S:.0f} s while timing the host's cost per bucket; is every "
                                   f"member of {process_set} calling pipedap.measure.bucket_host_cost?")
            time.sleep(0.0002)
        done = time.perf_counter()
        for work in works:
            work.wait()
        bucket.unpack()
        bucket.attach_grads()
        bucket.used_params()
        times.append(submitted - started + time.perf_counter() - done)
    return statistics.median(times)


def with_bucket_cost(profile: Profile, device: torch.device | str = "cpu",
                     process_set: ProcessSet = global_process_set) -> Profile:
    """`profile` with :func:`bucket_host_cost` added to its ``bucket_cost`` (collective), agreed by
    every member ([Note: a bucket's fixed cost] in pipedap.planner.profile)."""
    host = bucket_host_cost(device, process_set=process_set)
    return agree_profile(dataclasses.replace(profile, bucket_cost=profile.bucket_cost + host), process_set)


def plan_on_rank0(compute: Callable[[], Plan], process_set: ProcessSet = global_process_set) -> Plan:
    """Compute the plan on the set's first rank only and give it to every member (identical digests)."""
    root = process_set.ranks[0]
    doc = comm.broadcast_object(compute().to_dict() if engine.rank() == root else None, root, name="measure.plan",
                                process_set=process_set)
    return Plan.from_json(doc)

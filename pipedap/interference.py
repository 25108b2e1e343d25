"""How much compute slows while the comm core moves bytes: the cost model's ``interference`` κ.

On a host whose computing core also runs the engine thread, the kernel's network stack,
copies and reductions (a CPU host; on a GPU, copy and reduction kernels contend with
compute for SMs and memory bandwidth), compute runs slower while the link is busy.
:func:`measure` times a fixed compute probe (matrix products on the training thread)
alone and while a queue of all-reduces keeps the link busy, alternating, and fits the
slow-down to the link's byte rate:

    κ = (time beside the transfers / time alone - 1) / (bytes moved per second)

so compute beside a transfer of r bytes per second takes ``1 + κ r`` times as long
([Note: interference] in pipedap.planner.simulator). An all-reduce counts its buffer
twice (a reduce-scatter and an all-gather pass). Every rank measures; the cluster's κ is
the mean over ranks, so every rank plans with the same number.

:func:`clean_clock` turns timestamps taken under interference back into the compute time
they would have taken alone, so that a profile measured while communication ran (the
online planner's DeAR steps) does not count the slow-down twice.
"""

from __future__ import annotations

import bisect
import logging
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from pipedap import comm, engine
from pipedap.process_sets import ProcessSet, global_process_set

log = logging.getLogger("pipedap")

OP_SECONDS = 0.04  # each all-reduce of the busy phases lasts about this long
OPS_PER_PHASE = 6  # all-reduces queued per busy phase (all ranks submit the same count)
ROUNDS = 2  # busy phases, each between two phases alone
PROBE_SIZE = 160  # the probe multiplies PROBE_SIZE x PROBE_SIZE float32 matrices
SIZING_BYTES = 1 << 20  # the all-reduce timed to size the busy phases' operations
MAX_BYTES = 64 << 20


def _probe() -> Callable[[], None]:
    a, b = torch.rand(PROBE_SIZE, PROBE_SIZE), torch.rand(PROBE_SIZE, PROBE_SIZE)
    return lambda: torch.mm(a, b)


def _allreduce(buffer: torch.Tensor, name: str, process_set: ProcessSet) -> engine.Collective:
    return engine.allreduce_collective(buffer, buffer, name, engine.Sum, process_set)


def _slowest(value: float, name: str, process_set: ProcessSet) -> float:
    return max(comm.allgather_object(value, name=name, process_set=process_set))


def _alone(unit: Callable[[], None], seconds: float) -> float:
    """Seconds per probe unit with nothing in flight (median of 5 timed batches)."""
    batch, times = 1, []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 5:  # how many units make a fifth of the phase
        unit()
        batch += 1
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(batch):
            unit()
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def _beside(unit: Callable[[], None], nbytes: int, name: str, process_set: ProcessSet) -> tuple[float, float]:
    """(seconds per probe unit, bytes per second moved) while OPS_PER_PHASE all-reduces run back to back."""
    buffer = torch.zeros(nbytes // 4)  # one buffer: the engine runs the queue in order
    works = [engine.submit([_allreduce(buffer, f"{name}.{i}", process_set)]) for i in range(OPS_PER_PHASE)]
    start, units = time.perf_counter(), 0
    while not works[-1].done():
        unit()
        units += 1
    elapsed = time.perf_counter() - start
    for work in works:
        work.wait()
    first, last = works[0].timings(), works[-1].timings()
    link_seconds = (last[2] - first[1]) * 1e-9
    return elapsed / max(units, 1), 2 * nbytes * OPS_PER_PHASE / max(link_seconds, 1e-9)


def measure(process_set: ProcessSet = global_process_set, progress: Callable[[str], None] | None = None) -> float:
    """κ for this cluster (seconds of slow-down per byte per second moved), the same on every member.

    Collective: every member of the set calls it. About ROUNDS * OPS_PER_PHASE * OP_SECONDS
    seconds beside the link plus as long alone.
    """
    if process_set.size() < 2:
        raise ValueError("measuring interference needs at least 2 ranks: launch with mpirun -np N (N >= 2)")
    started = time.perf_counter()
    sizing = _allreduce(torch.zeros(SIZING_BYTES // 4), "interference.sizing", process_set)
    engine.submit([sizing]).wait()  # warm-up
    t0 = time.perf_counter()
    engine.submit([sizing]).wait()
    per_byte = _slowest(time.perf_counter() - t0, "interference.t", process_set) / SIZING_BYTES
    nbytes = int(min(MAX_BYTES, max(SIZING_BYTES, OP_SECONDS / per_byte))) // 4 * 4
    unit = _probe()
    phase = OPS_PER_PHASE * OP_SECONDS
    alone = [_alone(unit, phase)]
    slowdowns, rates = [], []
    for r in range(ROUNDS):
        beside, rate = _beside(unit, nbytes, f"interference.{r}", process_set)
        alone.append(_alone(unit, phase))
        slowdowns.append(beside / statistics.mean(alone[-2:]))
        rates.append(rate)
    mine = max(0.0, (statistics.median(slowdowns) - 1) / statistics.median(rates))
    kappa = statistics.mean(comm.allgather_object(mine, name="interference.kappa", process_set=process_set))
    message = (f"interference: compute {100 * (statistics.median(slowdowns) - 1):+.1f}% on rank "
               f"{process_set.rank()} beside all-reduces of {nbytes} B moving {statistics.median(rates) / 1e6:.1f} MB/s; "
               f"kappa {kappa:.3g} s/B (mean of ranks), measured in {time.perf_counter() - started:.1f} s")
    (progress or log.info)(message)
    return kappa


def clean_clock(busy: Sequence[tuple[float, float, float]], kappa: float) -> Callable[[float], float]:
    """A map from this rank's clock to compute time as it would have run alone.

    ``busy``: (start, end, bytes moved) of every submission the link ran, in seconds on the
    clock of the timestamps to map. Compute running beside a submission advanced at
    ``1 / (1 + κ bytes / duration)`` of its speed, so the map advances at that rate there and
    at 1 elsewhere; the difference of two mapped times is the compute between them, alone.
    (Submissions run one at a time, so their intervals do not overlap.)
    """
    spans = sorted((s, e, 1.0 / (1.0 + kappa * m / (e - s))) for s, e, m in busy if e > s)
    starts = [s for s, _, _ in spans]
    lost_before = [0.0]  # time lost before each span starts
    for s, e, rate in spans:
        lost_before.append(lost_before[-1] + (e - s) * (1 - rate))

    def clean(t: float) -> float:
        k = bisect.bisect_right(starts, t) - 1
        if k < 0:
            return t
        s, e, rate = spans[k]
        return t - lost_before[k] - (min(t, e) - s) * (1 - rate)

    return clean

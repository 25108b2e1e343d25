"""How much compute slows while the comm core moves bytes: the cost model's ``interference`` σ.

On a host whose computing core also runs the engine thread, the kernel's network stack,
copies and reductions (a CPU host; on a GPU, copy and reduction kernels contend with
compute for SMs and memory bandwidth), compute runs slower while the link is busy.
:func:`measure` times a fixed compute probe (matrix products on the training thread)
alone and while a queue of all-reduces keeps the link busy, alternating, and reports

    σ = time per probe beside the transfers / time per probe alone - 1

(compute beside a transfer takes ``1 + σ`` times as long: [Note: interference] in
pipedap.planner.simulator). Every rank measures; the cluster's σ is the mean over ranks,
so every rank plans with the same number.

[Note: busy time, not bytes]
The slow-down was expected to grow with the bytes moved (copies, reductions, the TCP
stack). On the emulated cluster (one core per host) it does not: all-reduces of 4 KiB,
64 KiB, 1 MiB and 4 MiB queued back to back slowed the probe by +78%, +70%, +54% and +18%
at 500 Mbit/s (moving 61 to 121 MB/s), and by +93%, +64%, +25% and +31% at 125 Mbit/s
(30 MB/s each): the engine's polling and wake-ups while anything is in flight cost more
than the bytes, and repeated runs vary by +-15 points. So σ is a slow-down per second of
busy link, measured with operations of training's size (PIPEDAP_FUSION_BYTES, capped so
that a phase stays short), and one σ holds for merged submissions too.

:func:`clean_clock` turns timestamps taken under interference back into the compute time
they would have taken alone, so that a profile measured while communication ran (the
online planner's DeAR steps) does not count the slow-down twice.
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from pipedap import comm, engine, settings
from pipedap.process_sets import ProcessSet, global_process_set

log = logging.getLogger("pipedap")

PHASE_SECONDS = 0.3  # each busy phase queues about this much link time, each phase alone as long
ROUNDS = 3  # busy phases, each between two phases alone
PROBE_SIZE = 160  # the probe multiplies PROBE_SIZE x PROBE_SIZE float32 matrices
SIZING_BYTES = 1 << 20  # the all-reduce timed to size the busy phases
MIN_OPS = 2


def _probe() -> Callable[[], None]:
    a, b = torch.rand(PROBE_SIZE, PROBE_SIZE), torch.rand(PROBE_SIZE, PROBE_SIZE)
    return lambda: torch.mm(a, b)


def _alone(unit: Callable[[], None], seconds: float) -> float:
    """Seconds per probe unit with nothing in flight (median of 5 timed batches)."""
    batch = 1
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 5:  # how many units make a fifth of the phase
        unit()
        batch += 1
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(batch):
            unit()
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def _beside(unit: Callable[[], None], nbytes: int, ops: int, name: str, process_set: ProcessSet) -> float:
    """Seconds per probe unit while `ops` all-reduces of `nbytes` run back to back."""
    buffer = torch.zeros(nbytes // 4)  # one buffer: the engine runs the queue in order
    works = [engine.submit([engine.allreduce_collective(buffer, buffer, f"{name}.{i}", engine.Sum, process_set)])
             for i in range(ops)]
    start, units = time.perf_counter(), 0
    while not works[-1].done():
        unit()
        units += 1
    elapsed = time.perf_counter() - start
    for work in works:
        work.wait()
    return elapsed / max(units, 1)


def measure(process_set: ProcessSet = global_process_set, progress: Callable[[str], None] | None = None) -> float:
    """σ for this cluster (compute's slow-down while the link is busy), the same on every member.

    Collective: every member of the set calls it. About 2 * ROUNDS * PHASE_SECONDS seconds.
    """
    if process_set.size() < 2:
        raise ValueError("measuring interference needs at least 2 ranks: launch with mpirun -np N (N >= 2)")
    started = time.perf_counter()
    buffer = torch.zeros(SIZING_BYTES // 4)
    sizing = engine.allreduce_collective(buffer, buffer, "interference.sizing", engine.Sum, process_set)
    engine.submit([sizing]).wait()  # warm-up
    t0 = time.perf_counter()
    engine.submit([sizing]).wait()
    mine = time.perf_counter() - t0
    per_byte = max(comm.allgather_object(mine, name="interference.t", process_set=process_set)) / SIZING_BYTES
    # training's bucket size, unless one such all-reduce would outlast a phase
    nbytes = max(4, min(settings.get("PIPEDAP_FUSION_BYTES") or SIZING_BYTES, int(PHASE_SECONDS / 2 / per_byte)) // 4 * 4)
    ops = max(MIN_OPS, math.ceil(PHASE_SECONDS / (per_byte * nbytes)))
    unit = _probe()
    alone = [_alone(unit, PHASE_SECONDS)]
    slowdowns = []
    for r in range(ROUNDS):
        beside = _beside(unit, nbytes, ops, f"interference.{r}", process_set)
        alone.append(_alone(unit, PHASE_SECONDS))
        slowdowns.append(beside / statistics.mean(alone[-2:]) - 1)
    mine = max(0.0, statistics.median(slowdowns))
    sigma = statistics.mean(comm.allgather_object(mine, name="interference.sigma", process_set=process_set))
    message = (f"interference: compute {100 * mine:+.1f}% on rank {process_set.rank()} beside {ops} all-reduces of "
               f"{nbytes} B (rounds: {', '.join(f'{100 * s:+.0f}%' for s in slowdowns)}); {100 * sigma:+.1f}% "
               f"the mean of ranks, measured in {time.perf_counter() - started:.1f} s")
    (progress or log.info)(message)
    return sigma


def clean_clock(busy: Sequence[tuple[float, float]], sigma: float) -> Callable[[float], float]:
    """A map from this rank's clock to compute time as it would have run alone.

    ``busy``: (start, end) of every submission the link ran, in seconds on the clock of the
    timestamps to map. Compute running beside a submission advanced at ``1 / (1 + σ)`` of its
    speed, so the map advances at that rate there and at 1 elsewhere; the difference of two
    mapped times is the compute between them, alone. (Submissions run one at a time, so their
    intervals do not overlap.)
    """
    spans = sorted((s, e) for s, e in busy if e > s)
    starts = [s for s, _ in spans]
    lost = sigma / (1.0 + sigma)  # of each second beside a submission
    lost_before = [0.0]  # time lost before each span starts
    for s, e in spans:
        lost_before.append(lost_before[-1] + (e - s) * lost)

    def clean(t: float) -> float:
        k = bisect.bisect_right(starts, t) - 1
        if k < 0:
            return t
        s, e = spans[k]
        return t - lost_before[k] - (min(t, e) - s) * lost

    return clean

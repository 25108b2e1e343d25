"""Ring or MPI: which algorithm each host collective runs, chosen from measurements on this cluster.

The comm core runs a host reduce-scatter, all-gather or all-reduce either as its
own ring over point-to-point messages or as MPI's nonblocking collective
([Note: the measured choice of algorithm] in comm_core/src/host_collectives.h).
Which is faster depends on the kind, the size and the transport (measured
figures: docs/architecture.md, "Ring or MPI: the measured choice").

:func:`measure` times both inside the engine (the path a training step takes),
:func:`choose` turns the times into a table of sizes per kind, and :func:`install`
gives the table to the engine. ``pipedap.measure.cost_model()`` does all three as
part of measuring the cost model and caches the table with it;
``pipedap.choose_algorithms()``, called once after ``init()``, is the way for a
training script. ``PIPEDAP_ALGORITHM=ring`` or ``mpi`` overrides any table.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from pipedap import comm, engine, settings
from pipedap.process_sets import ProcessSet, global_process_set

log = logging.getLogger("pipedap")

KINDS = {"rs": "reducescatter", "ag": "allgather", "ar": "allreduce"}  # cost-model key -> engine kind
ALGORITHMS = ("ring", "mpi")
TIE = 0.05  # within 5%: keep the static default (ring from PIPEDAP_RING_MIN_BYTES), so noise does not flip it
PRUNE_AFTER = 2  # stop timing an algorithm after it lost at this many sizes in a row by more than PRUNE_MARGIN
PRUNE_MARGIN = 0.25

# {"reducescatter": ((0, "mpi"), (65536, "ring")), ...}: per kind, the size from which each algorithm runs
Table = Mapping[str, tuple[tuple[int, str], ...]]
# {("rs", bytes): {"ring": seconds, "mpi": seconds}}; an algorithm no longer timed at a size is absent
Samples = Mapping[tuple[str, int], Mapping[str, float]]


def static_default(nbytes: int) -> str:
    """What ``auto`` runs without a table: the ring from PIPEDAP_RING_MIN_BYTES."""
    return "ring" if nbytes >= settings.get("PIPEDAP_RING_MIN_BYTES") else "mpi"


def faster(times: Mapping[str, float], nbytes: int) -> str:
    """The algorithm with the shorter time; the static default unless the other is more than TIE faster."""
    if len(times) == 1:
        return next(iter(times))
    default = static_default(nbytes)
    other = "mpi" if default == "ring" else "ring"
    return other if times[other] < (1 - TIE) * times[default] else default


def choose(samples: Samples) -> dict[str, tuple[tuple[int, str], ...]]:
    """The table of the faster algorithm per kind; a switch between two measured sizes lies at their geometric mean."""
    table = {}
    for kind, engine_kind in KINDS.items():
        sizes = sorted(nbytes for k, nbytes in samples if k == kind)
        entries: list[tuple[int, str]] = []
        previous = None
        for nbytes in sizes:
            algorithm = faster(samples[kind, nbytes], nbytes)
            if not entries:
                entries.append((0, algorithm))
            elif algorithm != entries[-1][1]:
                entries.append((math.isqrt(previous * nbytes) + 1, algorithm))
            previous = nbytes
        if entries:
            table[engine_kind] = tuple(entries)
    return table


def describe(table: Table) -> str:
    """``reducescatter: mpi < 128 KiB <= ring; ...`` for the log."""
    def size(n: int) -> str:
        for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if n >= scale:
                return f"{n / scale:.4g} {unit}"
        return f"{n} B"
    parts = []
    for kind, entries in table.items():
        words = entries[0][1]
        for nbytes, algorithm in entries[1:]:
            words += f" < {size(nbytes)} <= {algorithm}"
        parts.append(f"{kind}: {words}")
    return "; ".join(parts)


class Buffers:
    """Float32 input and output of one reduce-scatter, all-gather or all-reduce (``op``, the engine's kind) of
    about ``nbytes`` (the full buffer, rounded down to a multiple of the set's size, at least one element each).

    Shared by the measured choice and ``pipedap.tools.bench_comm``, which gives mpi4py the same buffers.
    """

    def __init__(self, op: str, nbytes: int, world: int):
        n = max(world, nbytes // 4 // world * world)
        self.op, self.nbytes = op, n * 4
        full, part, out_full = torch.ones(n), torch.ones(n // world), torch.empty(n)
        self.src, self.dst = {"reducescatter": (full, part), "allgather": (part, out_full),
                              "allreduce": (full, out_full)}[op]

    def collective(self, name: str, process_set: ProcessSet = global_process_set) -> engine.Collective:
        """The comm core's collective of these buffers (a sum where it reduces)."""
        if self.op == "allgather":
            return engine.allgather_collective(self.src, self.dst, name, process_set)
        make = engine.reducescatter_collective if self.op == "reducescatter" else engine.allreduce_collective
        return make(self.src, self.dst, name, engine.Sum, process_set)


def _collective(kind: str, nbytes: int, algorithm: str, ps: ProcessSet) -> engine.Collective:
    """A float32 rs / ag / ar of ``nbytes`` (a multiple of 4 x the set's size) forced to ``algorithm``."""
    collective = Buffers(KINDS[kind], nbytes, ps.size()).collective(f"algorithms.{kind}.{nbytes}.{algorithm}", ps)
    collective.spec.algorithm = algorithm
    return collective


def _time(collectives: Mapping[str, engine.Collective], repeats: int) -> dict[str, float]:
    """This rank's median seconds per run of each collective, alternating run by run (after a warm-up each)."""
    samples: dict[str, list[float]] = {a: [] for a in collectives}
    for _ in range(repeats + 1):
        for a, collective in collectives.items():
            start = time.perf_counter()
            engine.submit([collective]).wait()
            samples[a].append(time.perf_counter() - start)
    return {a: sorted(t[1:])[repeats // 2] for a, t in samples.items()}


def measure(sizes: Sequence[int], repeats: int = 5, process_set: ProcessSet = global_process_set,
            progress: Callable[[str], None] | None = None) -> dict[tuple[str, int], dict[str, float]]:
    """Seconds per rs / ag / ar of about `sizes` bytes with each algorithm: the median of `repeats`, slowest rank.

    Ring and MPI alternate run by run, so that drift hits both alike. Once an algorithm has lost at PRUNE_AFTER sizes in a row by more
    than PRUNE_MARGIN it is no longer timed at larger sizes of that kind (on a slow link MPI's reduce-scatter
    of 64 MB would take seconds to confirm what 1 MB showed). Every rank takes the same decisions: the times
    are the maximum over ranks.
    """
    world = process_set.size()
    samples: dict[tuple[str, int], dict[str, float]] = {}
    for kind in KINDS:
        live, losses = list(ALGORITHMS), dict.fromkeys(ALGORITHMS, 0)
        for nbytes in sizes:
            n = max(world, nbytes // 4 // world * world)
            mine = _time({a: _collective(kind, n * 4, a, process_set) for a in live}, repeats)
            mine = torch.tensor([mine[a] for a in live], dtype=torch.float64)
            slowest = comm.allgather(mine.view(1, -1), name=f"algorithms.t.{kind}.{n}",
                                     process_set=process_set).max(dim=0).values
            times = dict(zip(live, slowest.tolist()))
            samples[kind, n * 4] = times
            if progress:
                progress(f"{KINDS[kind]:>14} {n * 4:>10} B: " +
                         ", ".join(f"{a} {t * 1e6:.1f} us" for a, t in times.items()))
            if len(live) == 2:
                best = min(times.values())
                for a in live:
                    losses[a] = losses[a] + 1 if times[a] > (1 + PRUNE_MARGIN) * best else 0
                live = [a for a in live if losses[a] < PRUNE_AFTER]
    return samples


def install(table: Table | None, process_set: ProcessSet = global_process_set) -> None:
    """Give every rank the table on the set's first rank (None: none), between the same two submissions.

    Collective on the set. Only a table measured on the whole world is installed: the engine applies one
    table to every process set, and the ranks outside a smaller set would not install it with the others.
    The table travels even where PIPEDAP_ALGORITHM is not auto (and is then not installed), so that ranks
    with different settings still submit the same operations; their first disagreeing operation fails.
    """
    if process_set.size() != engine.size():
        log.info("the algorithm choice measured on %s is not installed (it would apply to the whole world)",
                 process_set)
        return
    root = process_set.ranks[0]
    doc = comm.broadcast_object({k: [list(e) for e in v] for k, v in table.items()} if table is not None else None,
                                root, name="algorithms.table", process_set=process_set)
    forced = settings.get("PIPEDAP_ALGORITHM")
    if forced != "auto":
        log.info("PIPEDAP_ALGORITHM=%s: the measured choice of algorithm is not used", forced)
        return
    engine.set_algorithm_table(None if doc is None else {k: [tuple(e) for e in v] for k, v in doc.items()})
    log.info("collective algorithms: %s", describe(doc) if doc else "ring from PIPEDAP_RING_MIN_BYTES")


def installed() -> dict[str, tuple[tuple[int, str], ...]] | None:
    """The engine's table (None: auto means ring from PIPEDAP_RING_MIN_BYTES)."""
    doc = engine.algorithm_table()
    return None if doc is None else {k: tuple(tuple(e) for e in v) for k, v in doc.items()}


def choose_algorithms(path=None) -> dict[str, tuple[tuple[int, str], ...]] | None:
    """Install the measured choice of ring or MPI for the world's collectives; returns the table installed.

    Collective: every rank calls it at the same point. The choice comes with the cost model
    (``pipedap.measure.cost_model(path)``: the cached one for this world size and host set, else
    measured, about a minute on a fast link, and cached). With PIPEDAP_ALGORITHM=ring or mpi nothing
    is installed.
    """
    from pipedap import measure  # measure imports this module

    measure.cost_model(path)
    return installed()


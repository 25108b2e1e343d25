"""PipeDream's optimizer: cut a chain of modules into pipeline stages, each replicated over some ranks.

Input: per module of the chain (``models.sequential``), the measured forward,
backward and optimizer-update time of one minibatch, the bytes of its output (what crosses a stage
boundary: the activation forward, its gradient back) and of its parameters; the
number of workers; the link. A dynamic programme (PipeDream, Narayanan et al.,
SOSP 2019, section 3.1) chooses the stage boundaries and each stage's number of
replicas that minimise the time per minibatch of the slowest part of the
pipeline, a stage or a boundary:

    A(j, k) = min over i < j, m < k of max(A(i, k - m), boundary(i), stage(i..j, m)),
    with A(j, k) = stage(0..j, k) for one stage on all k workers.

``stage(i..j, m)`` is the time per minibatch of a stage of m replicas: each
replica runs every m-th minibatch, so it is the replicas' iteration time over m.
Where PipeDream charges a replicated stage a plain all-reduce of its weights,
the iteration time here is what **PipeDAP's planner** predicts for the stage's
layers on m workers (:func:`pipedap.planner.make_plan`: fusion and the decoupled
reduce-scatter/all-gather overlapping the stage's backward and next forward).
``boundary(i)`` is PipeDream's ``2 a / B``: module i's output and its gradient,
each ``latency + bytes / bandwidth``.

[Note: a stage beside its transfers]
A stage's rank also moves its boundaries' bytes, and compute runs 1 + σ times as long
while a transfer is under way (the cost model's interference, [Note: interference] in
the planner's simulator). So a stage whose compute c overlaps transfers of T seconds
per minibatch (both directions of the boundaries before and after it) takes
``c + σ min(c, T)``, over its replicas' share for a replicated stage. On 2 emulated
hosts at 125 Mbit/s, VGG-16's stage 0 computed 18-21% slower than alone beside its
1.64 s of transfers per minibatch, where σ = 0.3 predicts 0.49 s of 3.4 s (14%).
With σ = 0 (no cost model, or one without interference) stages are PipeDream's.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from pipedap.pipeline import schedules
from pipedap.pipeline.config import PipelineConfig
from pipedap.planner import costmodel, make_plan
from pipedap.planner.profile import Layer, Profile

PARALLELISMS = ("pipeline", "hybrid", "data")


@dataclass(frozen=True)
class ModuleCost:
    """One module of the chain, measured on one minibatch: seconds and bytes.

    ``update`` is its parameters' optimizer step (SGD with momentum and weight decay, as
    main_with_runtime.py's): every stage runs it after each backward, so it is part of the
    stage's time per minibatch. VGG-16's classifier (120 M parameters) takes 0.25 s of it on
    one core with pipedap's retained heap, 0.6 s with glibc's defaults, and took 1.0-1.3 s per
    minibatch in a 2-stage pipeline then ([Note: retained heap] in pipedap/heap.py;
    benchmarks/results/pipeline_vs_dp). Costs files from before it was measured load with 0.
    """

    label: str
    forward: float
    backward: float
    output_bytes: int
    param_bytes: int
    update: float = 0.0

    @property
    def compute(self) -> float:
        return self.forward + self.backward + self.update


@dataclass(frozen=True)
class Stage:
    """Modules ``start`` to ``end - 1`` of the chain on ``replicas`` ranks, and its time per minibatch."""

    start: int
    end: int
    replicas: int
    seconds: float


@dataclass(frozen=True)
class Partition:
    """The chosen stages in order, the boundary times between them, and the pipeline's time per minibatch."""

    stages: tuple[Stage, ...]
    boundaries: tuple[float, ...]  # seconds per minibatch at the boundary after each stage but the last

    @property
    def seconds(self) -> float:
        """The slowest stage or boundary: the pipeline's time per minibatch in steady state."""
        return max([s.seconds for s in self.stages] + list(self.boundaries))

    @property
    def workers(self) -> int:
        return sum(s.replicas for s in self.stages)

    def module_to_stage_map(self) -> list[int]:
        """PipeDream's map over the stage modules of the generated package: one per stage, then the loss."""
        return list(range(len(self.stages))) + [len(self.stages) - 1]

    def stage_to_rank_map(self) -> dict[str, list[int]]:
        """Consecutive ranks per stage, stage 0 first."""
        out, rank = {}, 0
        for s, stage in enumerate(self.stages):
            out[str(s)] = list(range(rank, rank + stage.replicas))
            rank += stage.replicas
        return out

    def kind(self) -> str:
        """``data`` (one stage), ``pipeline`` (one rank per stage) or ``hybrid``: the config file it goes in."""
        if len(self.stages) == 1:
            return "data"
        return "pipeline" if all(s.replicas == 1 for s in self.stages) else "hybrid"


StageTime = Callable[[int, int, int], float]  # (start, end, replicas) -> seconds per minibatch
BoundaryTime = Callable[[int], float]  # (index of the last module before the boundary) -> seconds per minibatch


def best_partition(num_modules: int, workers: int, stage_time: StageTime, boundary_time: BoundaryTime,
                   parallelism: str = "hybrid") -> Partition:
    """The partition of ``num_modules`` modules over exactly ``workers`` ranks with the least time per minibatch.

    ``pipeline``: ``workers`` stages of one rank each; ``data``: one stage on every rank;
    ``hybrid``: any number of stages and replicas. Ties go to fewer stages, then to the
    earlier boundary, so the result is deterministic.
    """
    _check(num_modules, workers, parallelism)
    if parallelism == "data":
        return _assemble([(0, num_modules, workers)], stage_time, boundary_time)
    inf = (math.inf, ())
    # best[j][k]: (seconds, stages) for modules 0..j-1 on exactly k workers
    best = [[inf] * (workers + 1) for _ in range(num_modules + 1)]
    for j in range(1, num_modules + 1):
        for k in range(1, workers + 1):
            one_stage = parallelism == "hybrid" or k == 1
            candidates = [(stage_time(0, j, k), ((0, j, k),))] if one_stage else []
            for i in range(1, j):
                for m in ([1] if parallelism == "pipeline" else range(1, k)):
                    before = best[i][k - m]
                    if before[0] == math.inf:
                        continue
                    seconds = max(before[0], boundary_time(i - 1), stage_time(i, j, m))
                    candidates.append((seconds, before[1] + ((i, j, m),)))
            if candidates:
                best[j][k] = min(candidates, key=lambda c: (c[0], len(c[1])))
    seconds, stages = best[num_modules][workers]
    if seconds == math.inf:
        raise ValueError(f"no {parallelism} partition of {num_modules} modules over {workers} workers")
    return _assemble(list(stages), stage_time, boundary_time)


def exhaustive_partition(num_modules: int, workers: int, stage_time: StageTime, boundary_time: BoundaryTime,
                         parallelism: str = "hybrid") -> float:
    """The least time per minibatch over every partition, by enumeration (for testing the programme)."""
    _check(num_modules, workers, parallelism)
    allowed = {"pipeline": lambda s: s == workers, "data": lambda s: s == 1, "hybrid": lambda s: True}[parallelism]
    best = math.inf
    for num_stages in filter(allowed, range(1, min(num_modules, workers) + 1)):
        for cuts in itertools.combinations(range(1, num_modules), num_stages - 1):
            bounds = (0, *cuts, num_modules)
            for replicas in _compositions(workers, num_stages):
                stages = [(bounds[s], bounds[s + 1], replicas[s]) for s in range(num_stages)]
                best = min(best, _assemble(stages, stage_time, boundary_time).seconds)
    return best


def _compositions(total: int, parts: int):
    """Every tuple of ``parts`` positive integers summing to ``total``."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def _assemble(stages: Sequence[tuple[int, int, int]], stage_time: StageTime, boundary_time: BoundaryTime) -> Partition:
    return Partition(tuple(Stage(a, b, m, stage_time(a, b, m)) for a, b, m in stages),
                     tuple(boundary_time(b - 1) for _, b, _ in stages[:-1]))


def _check(num_modules: int, workers: int, parallelism: str) -> None:
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism {parallelism!r}: choose one of {', '.join(PARALLELISMS)}")
    if workers < 1 or num_modules < 1:
        raise ValueError(f"need at least one module and one worker, got {num_modules} modules, {workers} workers")
    if parallelism == "pipeline" and workers > num_modules:
        raise ValueError(f"a pipeline of {workers} stages needs at least {workers} modules; the chain has "
                         f"{num_modules}: use fewer workers or --parallelism hybrid")


# --- the cost of a stage and of a boundary, from measurements --------------------------------------------


class Costs:
    """Stage and boundary times of a measured chain on a link: what :func:`best_partition` minimises.

    ``sync_model(m)`` is the cost model of m workers' collectives (fitted, or from the
    link); ``latency`` and ``bandwidth`` (bytes/s) price a boundary's point-to-point
    transfers. A replicated stage's iteration time is PipeDAP's plan's prediction.
    ``interference`` (σ) slows a stage's compute beside its boundaries' transfers
    ([Note: a stage beside its transfers]).
    """

    def __init__(self, modules: Sequence[ModuleCost], *, bandwidth: float, latency: float,
                 sync_model: Callable[[int], costmodel.CostModel] | None = None, interference: float = 0.0):
        if not (math.isfinite(interference) and interference >= 0):
            raise ValueError(f"interference {interference!r}: expected a number >= 0 like 0.3 (30% slower)")
        self.modules = tuple(modules)
        self.bandwidth, self.latency, self.interference = bandwidth, latency, interference
        self.sync_model = sync_model or (lambda m: costmodel.from_link(m, bandwidth, latency))
        self.stage_time = lru_cache(maxsize=None)(self._stage_time)

    def boundary_time(self, last: int) -> float:
        return 2 * (self.latency + self.modules[last].output_bytes / self.bandwidth)

    def compute(self, start: int, end: int) -> float:
        return sum(m.compute for m in self.modules[start:end])

    def transfers(self, start: int, end: int) -> float:
        """Seconds per minibatch the boundaries around modules start..end-1 move data, both ways."""
        before = self.boundary_time(start - 1) if start > 0 else 0.0
        after = self.boundary_time(end - 1) if end < len(self.modules) else 0.0
        return before + after

    def beside_transfers(self, start: int, end: int) -> float:
        """What the stage's compute loses per minibatch (of its own) to its transfers: σ min(c, T)."""
        return self.interference * min(self.compute(start, end), self.transfers(start, end))

    def extra_in_flight(self, partition: Partition, most: int = 8) -> int | None:
        """Units beyond PipeDream's count that 1F1B needs to run at the partition's period (None: replicated stages).

        [Note: units a round trip needs]
        A unit that stage s forwards comes back as a gradient after its round trip (the
        compute of stages s..S-1 and both transfers of boundaries s..S-2); PipeDream's
        count of units in flight covers it only when transfers are short. Stage s needs at
        least ceil(round trip / period) units in flight, and 1F1B's alternation couples
        neighbours too (stage s forwards unit u + a_s only after the backward of u), so
        instead of a formula the runtime's own event lists are replayed with these times
        (:func:`one_f_one_b_period`) for 0, 1, ... extra units, and the first that reaches
        the period (within 1%) is the answer (``most`` if none does). A model: it assumes
        a stage computes and a boundary transfers in the measured and priced times.
        """
        stages = partition.stages
        if len(stages) < 2 or any(st.replicas > 1 for st in stages):
            return None
        # each stage slowed beside its transfers alike in both passes; the step follows each backward on the
        # same core: replayed as part of it
        slowed = [1 + self.beside_transfers(st.start, st.end) / max(self.compute(st.start, st.end), 1e-12)
                  for st in stages]
        forward = [k * sum(m.forward for m in self.modules[st.start:st.end]) for k, st in zip(slowed, stages)]
        backward = [k * sum(m.backward + m.update for m in self.modules[st.start:st.end])
                    for k, st in zip(slowed, stages)]
        one_way = [b / 2 for b in partition.boundaries]
        for extra in range(most):
            if one_f_one_b_period(forward, backward, one_way, extra) <= partition.seconds * 1.01:
                return extra
        return most

    def _stage_time(self, start: int, end: int, replicas: int) -> float:
        beside = self.beside_transfers(start, end) / replicas  # a replica's minibatches are every m-th
        if replicas == 1:
            return self.compute(start, end) + beside
        profile = stage_profile(self.modules[start:end])
        if profile is None:  # no parameters: nothing to synchronise
            return self.compute(start, end) / replicas + beside
        plan = make_plan(profile, self.sync_model(replicas), planner="pipedap", fusion="search")
        return plan.predicted.iteration_time / replicas + beside


def one_f_one_b_period(forward: Sequence[float], backward: Sequence[float], one_way: Sequence[float],
                       extra_in_flight: int = 0, units: int = 200) -> float:
    """Seconds per minibatch of 1F1B with one rank per stage in steady state, replaying the runtime's events.

    Stage s runs its events (:func:`pipedap.pipeline.schedules.events`) in order; a forward
    waits for the unit's activation (``one_way[s - 1]`` after stage s-1's forward), a
    backward for its gradient (``one_way[s]`` after stage s+1's backward; the last stage's
    right after its forward). The period is the mean interval between stage 0's backwards
    over the middle half of ``units`` (neither filling nor draining).
    """
    stages = len(forward)
    config = PipelineConfig.load({"module_to_stage_map": list(range(stages)) + [stages - 1],
                                  "stage_to_rank_map": {str(s): [s] for s in range(stages)}})
    orders = [[e for e in schedules.events("1f1b", config, s, 0, units, 1, extra_in_flight) if e.kind != "step"]
              for s in range(stages)]
    clock, done = [0.0] * stages, [0] * stages
    arrives = {(schedules.FORWARD, 0, u): 0.0 for u in range(units)}  # (kind, stage, unit) -> input ready
    finished: dict[int, float] = {}
    while any(done[s] < len(orders[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            while done[s] < len(orders[s]) and (orders[s][done[s]].kind, s, orders[s][done[s]].unit) in arrives:
                e = orders[s][done[s]]
                is_forward = e.kind == schedules.FORWARD
                end = max(clock[s], arrives[e.kind, s, e.unit]) + (forward[s] if is_forward else backward[s])
                clock[s], done[s], progressed = end, done[s] + 1, True
                if is_forward and s + 1 < stages:
                    arrives[schedules.FORWARD, s + 1, e.unit] = end + one_way[s]
                elif is_forward:
                    arrives[schedules.BACKWARD, s, e.unit] = end
                elif s > 0:
                    arrives[schedules.BACKWARD, s - 1, e.unit] = end + one_way[s - 1]
                else:
                    finished[e.unit] = end
        if not progressed:
            raise RuntimeError("internal: the replayed 1F1B events deadlocked")
    ends = [finished[u] for u in range(units // 4, 3 * units // 4)]
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def stage_profile(modules: Sequence[ModuleCost]) -> Profile | None:
    """The planner's profile of a stage: one layer per module with parameters (others' times go to a neighbour)."""
    layers: list[list] = []
    pending_tf = pending_tb = 0.0
    for m in modules:
        if m.param_bytes:
            layers.append([m.label, m.param_bytes, m.forward + pending_tf, m.backward + pending_tb, m.update])
            pending_tf = pending_tb = 0.0
        elif layers:
            layers[-1][2] += m.forward
            layers[-1][3] += m.backward
        else:
            pending_tf, pending_tb = pending_tf + m.forward, pending_tb + m.backward
    if not layers:
        return None
    return Profile(tuple(Layer(label, (f"{label}.params",), nbytes, tf, tb, u) for label, nbytes, tf, tb, u in layers))


# --- measuring a chain -----------------------------------------------------------------------------------


def measure(chain: Sequence[tuple[str, nn.Module]], sample: torch.Tensor, *, iterations: int = 3,
            warmup: int = 1) -> list[ModuleCost]:
    """Each module's forward, backward and update seconds on ``sample`` (one minibatch), output and parameter bytes.

    Module i runs on module i - 1's output, detached (so each backward is its own);
    the median of ``iterations`` timed runs after ``warmup``. Training mode, as in
    training (BatchNorm's running statistics move); gradients are cleared afterwards.
    The update is an SGD step with momentum and weight decay on the module's parameters
    (:func:`update_seconds`); the parameters are restored after it.
    """
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations}, {warmup}")
    costs = []
    x = sample
    for label, module in chain:
        module.train()
        forwards, backwards = [], []
        for run in range(warmup + iterations):
            inp = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            out = module(inp)
            t1 = time.perf_counter()
            out.backward(torch.ones_like(out))
            t2 = time.perf_counter()
            if run >= warmup:
                forwards.append(t1 - t0)
                backwards.append(t2 - t1)
        params = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        costs.append(ModuleCost(label, statistics.median(forwards), statistics.median(backwards),
                                out.numel() * out.element_size(), params, update_seconds(module, iterations, warmup)))
        module.zero_grad(set_to_none=True)
        x = out.detach()
    return costs


def update_seconds(module: nn.Module, iterations: int = 3, warmup: int = 1) -> float:
    """Median seconds of an SGD step (momentum 0.9, weight decay 1e-4) on ``module``'s parameters, which must
    have gradients; 0 without trainable parameters. The parameters are left as they were."""
    params = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return 0.0
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    times = []
    for run in range(warmup + iterations):
        t0 = time.perf_counter()
        optimizer.step()
        if run >= warmup:
            times.append(time.perf_counter() - t0)
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    return statistics.median(times)

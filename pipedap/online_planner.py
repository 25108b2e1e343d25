"""Plan a running DistributedOptimizer from its own measurements (schedule="pipedap" without a plan).

The first steps run the DeAR plan while the optimizer reports, per bucket:
when its gradients were complete (backward), when the forward reached it and
left its pre-hook (the wait for its all-gather and its update are not compute),
how long its update took, and when the model's forward ended. The engine
reports every reduce-scatter and all-gather with its duration, which gives
(bytes, seconds) samples for the α-β fit of each primitive — measured on this
cluster, at this world size, under training load (see [Note: skew-free samples]).
Compute ran beside those operations, so its times include their interference:
the planner measures the interference (pipedap.interference), maps the steps'
timestamps to compute time alone, and charges the slow-down again in the
simulator, for the plan it simulates (see [Note: profiles measured beside communication]).

At the last profiling step the ranks agree on the profile (element-wise
maximum), rank 0 plans (the exact planner, never worse than the paper's
greedy) and broadcasts the plan, and every rank switches to it for the next
iteration: the same step on every rank, so the order of collectives stays
identical everywhere.
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from pipedap import comm, engine, heap, interference, measure
from pipedap.buckets import Bucket
from pipedap.planner import costmodel, make_plan
from pipedap.planner.costmodel import AlphaBeta, CostModel
from pipedap.planner.plan import Plan
from pipedap.planner.profile import Layer, Profile, Tie, layer_times
from pipedap.process_sets import ProcessSet, global_process_set

log = logging.getLogger("pipedap")

# PIPEDAP_PLANNER (or schedule="bytescheduler") -> make_plan's planner
PLANNERS = {"optimal": "optimal", "greedy": "pipedap", "bytescheduler": "bytescheduler"}
MIN_DISTINCT_SIZES = 3  # fewer bucket sizes than this cannot separate start-up from bandwidth
# A fitted cost model whose DeAR prediction is off the measured DeAR steps by more than this
# factor either way is not trusted ([Note: checking the fit against the steps]).
FIT_TOLERANCE = 1.10
# The engine starts a queued operation microseconds after its predecessor ends, unless the
# thread it just woke takes the shared core first; a millisecond of skew is negligible here.
HANDOFF_S = 1e-3
# where the plan's cost model came from (``OnlinePlanner.planning["cost_source"]``)
FITTED = "fitted to the profiling steps' reduce-scatters and all-gathers, with the interference measured then"
MICROBENCHMARK = "the cluster's microbenchmark (pipedap.measure.cost_model, cached)"

# [Note: skew-free samples]
# A rank's duration of a collective (engine start to end) is the transfer time only
# if every rank started it at about the same moment. When one rank starts late, the
# early rank's duration includes the wait, and the late rank's can be far shorter than
# the transfer: the early rank's messages (under the eager limit) already sit in its
# socket buffers. On VGG-16 at 500 Mbit/s one such sample (a 4.6 MB reduce-scatter "done"
# in 1.9 ms) made the relative-error fit predict 0.37 s for a 411 MB reduce-scatter that
# takes 3.5 s, and the planner built its plan on it. So a sample counts only if, on every
# rank, the operation was queued behind its predecessor: submitted before the predecessor
# ended and started right when it ended (the engine runs one submission at a time). Then
# every rank started it when the same collective finished, i.e. together. Its duration
# is the slowest rank's. (A bare queueing-time threshold would not do: on a core shared
# with training, waking an idle engine can itself take a millisecond.)

# [Note: one sample per operation]
# Each bucket's reduce-scatter and all-gather runs once per profiling step, at the same size
# and in the same place of the step; the fit takes the median of its skew-free runs as one
# sample. The relative fit ([Note: relative residuals] in pipedap.planner.costmodel) weighs a
# sample by 1/seconds, so runs that came out fast count most: one step in five whose
# operations ran at 0.3x their usual time halves the fitted start-up and bandwidth cost, and
# the plans built on it are predicted too fast. The median keeps one odd step (fast or slow)
# out of the fit, and weighs every operation once however many of its runs were skew-free.


# [Note: warm memory before profiling]
# A profile of steps whose memory was still being faulted in ([Note: warm memory] in
# pipedap.heap) had BERT-base's first gradient of the backward 0.7 s late, and its plans were
# predicted up to 7% slow. So the warm-up runs until a step in which no rank faulted in more
# than heap.WARM_BYTES (the ranks agree, one integer each per step), at most
# PIPEDAP_PROFILE_WARMUP_MAX (10) steps; the log says how long it took.


@dataclass
class _Step:
    """What one iteration (from one step() to the next) recorded."""

    ready: dict[int, float] = field(default_factory=dict)  # bucket -> gradients complete
    entered: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # bucket -> (enter, exit, update s)
    forward_end: float | None = None
    pieces: dict[int, tuple[float, float, int]] = field(default_factory=dict)  # tied bucket -> dense part's pieces


class OnlinePlanner:
    """Collects per-bucket timings for ``steps`` steps (after at least ``warmup`` steps, until memory is warm:
    [Note: warm memory before profiling]), then makes a plan."""

    def __init__(self, buckets: list[Bucket], steps: int = 5, warmup: int = 1, planner: str = "optimal",
                 process_set: ProcessSet = global_process_set, max_warmup: int = 1):
        if steps < 1:
            raise ValueError(f"PIPEDAP_PROFILE_STEPS must be >= 1, got {steps}")
        if max_warmup < warmup:
            raise ValueError(f"PIPEDAP_PROFILE_WARMUP_MAX must be >= {warmup}, got {max_warmup}")
        if planner not in PLANNERS:
            raise ValueError(f"PIPEDAP_PLANNER={planner!r}: use optimal (exact) or greedy (the paper's heuristic)")
        self.buckets = buckets
        self.steps, self.warmup, self.planner, self.process_set = steps, warmup, planner, process_set
        self.records: list[_Step] = []
        self.current = _Step()
        self.ops: dict[str, list[engine.CompletedOp]] = {}  # rs/ag name -> its runs, in completion order
        self.ends: list[int] = []  # end_ns of every submission seen (predecessors of the samples)
        self.busy: list[tuple[float, float]] = []  # (start, end) in seconds of every submission
        self.step_started = time.monotonic()
        self.step_seconds: list[float] = []
        self.max_warmup = max_warmup
        self.warm = warmup == max_warmup  # nothing to find out
        self.faulted = heap.faulted_in_bytes()  # at the last warm-up step's end
        self.planning: dict | None = None  # how the plan was made, once it is: see step_done()
        self.ties: Callable[[], tuple[Tie, ...]] = tuple  # the reducer's tied buckets ([Note: ties in a profile])
        engine.add_completion_listener(self._on_ops)

    # --- what the optimizer reports -------------------------------------------------

    def bucket_ready(self, index: int) -> None:
        self.current.ready.setdefault(index, time.monotonic())

    def bucket_entered(self, index: int, enter: float, leave: float, update_seconds: float) -> None:
        self.current.entered.setdefault(index, (enter, leave, update_seconds))

    def dense_pieces(self, index: int, first: float, last: float, count: int) -> None:
        """A tied bucket's output layer had the first and the last of its ``count`` pieces ready
        ([Note: the dense part in pieces] in pipedap.tied_split)."""
        self.current.pieces.setdefault(index, (first, last, count))

    def forward_ended(self) -> None:
        if not self.current.ready:  # the forward that precedes this iteration's backward
            self.current.forward_end = time.monotonic()

    def _on_ops(self, ops: list[engine.CompletedOp]) -> None:
        self.ends.append(ops[0].end_ns)
        self.busy.append((ops[0].start_ns * 1e-9, ops[0].end_ns * 1e-9))
        if len(ops) != 1 or len(self.records) < self.warmup or ops[0].process_set != self.process_set.process_set_id:
            return  # merged submissions do not separate the two primitives; warm-up is not typical; another set's
        op = ops[0]
        if op.name.split(".", 1)[0] in ("rs", "ag"):
            self.ops.setdefault(op.name, []).append(op)

    def queued_runs(self) -> dict[str, list[tuple[float, float, bool]]]:
        """Per rs/ag name, its runs on this rank: (bytes, seconds, queued behind its predecessor)."""
        ends = sorted(self.ends)

        def queued(op: engine.CompletedOp) -> bool:
            k = bisect.bisect_right(ends, op.start_ns) - 1  # the last submission that ended before it started
            return k >= 0 and op.enqueue_ns < ends[k] and op.start_ns - ends[k] <= HANDOFF_S * 1e9

        return {name: [(float(op.nbytes), (op.end_ns - op.start_ns) * 1e-9, queued(op)) for op in runs]
                for name, runs in self.ops.items()}

    def step_done(self) -> Plan | None:
        """Called at the end of every step(); returns the plan once enough steps were measured.

        With the plan it sets ``planning``: the cost model it was made on (as
        ``CostModel.to_dict()``), where that model came from, the profile's bucket count,
        the interference σ measured in these steps (None with ``PIPEDAP_INTERFERENCE=off``),
        ``profiling_steps``: their measured iteration (DeAR's, the slowest rank's median) and what
        the cost models predict for it (:func:`profiling_steps`), ``fit_samples``: the
        (bytes, seconds) per primitive the fit was made from, and ``profile``: the agreed profile
        planned on (``Profile.to_dict()``); the same on every rank.
        """
        now = time.monotonic()
        self.step_seconds.append(now - self.step_started)
        self.step_started = now
        self.records.append(self.current)
        self.current = _Step()
        if len(self.records) == self.warmup and not self.warm:
            self._warm_up()
        if len(self.records) < self.warmup + self.steps:
            return None
        engine.remove_completion_listener(self._on_ops)
        started = time.perf_counter()
        # Everything collective runs on every rank; only the planning itself runs on rank 0.
        sigma = measure.measured_interference(self.process_set)
        profile = measure.with_bucket_cost(self.profile(sigma), self.buckets[0].buffer.device, self.process_set)
        measured = max(comm.allgather_object(self.measured_step_s(), name="online.steps", process_set=self.process_set))
        samples = skew_free_samples(comm.allgather_object(self.queued_runs(), name="online.ops",
                                                          process_set=self.process_set))
        cost, source, steps = self.cost_model(profile, samples, measured, sigma)
        plan = measure.plan_on_rank0(lambda: self._plan(profile, cost), self.process_set)
        self.planning = costmodel.planning_facts(cost, source, len(profile),
                                                 sigma if measure.interference_on() else None)
        # how well the cost models predict the steps they were measured in, and what the fit was made of:
        # a fit that came out wrong can then be told from a plan that did (the bench writes both)
        self.planning["profiling_steps"] = steps
        self.planning["fit_samples"] = samples
        self.planning["profile"] = profile.to_dict()  # to simulate it again offline (Profile.from_dict)
        log.info(
            "pipedap: planned from %d measured steps in %.2f s: %s plan%s predicts %.1f ms per iteration "
            "(DeAR as measured: %.1f ms); switching now",
            self.steps, time.perf_counter() - started, plan.schedule,
            f" (tied embedding split: bucket {', '.join(map(str, plan.split))}"
            f"{'; lookup served from the shards' if plan.defer else ''})" if plan.split else "",
            1e3 * plan.predicted.iteration_time if plan.predicted else float("nan"), 1e3 * measured,
        )
        return plan

    def _warm_up(self) -> None:
        """At the last warm-up step's end: one more warm-up step if a rank faulted in more than heap.WARM_BYTES of
        new memory in it, up to ``max_warmup`` ([Note: warm memory before profiling]). Collective."""
        now = heap.faulted_in_bytes()
        fresh = max(comm.allgather_object(now - self.faulted, name="online.warm", process_set=self.process_set))
        fresh_mb = fresh / 2**20
        self.faulted = now
        if fresh <= heap.WARM_BYTES:
            self.warm = True
            log.info("pipedap: warm-up took %d steps (memory warm: %.1f MB faulted in at most, the last step); "
                     "profiling the next %d", self.warmup, fresh_mb, self.steps)
            return
        self.warmup += 1
        if self.warmup == self.max_warmup:
            self.warm = True
            log.warning("pipedap: after %d warm-up steps a rank still faulted in %.0f MB of new memory in a step; "
                        "profiling after one more (PIPEDAP_PROFILE_WARMUP_MAX=%d): its times may include page faults",
                        self.warmup - 1, fresh_mb, self.max_warmup)

    def measured_step_s(self) -> float:
        """This rank's median iteration under DeAR in the measured steps (the first one after warm-up left out)."""
        return statistics.median(self.step_seconds[self.warmup + 1 :] or self.step_seconds)

    # --- turning records into planner inputs ----------------------------------------

    def profile(self, sigma: float = 0.0) -> Profile:
        """Median per-bucket times over the measured steps, as the planner's Profile (forward order),
        as compute alone would take them under interference `sigma` ([Note: profiles measured beside
        communication]). A bucket's ``u`` is its whole update, the optimizer's per-call part included;
        planning adds the reducer's path of a bucket as ``bucket_cost`` (pipedap.measure.with_bucket_cost)."""
        clean = interference.clean_clock(self.busy, sigma)
        measured = self.records[self.warmup :]
        n = len(self.buckets)
        u: list[list[float]] = [[] for _ in range(n)]
        runs = []  # (tf, tb) of every step that saw a forward and a backward
        for rec in measured:
            for g, (_, _, update) in rec.entered.items():
                u[g].append(update)
            if rec.forward_end is not None and rec.ready:
                spans = {g: (clean(enter), clean(leave)) for g, (enter, leave, _) in rec.entered.items()}
                ready = {g: clean(t) for g, t in rec.ready.items()}
                runs.append(layer_times(n, spans, clean(rec.forward_end), ready))

        def median(values: list[float]) -> float:
            return statistics.median(values) if values else 0.0

        tf = [median([run[0][g] for run in runs]) for g in range(n)]
        tb = [median([run[1][g] for run in runs]) for g in range(n)]
        layers = tuple(
            Layer(name=b.names[0] if len(b.names) == 1 else f"{b.names[0]}..{b.names[-1]}", params=tuple(b.names),
                  nbytes=b.nbytes, tf=tf[b.index], tb=tb[b.index], u=median(u[b.index]))
            for b in self.buckets
        )
        ties = tuple(self._timed(tie, measured, clean) for tie in self.ties())
        return Profile(layers, {"source": "online", "steps": len(measured), "interference": sigma}, ties=ties)

    def _timed(self, tie: Tie, measured: list[_Step], clean: Callable[[float], float]) -> Tie:
        """``tie`` with when its dense pieces were ready against its output layer's bucket ([Note: ties in a
        profile]); as it was where the steps did not time them."""
        g = next(b.index for b in self.buckets if b.names == [tie.param])
        user = tie.user_group([b.names for b in self.buckets])
        steps = [rec for rec in measured if g in rec.pieces and user in rec.ready]
        runs = [(clean(rec.ready[user]) - clean(first), clean(last) - clean(first))
                for rec in steps for first, last, _ in (rec.pieces[g],)]
        return tie.timed(runs, steps[0].pieces[g][2] if steps else tie.pieces)

    def cost_model(self, profile: Profile, samples: dict[str, list[tuple[float, float]]], measured_s: float,
                   sigma: float = 0.0) -> tuple[CostModel, str, dict]:
        """α-β fit of the operations training ran (``samples``: :func:`skew_free_samples`); the
        microbenchmark when their sizes are too alike, or when the fit does not predict the
        measured steps (:func:`checked_fit`). Returns the model, where it came from in words, and
        the steps' predictions (:func:`profiling_steps`).

        Collective: call it on every rank, with the samples, the profile and ``measured_s`` the
        ranks agreed on, so that every rank takes the same branch.
        """
        distinct = min(len({round(m) for m, _ in samples[k]}) for k in samples)
        if distinct < MIN_DISTINCT_SIZES:
            log.info("pipedap: operations that started together on every rank have %d distinct sizes: "
                     "measuring the cost model instead", distinct)
            model = measure.cost_model(process_set=self.process_set)
            predicted = dear_iteration_s(profile, model)
            return model, MICROBENCHMARK, profiling_steps(measured_s, predicted, None, predicted)
        rs, _ = costmodel.fit_line(samples["rs"])
        ag, _ = costmodel.fit_line(samples["ag"])
        # all-reduce is not used by PipeDAP plans; a ring all-reduce is a reduce-scatter then an all-gather
        fitted = CostModel(self.process_set.size(), rs, ag, AlphaBeta(rs.a + ag.a, rs.b + ag.b), interference=sigma)
        chosen, steps = checked_fit(profile, fitted, measured_s, lambda: measure.cost_model(process_set=self.process_set))
        return chosen, FITTED if chosen is fitted else MICROBENCHMARK, steps

    def _plan(self, profile: Profile, cost: CostModel) -> Plan:
        """The plan of the buckets as they are (no fusion: the buffers exist already)."""
        plan = make_plan(profile, cost, planner=PLANNERS[self.planner], fusion="none")
        baseline = make_plan(profile, cost, planner="dear", fusion="none")
        log.info("pipedap: predicted iteration %.1f ms (DeAR %.1f ms, bound %.1f ms)",
                 1e3 * plan.predicted.iteration_time, 1e3 * baseline.predicted.iteration_time,
                 1e3 * plan.predicted.lower_bound)
        return plan


# [Note: profiles measured beside communication]
# Under DeAR the reduce-scatters run beside backward and the all-gathers beside forward, so
# the measured layer times include the slow-down the transfers cause; the simulator charges
# that slow-down itself, for whatever plan it simulates. Left in the profile it would count
# twice (and only where DeAR happened to overlap). So each rank maps its hook timestamps
# through pipedap.interference.clean_clock (time advances at 1/(1 + σ) while one of its
# submissions runs) before turning them into layer times. The updates' measured
# seconds are kept as they are: they are short, and run between transfers.

# [Note: checking the fit against the steps]
# The profiling steps ran DeAR, so the fitted cost model must predict them: simulate DeAR on
# the agreed profile with it and compare with the measured iteration (the slowest rank's
# median). A fit off by more than FIT_TOLERANCE either way has missed something (in the
# issue's sweep a fit predicted 8.28 s for a 4.70 s iteration, and the plan built on it lost
# to the greedy one): the microbenchmark's cost model (cached per host set) is then asked
# too, and whichever predicts the measured steps better is used. The log says which, with
# both predictions, and ``planning["profiling_steps"]`` keeps them. The tolerance was 1.25;
# a BERT-base fit (an all-gather start-up of 111 ms, against 2-18 ms in every other sweep)
# passed it and its plan was predicted at 1.27x its measured time, so it is 1.10: the plans
# must be predicted within 5%, and a model that misses the steps it was fitted on by more
# than 10% will not. Asking the microbenchmark costs nothing once it is cached.


def dear_iteration_s(profile: Profile, cost: CostModel) -> float:
    """The simulated iteration of the DeAR plan the profiling steps ran (it reduces tied embeddings whole)."""
    return make_plan(replace(profile, ties=()), cost, planner="dear", fusion="none").predicted.iteration_time


def checked_fit(profile: Profile, fitted: CostModel, measured_s: float, microbenchmark) -> tuple[CostModel, dict]:
    """``fitted`` if it predicts the measured DeAR iteration within FIT_TOLERANCE, else the better of it
    and ``microbenchmark()`` (see the note above); with what each predicted for the steps
    (:func:`profiling_steps`)."""
    predicted = dear_iteration_s(profile, fitted)
    ratio = predicted / measured_s
    if 1 / FIT_TOLERANCE <= ratio <= FIT_TOLERANCE:
        log.info("pipedap: the cost model fitted from training's operations predicts %.1f ms for the DeAR steps "
                 "measured at %.1f ms (%.2fx): using it", 1e3 * predicted, 1e3 * measured_s, ratio)
        return fitted, profiling_steps(measured_s, predicted, predicted, None)
    other = microbenchmark()
    other_predicted = dear_iteration_s(profile, other)
    better = abs(math.log(other_predicted / measured_s)) < abs(math.log(ratio))
    log.warning("pipedap: the cost model fitted from training's operations predicts %.1f ms for the DeAR steps "
                "measured at %.1f ms (%.2fx, outside %.2f..%.2f); the microbenchmark's predicts %.1f ms (%.2fx): "
                "using the %s", 1e3 * predicted, 1e3 * measured_s, ratio, 1 / FIT_TOLERANCE, FIT_TOLERANCE,
                1e3 * other_predicted, other_predicted / measured_s,
                "microbenchmark's" if better else "fitted one all the same (the microbenchmark's is further off)")
    steps = profiling_steps(measured_s, other_predicted if better else predicted, predicted, other_predicted)
    return (other if better else fitted), steps


def profiling_steps(measured_s: float, predicted_s: float, fitted_s: float | None, microbenchmark_s: float | None) -> dict:
    """``planning["profiling_steps"]``: the DeAR steps as measured (the slowest rank's median), as the
    cost model planned on predicts them, and as the fitted and the microbenchmark's models did
    (None: not made, or not asked)."""
    return {"measured_s": measured_s, "predicted_s": predicted_s, "fitted_predicted_s": fitted_s,
            "microbenchmark_predicted_s": microbenchmark_s}


def skew_free_samples(per_rank: list[dict[str, list[tuple[float, float, bool]]]]) -> dict[str, list[tuple[float, float]]]:
    """(bytes, seconds) per primitive from every rank's operations: one sample per operation, the
    median of its skew-free runs (see the notes above).

    ``per_rank[r][name]`` lists rank r's runs of operation ``name`` as (bytes, seconds,
    queued behind its predecessor), in completion order. Ranks complete the same collectives
    in the same order, so the k-th run of a name is the same collective everywhere; a rank
    that has seen fewer runs lacks only the last ones. A run counts if it was queued on
    every rank; its time is the slowest rank's.
    """
    samples: dict[str, list[tuple[float, float]]] = {"rs": [], "ag": []}
    names = set.intersection(*(set(ops) for ops in per_rank)) if per_rank else set()
    for name in sorted(names):
        runs = [(everywhere[0][0], max(seconds for _, seconds, _ in everywhere))  # one run, as every rank saw it
                for everywhere in zip(*(ops[name] for ops in per_rank)) if all(queued for _, _, queued in everywhere)]
        if runs:
            samples[name.split(".", 1)[0]].append((runs[0][0], statistics.median(seconds for _, seconds in runs)))
    return samples

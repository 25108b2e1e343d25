"""The schedules of docs/scheduling.md §4, each scored by the simulator.

* :func:`wfbp`: all-reduce of G-1 .. 0 as gradients get ready; forward after all of them.
* :func:`bytescheduler`: chunked all-reduce by priority within a credit, grid-tuned.
* :func:`dear`: RS of G-1 .. 0 in backward, AG of 0 .. G-1 in forward.
* :func:`pipedap`: the paper's greedy, moving AGs from the forward phase into backward.
* :func:`optimal`: the exact optimum over the greedy's decision space (DP with dominance
  pruning, seeded with the greedy); :func:`exhaustive` enumerates that space (test oracle).
  Under interference (a cost model with ``interference`` > 0) the DP's best candidates are
  re-timed and polished by local search instead ([Note: planning under interference]).
* :func:`plan_of`: the WFBP or DeAR :class:`Plan` of a grouping without simulation (what
  the runtime runs when it is given no plan); the same submissions as :func:`wfbp` and
  :func:`dear`.

On a ``Problem(..., defer=True)`` ([Note: deferred all-gathers in the timeline] in .simulator)
every decoupled schedule has each deferred group's AG right behind its output layer's group's,
which stays in the forward phase like group 0's (``Problem.fixed_forward``).

The decoupled decision space: the AG of group g >= 1 stays in the forward phase (``"F"``),
runs right behind RS(g) (``"B"``), or is merged into RS(g-1)'s submission (``"M"``); the AG
of group 0 (and of ``fixed_forward`` groups) stays in the forward phase. :func:`decoupled` turns such a choice per
group into submissions.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .plan import Group, Plan, PlanError, Prediction, Submission
from .simulator import Problem, Timeline, simulate, simulate_bytescheduler

FORWARD, BEHIND, MERGED = "F", "B", "M"
# Largest group count the exhaustive oracle accepts: 3**(G-1) simulations.
EXHAUSTIVE_MAX_GROUPS = 12
# [Note: exact planner state budget]
# The DP keeps, per group, the (link free time, forward-chain term) Pareto front of the
# states that can still beat the incumbent. On compute-bound or fast-link profiles that
# front is tiny (1 to a few hundred states) and the result is proven optimal; on link-bound
# ones it reaches thousands of states per step (1,400 at 161 groups, 64 workers, 1 Gb/s)
# with no polynomial bound. So each step keeps at most max_states states, those with the
# best lower bounds (a beam), and the result says proven_optimal = False when the cap
# dropped any; it is then still never worse than the greedy it was seeded with. The default
# cap spends a fixed number of state-steps (STATE_BUDGET / G states per step), so ~400
# groups plan in well under a second. It is a count, not a time limit: every rank gets the
# same plan.
STATE_BUDGET = 800_000
MIN_STATES = 64
# [Note: planning under interference]
# The DP's state (link free time, forward-chain term) is exact only when backward compute
# does not depend on the schedule; with interference ([Note: interference] in .simulator)
# the reduce-scatters slow the backward that makes later ones ready, so the Pareto pruning
# can drop the true optimum. What stays valid: a schedule's plain time is a lower bound of
# its interfered time, so pruning against the (interfered) incumbent drops nothing that
# could win. The planner therefore re-times the DP's INTERFERENCE_CANDIDATES best final
# states under interference, keeps the best, and improves it by local search (one group's
# option changed at a time, while the interfered time drops, at most POLISH_PASSES sweeps).
# The result is never worse than the greedy seed (itself checked under interference) and
# says proven_optimal = False.
INTERFERENCE_CANDIDATES = 16
POLISH_PASSES = 2


@dataclass(frozen=True)
class Schedule:
    """A schedule and its simulated timeline; ``info`` holds planner facts (tunables, proof)."""

    name: str
    timeline: Timeline
    backward: tuple[Submission, ...] = ()
    forward: tuple[Submission, ...] = ()
    sync_before_forward: bool = False
    info: Mapping[str, object] = field(default_factory=dict)
    chunks: Mapping[int, int] = field(default_factory=dict)  # group -> pieces of its all-reduce (Plan.chunks)

    @property
    def iteration_time(self) -> float:
        return self.timeline.iteration_time

    def to_plan(self, inputs_hash: str = "") -> Plan:
        """The runtime-consumable :class:`Plan` of this schedule."""
        if not self.backward:
            raise PlanError(f"{self.name} has no submissions to run; choose wfbp, dear, pipedap, optimal or "
                            "bytescheduler for a plan")
        problem = self.timeline.problem
        groups = tuple(Group(layer.name, layer.params, layer.nbytes) for layer in problem.profile.layers)
        times = self.timeline.plan_times
        return Plan(
            schedule=self.name,
            world_size=problem.cost.world_size,
            groups=groups,
            backward=self.backward,
            forward=self.forward,
            sync_before_forward=self.sync_before_forward,
            predicted=Prediction(self.iteration_time, self.timeline.lower_bound, times),
            inputs_hash=inputs_hash,
            chunks=tuple(self.chunks.items()),
            split=tuple(g for g in problem.split if any(("rs", g) in sub for sub in self.backward)),
            defer=tuple(problem.deferred),
        )


def _make(problem: Problem, name: str, backward: Sequence[Submission], forward: Sequence[Submission] = (),
          sync: bool = False, **info: object) -> Schedule:
    backward, forward = tuple(backward), _place_deferred(problem, forward)
    return Schedule(name, simulate(problem, backward, forward, sync), backward, forward, sync, info)


def _place_deferred(problem: Problem, forward: Sequence[Submission]) -> tuple[Submission, ...]:
    """`forward` with each deferred group's AG moved, in a submission of its own, right behind the submission
    of its output layer's group's AG."""
    subs = [list(sub) for sub in forward]
    for g, user in problem.deferred.items():
        holding = next((sub for sub in subs if ("ag", g) in sub), None)
        at = next((i for i, sub in enumerate(subs) if ("ag", user) in sub), None)
        if holding is not None and at is not None:
            holding.remove(("ag", g))
            subs.insert(at + 1, [("ag", g)])
    return tuple(tuple(sub) for sub in subs if sub)


def wfbp(problem: Problem) -> Schedule:
    """Horovod/DDP: AR of each group when ready; ``step()`` waits for all before forward."""
    return _make(problem, "wfbp", _all_reduced(problem.size), sync=True)


def _all_reduced(size: int) -> list[Submission]:
    """WFBP's backward submissions: AR of G-1 .. 0."""
    return [(("ar", g),) for g in reversed(range(size))]


def dear(problem: Problem) -> Schedule:
    """DeAR: every RS in backward, every AG in the next forward."""
    return from_options(problem, "dear", [FORWARD] * problem.size)


def decoupled(options: Sequence[str]) -> tuple[list[Submission], list[Submission]]:
    """Backward and forward submissions for one choice (F/B/M) per group."""
    if options and options[0] != FORWARD:
        raise ValueError("the AG of group 0 must stay in the forward phase (option 'F')")
    backward: list[Submission] = []
    for g in reversed(range(len(options))):
        if g + 1 < len(options) and options[g + 1] == MERGED:
            backward.append((("rs", g), ("ag", g + 1)))
        else:
            backward.append((("rs", g),))
        if options[g] == BEHIND:
            backward.append((("ag", g),))
    forward = [(("ag", g),) for g, option in enumerate(options) if option == FORWARD]
    return backward, forward


def plan_of(name: str, groups: Sequence[Group], world: int) -> Plan:
    """The built-in ``"wfbp"`` or ``"dear"`` plan of `groups` (forward order), not simulated.

    Its submissions are those of :func:`wfbp` / :func:`dear` (the same code makes them), but
    it needs no profile or cost model, so it has no prediction.
    """
    groups = tuple(groups)
    if name == "wfbp":
        return Plan("wfbp", world, groups, tuple(_all_reduced(len(groups))), (), sync_before_forward=True)
    if name == "dear":
        backward, forward = decoupled([FORWARD] * len(groups))
        return Plan("dear", world, groups, tuple(backward), tuple(forward))
    raise ValueError(f"no built-in plan for schedule {name!r} (only 'wfbp' and 'dear'); "
                     "plan it from a profile, or pass plan= for 'pipedap'")


def from_options(problem: Problem, name: str, options: Sequence[str], **info: object) -> Schedule:
    """The decoupled schedule of `options` (one of F/B/M per group), simulated."""
    moved = [g for g in sorted(problem.fixed_forward) if g < len(options) and options[g] != FORWARD]
    if moved:
        raise ValueError(f"the AG of group {moved[0]} must stay in the forward phase (option 'F'): group 0's always, "
                         "and under deferral its output layer's group's")
    backward, forward = decoupled(options)
    return _make(problem, name, backward, forward, options="".join(options), **info)


def bytescheduler(
    problem: Problem,
    partitions: Sequence[int] = tuple(4**k * 65536 for k in range(6)),
    credits: Sequence[int] = (1, 2, 4),
) -> Schedule:
    """ByteScheduler-style schedule, tuned over partition sizes and credits (in partitions).

    [Note: ByteScheduler as a plan]
    The runtime runs the simulated commit order as a plan: each piece of an all-reduce is
    one ``ar`` submission (``Plan.chunks`` says how many pieces a group has), issued once
    its group's gradients are ready and every earlier piece was issued, as for any plan.
    ByteScheduler proper decides the order at run time from a priority queue; here ranks
    match collectives by order, so each rank would have to agree with the others on every
    choice. The order is the one that queue takes when the layers finish as profiled;
    when they finish later than that, a rank waits for the next piece's layer where the
    queue would have sent another piece.
    """
    if not partitions or not credits:
        raise ValueError("bytescheduler needs at least one partition size and one credit")
    tried = []
    for partition, credit in itertools.product(partitions, credits):
        timeline = simulate_bytescheduler(problem, partition, credit * partition)
        pieces: dict[int, int] = {}
        for sub in timeline.submissions:
            pieces[sub[0][1]] = pieces.get(sub[0][1], 0) + 1
        tried.append(Schedule("bytescheduler", timeline, timeline.submissions, (), False,
                              {"partition": partition, "credit": credit * partition},
                              {g: n for g, n in sorted(pieces.items()) if n > 1}))
    return min(tried, key=lambda schedule: schedule.iteration_time)


def pipedap(problem: Problem, check: bool = True) -> Schedule:
    """The PipeDAP greedy (docs/scheduling.md §4), starting from DeAR, n = 1 .. G-1.

    With the current timeline, ``S_bc`` is the idle link time right after RS(n) and
    ``S_fc`` the time the forward-phase AG chain holds the forward back from group n on
    (the compute stream's waits at groups n .. G-1). With ``a`` the start-up one merge
    saves: if ``S_bc > a`` and ``S_bc + S_fc + a > T_ag(n)``, AG(n) moves behind RS(n);
    otherwise, if ``S_bc + S_fc + 2a > T_ag(n)`` (``a`` when n-1 = 0), AG(n) is merged into
    RS(n-1)'s submission. After each move the timeline and slacks are recomputed.

    [Note: checked moves]
    The slack test is a local estimate: a move it accepts can lengthen the iteration (the
    delay pushed onto later RSs is not bounded by the slack). With ``check`` (the default)
    a move is kept only if the simulated iteration time does not grow, which makes the
    greedy never worse than DeAR; ``check=False`` is the paper's rule alone.
    """
    size = problem.size
    options = [FORWARD] * size
    current = _evaluate(problem, options)
    a = problem.merge_saving
    moves = 0
    for n in range(1, size):
        if n in problem.fixed_forward:
            continue
        iteration, rs_start, rs_end, forward_end = current
        s_bc = rs_start[n - 1] - rs_end[n]
        s_fc = iteration - forward_end[n - 1] - problem.tail[n]
        t_ag = problem.costs["ag"][n]
        if s_bc > a and s_bc + s_fc + a > t_ag:
            options[n] = BEHIND
        elif s_bc + s_fc + (2 * a if n - 1 > 0 else a) > t_ag:
            options[n] = MERGED
        else:
            continue
        trial = _evaluate(problem, options)
        if check and trial[0] > iteration:
            options[n] = FORWARD
            continue
        current = trial
        moves += 1
    return from_options(problem, "pipedap", options, moves=moves, checked=check)


def _evaluate(problem: Problem, options: Sequence[str]) -> tuple[float, list[float], list[float], list[float]]:
    """The simulator's timeline of a decoupled schedule, computed directly from `options`.

    Returns (iteration time, start and end of each group's RS submission, end of each
    group's forward). Equal to ``simulate(problem, *decoupled(options))`` (a test checks
    it) but several times faster, which keeps the greedy within the planning-time budget.
    Under interference the two streams depend on each other, and the simulator itself answers.
    """
    if problem.interference:
        tl = from_options(problem, "options", options).timeline
        rs_ops = [("rs", g) for g in range(problem.size)]
        return (tl.iteration_time, [tl.start_of[op] for op in rs_ops], [tl.end_of[op] for op in rs_ops],
                list(tl.forward_ends))
    size, rs, ag, ready = problem.size, problem.costs["rs"], problem.costs["ag"], problem.ready
    save = problem.merge_saving
    rs_start, rs_end, done = [0.0] * size, [0.0] * size, [0.0] * size
    t = 0.0
    for g in reversed(range(size)):
        t = problem.run_dense_parts(t, g)  # [Note: split reductions in the timeline]
        start = t if t > ready[g] else ready[g]
        if g + 1 < size and options[g + 1] == MERGED:
            t = start + rs[g] + ag[g + 1] - save
            done[g + 1] = t
        else:
            t = start + rs[g]
        rs_start[g], rs_end[g] = start, t
        if options[g] == BEHIND:
            t += ag[g]
            done[g] = t
    t = problem.run_dense_parts(t, -1)
    deferred_done = {}
    for g in range(size):
        if options[g] == FORWARD:  # (a deferred group: its fetch; its output layer's: both all-gathers)
            t += problem.chain_ag[g]
            done[g] = t
            if g in problem.output_rest:  # (its deferred AG went last)
                tied = problem.output_rest[g][0]
                done[g] -= ag[tied]
                deferred_done[tied] = t
    forward_end = [0.0] * size
    t = problem.backward_end
    for g in range(size):
        t = problem.forward_end(g, t if t > done[g] else done[g], deferred_done.get)
        forward_end[g] = t
    return t, rs_start, rs_end, forward_end


def exhaustive(problem: Problem) -> Schedule:
    """The best decoupled schedule by enumerating all 3**(G-1) choices (a test oracle)."""
    if problem.size > EXHAUSTIVE_MAX_GROUPS:
        raise ValueError(
            f"exhaustive search over {problem.size} groups is 3**{problem.size - 1} simulations; "
            f"use optimal() above {EXHAUSTIVE_MAX_GROUPS} groups"
        )
    every = (
        from_options(problem, "exhaustive", options)
        for options in itertools.product(*([FORWARD] if g in problem.fixed_forward else [FORWARD, BEHIND, MERGED]
                                           for g in range(problem.size)))
    )
    return min(every, key=lambda schedule: schedule.iteration_time)


def optimal(problem: Problem, max_states: int | None = None, seed: Schedule | None = None) -> Schedule:
    """The exact optimum of the decoupled decision space, never worse than `seed` (the greedy).

    [Note: the DP]
    Let L be when the link finishes the backward list and, with the forward-phase AGs
    running back to back from L in group order, ``Z = max over forward g of (their AG costs
    up to g) + tail[g]`` (tail[g]: forward compute from the update of g on). Then the
    iteration time is exactly ``L + Z``: forward group g ends at ``max(done[g] + tail[g])``
    over g (and the compute bound), and since AG(0) always runs in the forward phase,
    ``Z >= T_ag(0) + tail[0]`` dominates both the compute bound and every AG issued in
    backward (done[g] <= L, tail[g] <= tail[0]). Walking g = G-1 .. 0, Z updates as
    ``Z = max(Z, tail[g]) + T_ag(g)`` when AG(g) stays in forward (``Problem.chain_step``: under
    deferral group 0's AG is its fetch, and its output layer's group's AG is followed by the deferred one,
    which its forward's rest waits for). A state is therefore
    (t = link free time, Z, AG(g) pending a merge into RS(g-1)); transitions are monotone
    in t and Z, so among states with the same pending flag only the (t, Z) Pareto front
    matters, and a state whose lower bound cannot beat the incumbent is dropped.
    """
    seed = seed or pipedap(problem)
    max_states = max_states or max(MIN_STATES, STATE_BUDGET // problem.size)
    incumbent = seed.iteration_time
    cutoff = incumbent - 1e-12 * incumbent
    size, rs, ag, ready, tail = problem.size, problem.costs["rs"], problem.costs["ag"], problem.ready, problem.tail
    chain, fixed, save = problem.chain_ag, problem.fixed_forward, problem.merge_saving
    # Over groups 0 .. h: prefix[h] sums the RS costs; link_floor[h] is a time before which
    # the link cannot finish RS(h) .. RS(0), whatever came earlier; ag_floor[h] sums the
    # least each AG of 1 .. h adds to the link or to the forward chain (cost minus a merge).
    prefix, link_floor, ag_floor = [0.0] * size, [0.0] * size, [0.0] * size
    for h in range(size):
        prefix[h] = (prefix[h - 1] if h else 0.0) + rs[h]
        link_floor[h] = max(link_floor[h - 1] if h else 0.0, ready[h] + prefix[h])
        ag_floor[h] = (ag_floor[h - 1] + (chain[h] if h in fixed else min(chain[h], ag[h] - save))) if h else 0.0

    # States as parallel arrays: link free time t, forward term Z, pending merge flag.
    t, z, pending = np.zeros(1), np.full(1, -np.inf), np.zeros(1, dtype=bool)
    history: list[tuple[np.ndarray, np.ndarray]] = []  # per step: parent index, option code
    codes = np.array([FORWARD, BEHIND, MERGED])
    proven, peak = True, 1
    for g in reversed(range(size)):
        t = problem.run_dense_parts(t, g)  # [Note: split reductions in the timeline]
        end = np.maximum(t, ready[g]) + rs[g]
        if g + 1 < size:
            end += np.where(pending, ag[g + 1] - save, 0.0)
        n = len(t)
        choices = 1 if g in fixed else 3  # group 0's AG stays in forward (and a deferred one's output layer's)
        child_t = np.concatenate([end, end + ag[g], end][:choices])
        child_z = np.concatenate([problem.chain_step(z, g), z, z][:choices])
        child_pending = np.repeat(np.array([False, False, True])[:choices], n)
        parent = np.tile(np.arange(n), choices)
        option = np.repeat(np.arange(choices), n)
        bound = _lower_bound(child_t, child_z, child_pending, g, (link_floor, prefix, ag_floor, ag, chain, tail, save))
        keep = _pareto(child_t, child_z, child_pending) & (bound < cutoff)
        kept = np.flatnonzero(keep)
        capped = len(kept) > max_states
        if capped:
            kept = kept[np.argsort(bound[kept], kind="stable")[:max_states]]
        proven = proven and not capped
        peak = max(peak, len(kept))
        t, z, pending = child_t[kept], child_z[kept], child_pending[kept]
        history.append((parent[kept], option[kept]))
    t = problem.run_dense_parts(t, -1)

    info = {"proven_optimal": proven and not problem.interference, "peak_states": peak, "seeded_with": seed.name}
    if not len(t):  # nothing can beat the seed: it is optimal (or the cap cut the better ones)
        return _renamed(seed, "optimal", info)

    def options_of(state: int) -> list[str]:
        options = [FORWARD] * size
        for g, (parents, chosen) in zip(range(size), reversed(history)):
            options[g] = str(codes[chosen[state]])
            state = int(parents[state])
        return options

    order = np.argsort(t + z, kind="stable")
    info["dp_iteration_time"] = float(t[order[0]] + z[order[0]])
    if problem.interference:  # [Note: planning under interference]
        retimed = [from_options(problem, "optimal", options_of(int(i))) for i in order[:INTERFERENCE_CANDIDATES]]
        options = _polish(problem, min(retimed, key=lambda s: s.iteration_time).info["options"])
        info["interference"] = f"best of {len(retimed)} DP candidates re-timed, then local search"
    else:
        options = options_of(int(order[0]))
    schedule = from_options(problem, "optimal", options, **info)
    return schedule if schedule.iteration_time < incumbent else _renamed(seed, "optimal", info)


def _polish(problem: Problem, options: str) -> list[str]:
    """Local search: change one group's option at a time while the (interfered) iteration time drops."""
    best, current = list(options), _evaluate(problem, options)[0]
    for _ in range(POLISH_PASSES):
        improved = False
        for g in range(1, problem.size):
            if g in problem.fixed_forward:
                continue
            for option in (FORWARD, BEHIND, MERGED):
                if option == best[g]:
                    continue
                trial = [*best[:g], option, *best[g + 1:]]
                time = _evaluate(problem, trial)[0]
                if time < current:
                    best, current, improved = trial, time, True
        if not improved:
            break
    return best


def _pareto(t: np.ndarray, z: np.ndarray, pending: np.ndarray) -> np.ndarray:
    """Mask of the states on the (t, Z) Pareto front of their pending flag (first of equals)."""
    order = np.lexsort((z, t, pending))  # by flag, then t, then Z
    zs = z[order]
    keep = np.zeros(len(t), dtype=bool)
    split = int(np.searchsorted(pending[order], True))
    for lo, hi in ((0, split), (split, len(order))):
        block = zs[lo:hi]
        if len(block):
            earlier = np.concatenate([[np.inf], np.minimum.accumulate(block)[:-1]])
            keep[order[lo:hi]] = block < earlier  # Z beats every state with smaller or equal t
    return keep


def _lower_bound(t: np.ndarray, z: np.ndarray, pending: np.ndarray, g: int, floors: tuple) -> np.ndarray:
    """A bound below the iteration time of any completion of each state (after group g).

    Every remaining RS and, at least net of a merge, every remaining AG lands either on the
    link before its end L or on the forward chain Z; the iteration is L + Z.
    """
    link_floor, prefix, ag_floor, ag, chain, tail, save = floors
    if g == 0:
        return t + z
    head = t + prefix[g - 1] + np.where(pending, ag[g] - save, 0.0)
    link_end = np.maximum(head, link_floor[g - 1])
    return np.maximum(link_end + np.maximum(z, tail[0]) + chain[0], head + ag_floor[g - 1] + z + chain[0])


def _renamed(schedule: Schedule, name: str, info: Mapping[str, object]) -> Schedule:
    return Schedule(name, schedule.timeline, schedule.backward, schedule.forward,
                    schedule.sync_before_forward, {**schedule.info, **info}, schedule.chunks)

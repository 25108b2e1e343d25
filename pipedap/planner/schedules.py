"""The schedules of SCHEDULING.md §4, each scored by the simulator.

* :func:`wfbp`: all-reduce of G-1 .. 0 as gradients get ready; forward after all of them.
* :func:`bytescheduler`: chunked all-reduce by priority within a credit, grid-tuned.
* :func:`dear`: RS of G-1 .. 0 in backward, AG of 0 .. G-1 in forward.
* :func:`pipedap`: the paper's greedy, moving AGs from the forward phase into backward.
* :func:`optimal`: the exact optimum over the greedy's decision space (DP with dominance
  pruning, seeded with the greedy); :func:`exhaustive` enumerates that space (test oracle).

The decoupled decision space: the AG of group g >= 1 stays in the forward phase (``"F"``),
runs right behind RS(g) (``"B"``), or is merged into RS(g-1)'s submission (``"M"``); the AG
of group 0 stays first in the forward phase. :func:`decoupled` turns such a choice per
group into submissions.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .plan import Group, Plan, PlanError, Prediction, Submission
from .simulator import Problem, Timeline, simulate, simulate_bytescheduler

FORWARD, BEHIND, MERGED = "F", "B", "M"
# Largest group count the exhaustive oracle accepts: 3**(G-1) simulations.
EXHAUSTIVE_MAX_GROUPS = 12
# [Note: exact planner state budget]
# The DP keeps, per group, the Pareto-optimal (link free time, forward-chain term, deadline
# term) states that can still beat the incumbent. On compute-bound or fast-link profiles
# that set is tiny (1 to a few hundred states) and the result is proven optimal; on
# link-bound ones it can reach ~17,000 states per step at 161 groups, with no polynomial
# bound. So each step keeps at most max_states states, those with the best lower bounds
# (a beam), and the result says proven_optimal = False when the cap dropped any; it is
# then still never worse than the greedy it was seeded with. The default cap spends a
# fixed number of state-steps (STATE_BUDGET / G states per step), so ~400 groups plan in
# well under a second. It is a count, not a time limit, so every rank gets the same plan.
STATE_BUDGET = 60_000
MIN_STATES = 64


@dataclass(frozen=True)
class Schedule:
    """A schedule and its simulated timeline; ``info`` holds planner facts (tunables, proof)."""

    name: str
    timeline: Timeline
    backward: tuple[Submission, ...] = ()
    forward: tuple[Submission, ...] = ()
    sync_before_forward: bool = False
    info: Mapping[str, object] = field(default_factory=dict)

    @property
    def iteration_time(self) -> float:
        return self.timeline.iteration_time

    def to_plan(self, inputs_hash: str = "") -> Plan:
        """The runtime-consumable :class:`Plan` of this schedule."""
        if not self.backward:
            raise PlanError(
                f"{self.name} is a dynamic chunked policy, simulated for comparison only; "
                f"choose wfbp, dear, pipedap or optimal for a plan"
            )
        problem = self.timeline.problem
        groups = tuple(Group(layer.name, layer.params, layer.nbytes) for layer in problem.profile.layers)
        times = tuple(zip(self.timeline.starts, self.timeline.ends))
        return Plan(
            schedule=self.name,
            world_size=problem.cost.world_size,
            groups=groups,
            backward=self.backward,
            forward=self.forward,
            sync_before_forward=self.sync_before_forward,
            predicted=Prediction(self.iteration_time, self.timeline.lower_bound, times),
            inputs_hash=inputs_hash,
        )


def _make(problem: Problem, name: str, backward: Sequence[Submission], forward: Sequence[Submission] = (),
          sync: bool = False, **info: object) -> Schedule:
    backward, forward = tuple(backward), tuple(forward)
    return Schedule(name, simulate(problem, backward, forward, sync), backward, forward, sync, info)


def wfbp(problem: Problem) -> Schedule:
    """Horovod/DDP: AR of each group when ready; ``step()`` waits for all before forward."""
    return _make(problem, "wfbp", [(("ar", g),) for g in reversed(range(problem.size))], sync=True)


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


def from_options(problem: Problem, name: str, options: Sequence[str], **info: object) -> Schedule:
    """The decoupled schedule of `options` (one of F/B/M per group), simulated."""
    backward, forward = decoupled(options)
    return _make(problem, name, backward, forward, options="".join(options), **info)


def bytescheduler(
    problem: Problem,
    partitions: Sequence[int] = tuple(4**k * 65536 for k in range(6)),
    credits: Sequence[int] = (1, 2, 4),
) -> Schedule:
    """ByteScheduler-style schedule, tuned over partition sizes and credits (in partitions)."""
    best = None
    for partition, credit in itertools.product(partitions, credits):
        timeline = simulate_bytescheduler(problem, partition, credit * partition)
        if best is None or timeline.iteration_time < best.iteration_time:
            best = Schedule("bytescheduler", timeline, info={"partition": partition, "credit": credit * partition})
    assert best is not None, "bytescheduler needs at least one partition and credit"
    return best


def pipedap(problem: Problem, check: bool = True) -> Schedule:
    """The PipeDAP greedy (SCHEDULING.md §4), starting from DeAR, n = 1 .. G-1.

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
    """
    size, rs, ag, ready, w = problem.size, problem.costs["rs"], problem.costs["ag"], problem.ready, problem.w
    save = problem.merge_saving
    rs_start, rs_end, done = [0.0] * size, [0.0] * size, [0.0] * size
    t = 0.0
    for g in reversed(range(size)):
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
    for g in range(size):
        if options[g] == FORWARD:
            t += ag[g]
            done[g] = t
    forward_end = [0.0] * size
    t = problem.backward_end
    for g in range(size):
        t = (t if t > done[g] else done[g]) + w[g]
        forward_end[g] = t
    return t, rs_start, rs_end, forward_end


def exhaustive(problem: Problem) -> Schedule:
    """The best decoupled schedule by enumerating all 3**(G-1) choices (a test oracle)."""
    if problem.size > EXHAUSTIVE_MAX_GROUPS:
        raise ValueError(
            f"exhaustive search over {problem.size} groups is 3**{problem.size - 1} simulations; "
            f"use optimal() above {EXHAUSTIVE_MAX_GROUPS} groups"
        )
    best = None
    for rest in itertools.product((FORWARD, BEHIND, MERGED), repeat=problem.size - 1):
        schedule = from_options(problem, "exhaustive", (FORWARD, *rest))
        if best is None or schedule.iteration_time < best.iteration_time:
            best = schedule
    assert best is not None
    return best


def optimal(problem: Problem, max_states: int | None = None, seed: Schedule | None = None) -> Schedule:
    """The exact optimum of the decoupled decision space, never worse than `seed` (the greedy).

    [Note: the DP]
    Groups are decided in backward order g = G-1 .. 0. The iteration time is
    ``max(compute, D, L + Z)`` where L is when the link finishes the backward list, D the
    latest ``done[g] + tail[g]`` over AGs issued in backward (tail[g]: forward compute from
    group g on), and Z the forward-phase term: with the forward AGs running back to back
    from L in group order, ``max over forward g of (sum of their AG costs up to g) +
    tail[g]``. Walking g downwards, Z updates as ``Z = max(Z, tail[g]) + T_ag(g)`` when AG(g)
    stays in forward. So a state is (t = link free time, Z, D, AG(g) pending a merge into
    RS(g-1)); every transition is monotone in (t, Z, D), hence a state that is no better in
    all three than another with the same pending flag can be dropped, and so can a state
    whose lower bound cannot beat the incumbent.
    """
    seed = seed or pipedap(problem)
    max_states = max_states or max(MIN_STATES, STATE_BUDGET // problem.size)
    incumbent = seed.iteration_time
    cutoff = incumbent - 1e-12 * incumbent
    size, rs, ag, ready, tail = problem.size, problem.costs["rs"], problem.costs["ag"], problem.ready, problem.tail
    save = problem.merge_saving
    # Over groups 0 .. h: prefix[h] sums the RS costs; link_floor[h] is a time before which
    # the link cannot finish RS(h) .. RS(0), whatever came earlier; ag_floor[h] sums the
    # least each AG of 1 .. h adds to the link or to the forward chain (cost minus a merge).
    prefix, link_floor, ag_floor = [0.0] * size, [0.0] * size, [0.0] * size
    for h in range(size):
        prefix[h] = (prefix[h - 1] if h else 0.0) + rs[h]
        link_floor[h] = max(link_floor[h - 1] if h else 0.0, ready[h] + prefix[h])
        ag_floor[h] = (ag_floor[h - 1] + ag[h] - save) if h else 0.0

    # A state: (t, Z, D, pending, parent index, option); D starts at the global bound.
    states = [(0.0, -math.inf, problem.lower_bound(), False, -1, "")]
    history: list[list[tuple]] = []
    proven, peak = True, 1
    for g in reversed(range(size)):
        grown = []
        for index, (t, z, d, pending, _, _) in enumerate(states):
            start = t if t > ready[g] else ready[g]
            if pending:
                end = start + rs[g] + ag[g + 1] - save
                d = max(d, end + tail[g + 1])
            else:
                end = start + rs[g]
            grown.append((end, max(z, tail[g]) + ag[g], d, False, index, FORWARD))
            if g:
                behind = end + ag[g]
                grown.append((behind, z, max(d, behind + tail[g]), False, index, BEHIND))
                grown.append((end, z, d, True, index, MERGED))
        states, capped = _prune(grown, g, cutoff, max_states, (link_floor, prefix, ag_floor, ag, tail, save))
        proven = proven and not capped
        peak = max(peak, len(states))
        history.append(states)

    info = {"proven_optimal": proven, "peak_states": peak, "seeded_with": seed.name}
    if not states:  # nothing can beat the seed: it is optimal (or the cap cut the better ones)
        return _renamed(seed, "optimal", info)
    best = min(range(len(states)), key=lambda i: max(problem.compute_bound(), states[i][2], states[i][0] + states[i][1]))
    options = [FORWARD] * size
    for g, layer in zip(range(size), reversed(history)):
        options[g] = layer[best][5]
        best = layer[best][4]
    schedule = from_options(problem, "optimal", options, **info)
    return schedule if schedule.iteration_time < incumbent else _renamed(seed, "optimal", info)


def _renamed(schedule: Schedule, name: str, info: Mapping[str, object]) -> Schedule:
    return Schedule(name, schedule.timeline, schedule.backward, schedule.forward,
                    schedule.sync_before_forward, {**schedule.info, **info})


def _prune(states: list[tuple], g: int, cutoff: float, max_states: int, floors: tuple) -> tuple[list[tuple], bool]:
    """Drop states that cannot beat `cutoff` or are dominated; cap the rest at `max_states`.

    `floors` are the per-group sums that :func:`optimal` precomputes for the lower bound.
    Returns the kept states and whether the cap removed any.
    """
    link_floor, prefix, ag_floor, ag, tail, save = floors

    def lower_bound(state: tuple) -> float:
        # Every remaining RS and, at least net of a merge, every remaining AG lands either on
        # the link before its end L or on the forward chain Z; the iteration is >= L + Z.
        t, z, d, pending = state[:4]
        if g == 0:
            return max(d, t + z)
        chain = t + prefix[g - 1] + (ag[g] - save if pending else 0.0)
        link_end = max(chain, link_floor[g - 1])
        return max(d, link_end + max(z, tail[0]) + ag[0], chain + ag_floor[g - 1] + z + ag[0])

    bounded = [(lower_bound(s), s) for s in states]
    kept: list[tuple[float, tuple]] = []
    for pending in (False, True):
        zs: list[float] = []  # 2-D Pareto staircase of (Z, D) over states with smaller t
        ds: list[float] = []
        candidates = sorted((s for s in bounded if s[1][3] is pending and s[0] < cutoff), key=lambda bs: bs[1][:3])
        for bound, state in candidates:
            z, d = state[1], state[2]
            i = bisect.bisect_right(zs, z) - 1
            if i >= 0 and ds[i] <= d:
                continue
            j = bisect.bisect_left(zs, z)
            k = j
            while k < len(zs) and ds[k] >= d:
                k += 1
            zs[j:k], ds[j:k] = [z], [d]
            kept.append((bound, state))
    capped = len(kept) > max_states
    if capped:
        kept = sorted(kept, key=lambda pair: pair[0])[:max_states]
    return [s for _, s in kept], capped

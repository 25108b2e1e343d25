"""The timeline model of docs/scheduling.md §3: one compute stream, one link, plan order.

Backward runs groups G-1 .. 0 from t = 0, so the gradients of g are ready at
``ready[g] = tb[G-1] + ... + tb[g]``. The link runs one submission at a time in plan order
(backward list, then forward list); a submission starts when the previous one ended and
all its inputs are ready (RS/AR of g: ``ready[g]``; AG of g: end of RS of g). A merged
submission pays one start-up (the largest of its ops'). Forward starts when backward ends;
group g waits for its AG (or AR) to end, applies its update (``u[g]``), then computes
(``tf[g]``). The iteration time is the end of the forward of G-1.

[Note: update on the compute stream]
The update of g runs in the forward pre-hook of g, on the compute stream, so it cannot
overlap the forward of g-1: ``fstart[g] = max(fend[g-1], done[g]) + u[g]``. With
``sync_before_forward`` (WFBP) every group waits for the last collective instead.
Forward-phase submissions are handed over at ``step()``, after backward; that never
delays them, because they follow RS(0) in plan order, which needs all of backward.

[Note: sharded updates in the timeline]
With ``shard_update`` (Problem(..., shard_update=True); plans of ``Plan.sharded()`` form,
every AG in the forward phase) the update of g runs in ``step()``, before AG(g) is
issued, in the order of the forward submissions: ``uend[g] = max(uend[previous], end of
RS(g)) + u[g]``, and AG(g) cannot start before ``uend[g]``. The forward then waits for
the last update and for AG(g) only (``w[g] = tf[g]``). ``u`` is the update of this
rank's shard (a measured sharded profile; :func:`pipedap.planner.make_plan` divides a
whole-bucket profile's ``u`` by the world size).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .costmodel import CostModel
from .plan import Op, Submission
from .profile import Profile


class Problem:
    """Per-group inputs precomputed for fast simulation (groups in forward order)."""

    def __init__(self, profile: Profile, cost: CostModel, shard_update: bool = False) -> None:
        layers = profile.layers
        self.profile = profile
        self.cost = cost
        self.shard_update = shard_update
        self.size = len(layers)
        self.nbytes = [layer.nbytes for layer in layers]
        self.tb = [layer.tb for layer in layers]
        self.u = [layer.u for layer in layers]
        # w[g]: compute the forward spends on g (update, then forward; sharded: the forward only).
        self.w = [layer.tf if shard_update else layer.u + layer.tf for layer in layers]
        self.step_updates = sum(self.u) if shard_update else 0.0  # compute in step() (sharded updates)
        self.costs = {kind: [cost.of(kind).time(m) for m in self.nbytes] for kind in ("rs", "ag", "ar")}
        self.startup = {kind: cost.of(kind).a for kind in ("rs", "ag", "ar")}
        # What merging an AG into an RS submission saves: the smaller of the two start-ups.
        self.merge_saving = min(self.startup["rs"], self.startup["ag"])
        self.ready = [0.0] * self.size
        t = 0.0
        for g in reversed(range(self.size)):
            t += self.tb[g]
            self.ready[g] = t
        self.backward_end = t
        # tail[g]: forward compute from the update of g to the end of the iteration.
        self.tail = [0.0] * (self.size + 1)
        for g in reversed(range(self.size)):
            self.tail[g] = self.tail[g + 1] + self.w[g]

    def submission_cost(self, sub: Submission) -> float:
        """Link time of one submission: the sum of its ops, with one start-up for all."""
        total = sum(self.costs[kind][g] for kind, g in sub)
        if len(sub) > 1:
            startups = [self.startup[kind] for kind, _ in sub]
            total -= sum(startups) - max(startups)
        return total

    def compute_bound(self) -> float:
        """Backward plus update plus forward: no schedule can beat the compute alone."""
        return self.backward_end + self.step_updates + self.tail[0]

    def update_ends(self, subs: Sequence[Submission], end_of: dict[Op, float]) -> dict[int, float]:
        """Sharded: when the update of each group ends in ``step()`` ([Note: sharded updates in the timeline])."""
        ends, t = {}, self.backward_end
        for sub in subs:
            for kind, g in sub:
                if kind == "ag":
                    t = max(t, end_of[("rs", g)]) + self.u[g]
                    ends[g] = t
        return ends

    def lower_bound(self) -> float:
        """A bound below every schedule the planner considers (any fusion held fixed).

        The link must carry every group once, either as AR or as RS+AG with at most G-1
        merges (each saving one start-up); it cannot start before the gradients of G-1
        exist, and after the last collective at least the forward of G-1 remains.
        """
        decoupled = sum(self.costs["rs"]) + sum(self.costs["ag"]) - self.merge_saving * (self.size - 1)
        link = min(sum(self.costs["ar"]), decoupled)
        head, tail = self.tb[-1], self.w[-1]
        return max(self.compute_bound(), head + link + tail)


@dataclass(frozen=True)
class LinkSpan:
    """One submission on the link."""

    ops: Submission
    start: float
    end: float
    label: str


@dataclass(frozen=True)
class Timeline:
    """The simulated iteration: link submissions in plan order, forward timings per group."""

    problem: Problem
    submissions: tuple[Submission, ...]  # in link order
    starts: tuple[float, ...]  # of each submission
    ends: tuple[float, ...]
    start_of: dict[Op, float]  # start and end of the submission holding each op
    end_of: dict[Op, float]
    forward_start: tuple[float, ...]  # update start of group g (forward waits until here)
    iteration_time: float
    lower_bound: float  # for this plan: compute, or head + link busy + tail
    labels: tuple[str, ...] = ()  # optional names of the submissions (chunked schedules)
    update_end: dict[int, float] = field(default_factory=dict)  # sharded: when each update in step() ends

    @property
    def link(self) -> tuple[LinkSpan, ...]:
        """The submissions with their times and labels, in link order."""
        labels = self.labels or tuple(label(sub) for sub in self.submissions)
        return tuple(map(LinkSpan, self.submissions, self.starts, self.ends, labels))

    @property
    def link_busy(self) -> float:
        """Total time the link is transferring."""
        return sum(self.ends) - sum(self.starts)

    def forward_end(self, g: int) -> float:
        """When the forward of group g ends (the backward end for g = -1)."""
        return self.problem.backward_end if g < 0 else self.forward_start[g] + self.problem.w[g]

    def compute_spans(self) -> list[tuple[str, float, float]]:
        """(label, start, end) of every block on the compute stream, for Gantt charts."""
        p = self.problem
        spans = [(f"B{g}", p.ready[g] - p.tb[g], p.ready[g]) for g in reversed(range(p.size))]
        for g, end in self.update_end.items():  # sharded: the updates run in step(), before the forward
            spans.append((f"U{g}", end - p.u[g], end))
        for g in range(p.size):
            u = 0.0 if p.shard_update else p.u[g]
            if u > 0:
                spans.append((f"U{g}", self.forward_start[g], self.forward_start[g] + u))
            spans.append((f"F{g}", self.forward_start[g] + u, self.forward_start[g] + p.w[g]))
        return spans


def label(sub: Submission) -> str:
    """A short name for a submission: "RS4", or "RS4+AG5" when merged."""
    return "+".join(f"{kind.upper()}{g}" for kind, g in sub)


def simulate(
    problem: Problem,
    backward: Sequence[Submission],
    forward: Sequence[Submission] = (),
    sync_before_forward: bool = False,
) -> Timeline:
    """Simulate one iteration of a schedule (assumed valid: see ``plan.check_schedule``)."""
    ready, costs = problem.ready, problem.costs
    end_of: dict[Op, float] = {}
    start_of: dict[Op, float] = {}
    subs = (*backward, *forward)
    starts, ends = [], []
    free = 0.0
    updated: dict[int, float] = {}  # sharded: update ends, known once the backward phase is simulated
    for i, sub in enumerate(subs):
        if problem.shard_update and i == len(backward):
            updated = problem.update_ends(forward, end_of)
        start = free
        for kind, g in sub:
            need = updated.get(g, end_of[("rs", g)]) if kind == "ag" else ready[g]
            if need > start:
                start = need
        if len(sub) == 1:
            kind, g = sub[0]
            free = start + costs[kind][g]
        else:
            free = start + problem.submission_cost(sub)
        starts.append(start)
        ends.append(free)
        for op in sub:
            start_of[op] = start
            end_of[op] = free
    return complete(problem, subs, starts, ends, start_of, end_of, sync_before_forward, update_end=updated)


def complete(
    problem: Problem,
    subs: Sequence[Submission],
    starts: Sequence[float],
    ends: Sequence[float],
    start_of: dict[Op, float],
    end_of: dict[Op, float],
    sync_before_forward: bool,
    labels: Sequence[str] = (),
    update_end: dict[int, float] | None = None,
) -> Timeline:
    """Complete a timeline from the link: forward-phase waits, the iteration time, the bound.

    ``update_end``: with shard_update, when each group's update in ``step()`` ends (simulate's).
    """
    last = max(ends, default=0.0)
    starts_fwd = []
    t = problem.backward_end
    if update_end:  # sharded: the forward starts when step() has updated every shard
        t = max(t, *update_end.values())
    for g in range(problem.size):
        done = end_of.get(("ag", g), end_of.get(("ar", g)))
        if done is None:
            raise ValueError(f"group {g} is never synchronised by the schedule (no ag or ar op)")
        if sync_before_forward:
            done = last
        if done > t:
            t = done
        starts_fwd.append(t)
        t += problem.w[g]
    # The tail after the last submission: forward from the earliest group it completes.
    if sync_before_forward:
        first_completed = 0
    else:
        first_completed = min((g for kind, g in subs[-1] if kind != "rs"), default=problem.size - 1)
    busy = sum(ends) - sum(starts)
    bound = max(problem.compute_bound(), problem.tb[-1] + busy + problem.tail[first_completed])
    return Timeline(problem, tuple(subs), tuple(starts), tuple(ends), start_of, end_of,
                    tuple(starts_fwd), t, bound, tuple(labels), dict(update_end or {}))


def simulate_bytescheduler(problem: Problem, partition: int, credit: int) -> Timeline:
    """ByteScheduler-style all-reduce: chunks of `partition` bytes, by priority, within `credit`.

    The all-reduce of g is cut into chunks once g's gradients are ready. Whenever fewer than
    `credit` bytes are committed and unfinished, the scheduler commits the available chunk
    of the lowest group index (the earliest layer, needed first by the next forward); the
    link runs committed chunks in commit order. Forward of g waits for all chunks of g.

    [Note: credit in a serial link model]
    Committing ahead only fixes the order earlier (preemption happens at the boundary of
    the committed window), so in this model a credit above one partition never saves time;
    it is kept because the real policy has it and the tuner may compare values.
    """
    if partition <= 0 or credit <= 0:
        raise ValueError(f"partition and credit must be positive bytes, got {partition}, {credit}")
    line = problem.cost.ar
    arrivals = sorted(range(problem.size), key=lambda g: problem.ready[g])
    available: list[tuple[int, int, int]] = []  # (group, chunk index, bytes), a heap
    remaining = [max(1, -(-m // partition)) for m in problem.nbytes]
    committed: deque[tuple[float, int]] = deque()  # (end, bytes) of unfinished commits
    inflight = 0
    subs: list[Submission] = []
    starts: list[float] = []
    ends: list[float] = []
    labels: list[str] = []
    start_of: dict[Op, float] = {}
    end_of: dict[Op, float] = {}
    free = now = 0.0
    next_arrival = 0
    while next_arrival < len(arrivals) or available or committed:
        while next_arrival < len(arrivals) and problem.ready[arrivals[next_arrival]] <= now:
            g = arrivals[next_arrival]
            for i in range(remaining[g]):
                heapq.heappush(available, (g, i, min(partition, problem.nbytes[g] - i * partition)))
            next_arrival += 1
        while committed and committed[0][0] <= now:
            inflight -= committed.popleft()[1]
        while available and inflight < credit:
            g, i, size = heapq.heappop(available)
            start = max(free, now)
            free = start + line.time(size)
            subs.append((("ar", g),))
            starts.append(start)
            ends.append(free)
            labels.append(f"AR{g}[{i + 1}/{remaining[g]}]")
            committed.append((free, size))
            inflight += size
            start_of.setdefault(("ar", g), start)
            end_of[("ar", g)] = free
        events = [committed[0][0]] if committed else []
        if next_arrival < len(arrivals):
            events.append(problem.ready[arrivals[next_arrival]])
        if not events:
            break
        now = min(events)
    return complete(problem, subs, starts, ends, start_of, end_of, False, labels)

"""The timeline model of docs/scheduling.md §3: one compute stream, one link, plan order.

Backward runs groups G-1 .. 0 from t = 0, so the gradients of g are ready at
``ready[g] = tb[G-1] + ... + tb[g]``. The link runs one submission at a time in plan order
(backward list, then forward list); a submission starts when the previous one ended and
all its inputs are ready (RS/AR of g: ``ready[g]``; AG of g: end of RS of g). A merged
submission pays one start-up (the largest of its ops'). Forward starts when backward ends;
group g waits for its AG (or AR) to end, applies its update (``u[g]``: its layers' updates
plus the profile's ``bucket_cost``, the host work every bucket costs whatever its size),
then computes (``tf[g]``). The iteration time is the end of the forward of G-1.

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

[Note: interference]
Where the core that computes also drives the communication (a CPU host; on a GPU, copies and
reduction kernels contend for SMs and memory bandwidth), compute runs slower while the link
is busy. The cost model's ``interference`` σ says by how much: compute beside a running
submission takes ``1 + σ`` times as long. (Measured on the emulated cluster the slow-down
depends on the link being busy far more than on the bytes it moves: see pipedap.interference.)
Backward then ends later, which delays the reduce-scatters it makes ready, which moves the
link: the two streams are timed together by :func:`interfered`, an event simulation over the
same submission order. With σ = 0 it gives the plain timeline (the closed-form path below,
which the planners use). Every time under interference is at least the plain one (compute
only gets slower and every event is a max or sum of earlier ones), so plain times are lower
bounds of interfered ones.

[Note: split reductions in the timeline]
A tied word embedding that the runtime reduces in two parts (pipedap/tied_split.py; a
:class:`~.profile.Tie` in the profile) has its dense part reduce-scattered as soon as its
output layer's group u is ready, and only its rows all-gathered when its own group g is:
``costs["rs"][g]`` is that small all-gather (and its shape exchange), and the simulator
adds a submission ``("rsd", g)`` (reduce-scatter of the whole group) where the runtime's FIFO
puts it: before the first backward submission issued after the dense part is ready
(:meth:`Problem.with_dense_parts`). That is ``ready[u]``, or, where the runtime sends it in
pieces as the output layer's backward makes them (the tie's ``early``, ``span`` and
``pieces``: [Note: ties in a profile]), ``early`` seconds before: the link then cannot end
it before the last piece is ready and sent, and each piece pays its start-up. Plans never
contain ``rsd``; timelines do.
Where the runtime reduces g whole (all-reduced, a sharded update, g fused with other
parameters, ``Problem(..., split=False)``) so does the simulator. The split is not always
faster: its reduce-scatter runs beside the backward, delaying every reduce-scatter behind
it, and the computing core moves its bytes while it computes; so the planner plans each
fusion both ways and the plan lists the groups it splits (``Plan.split``).

[Note: deferred all-gathers in the timeline]
Where the runtime serves a split group's lookup from the shards (a deferrable tie, the embedding
the first group; ``Problem(..., defer=True)``; pipedap/tied_lookup.py), the next
forward's lookup fetches only its rows: a submission ``("rf", g)`` that the runtime issues
before the forward list, once backward has ended (its cost is the rows' all-gather's, the
same bytes the other way), and group g's forward waits for it instead of for AG(g). The group's
update (``u[g]``) moves to the output layer's group u. The planners put AG(g) in a submission of
its own right after AG(u), which stays in the forward phase (``fixed_forward``). The forward of u
waits for AG(u) only; what waits for AG(g) as well (``output_rest[u]``) is g's update and the
last piece of the output layer's product: while AG(g) runs, the output layer computes the rows of
this rank's shard, then those of the other ranks' blocks in ``OUTPUT_PIECES`` pieces each as AG(g)
delivers them ([Note: the output layer's own rows first] in pipedap/tied_lookup.py; the product's
time is the tie's ``output_forward``), so ``1 / (N * OUTPUT_PIECES)`` of the product waits for
AG(g)'s end. The rows it steps alone to do so (at most ``u[g]`` more compute; none where AG(g) has
ended when the output layer starts) are left out: the timeline is that much optimistic where AG(g)
ends during the output layer's product. In the forward
chain of [Note: the DP] g costs the fetch, ``chain_ag[g]``, and u both all-gathers
(:meth:`Problem.chain_step`). The search scores each fusion deferred and not.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .costmodel import CostModel
from .plan import Op, Submission
from .profile import OUTPUT_PIECES, Profile


class Problem:
    """Per-group inputs precomputed for fast simulation (groups in forward order)."""

    def __init__(self, profile: Profile, cost: CostModel, shard_update: bool = False, split: bool = True,
                 defer: bool = False) -> None:
        layers = profile.layers
        self.profile = profile
        self.cost = cost
        self.shard_update = shard_update
        self.size = len(layers)
        self.nbytes = [layer.nbytes for layer in layers]
        self.tb = [layer.tb for layer in layers]
        # u[g]: the update of g plus the bucket's fixed cost ([Note: a bucket's fixed cost] in .profile)
        self.u = [layer.u + profile.bucket_cost for layer in layers]
        self.step_updates = sum(self.u) if shard_update else 0.0  # compute in step() (sharded updates)
        self.costs = {kind: [cost.of(kind).time(m) for m in self.nbytes] for kind in ("rs", "ag", "ar")}
        self.interference = cost.interference  # [Note: interference]
        self.startup = {kind: cost.of(kind).a for kind in ("rs", "ag", "ar")}
        self.startup["rsd"] = self.startup["rs"]
        self.startup["rf"] = self.startup["ag"]
        # What merging an AG into an RS submission saves: the smaller of the two start-ups.
        self.merge_saving = min(self.startup["rs"], self.startup["ag"])
        self.ready = [0.0] * self.size
        t = 0.0
        for g in reversed(range(self.size)):
            t += self.tb[g]
            self.ready[g] = t
        self.backward_end = t
        # [Note: split reductions in the timeline]
        self.split: dict[int, int] = {}  # tied group -> the group whose backward makes its dense part
        self.dense_ready: dict[int, float] = {}  # tied group -> when its dense part (first piece) is ready
        self.costs["rsd"] = [0.0] * self.size
        # group -> (ready, cost) of the dense parts the FIFO runs before its backward submission (-1: after them all)
        self.dense_at: dict[int, list[tuple[float, float]]] = {}
        # [Note: deferred all-gathers in the timeline]
        self.deferred: dict[int, int] = {}  # split group -> the output layer's group, whose forward waits for its AG
        # the output layer's group -> (its deferred group, the compute of its forward that waits for that AG)
        self.output_rest: dict[int, tuple[int, float]] = {}
        self.costs["rf"] = [0.0] * self.size
        # the update each group's forward pre-hook applies (sharded: none, step() does)
        self.forward_update = [0.0] * self.size if shard_update else list(self.u)
        for tie in profile.ties if split and not shard_update else ():
            self._split(tie, defer)
        # w[g]: compute the forward spends on g (update, then forward)
        self.w = [u + layer.tf for u, layer in zip(self.forward_update, layers)]
        # the groups whose AG the planners keep in the forward phase, and what each forward-phase AG adds to the
        # link in the forward chain ([Note: the DP] in .schedules): its cost, but a deferred group's fetch, and
        # its output layer's group's both all-gathers
        self.fixed_forward = frozenset({0, *self.deferred, *self.deferred.values()})
        self.chain_ag = list(self.costs["ag"])
        for g, user in self.deferred.items():
            self.chain_ag[g] = self.costs["rf"][g]
            self.chain_ag[user] += self.costs["ag"][g]
        self.link_start = min([self.ready[-1], *self.dense_ready.values()])  # the first gradient bytes exist
        # tail[g]: forward compute from the update of g to the end of the iteration.
        self.tail = [0.0] * (self.size + 1)
        for g in reversed(range(self.size)):
            self.tail[g] = self.tail[g + 1] + self.w[g]

    def _split(self, tie, defer: bool) -> None:
        groups = [layer.params for layer in self.profile.layers]
        g = next((i for i, params in enumerate(groups) if params == (tie.param,)), None)
        user = tie.user_group(groups)
        if g is None or user is None or user <= g:  # fused with other parameters, or no earlier dense part
            return
        self.split[g] = user
        piece = self.cost.rs.time(self.nbytes[g] / tie.pieces)
        self.costs["rsd"][g] = max(tie.pieces * piece, tie.span + piece)
        self.costs["rs"][g] = self.cost.ag.time(self.cost.world_size * tie.rows_bytes) + self.startup["ag"]
        ready = self.dense_ready[g] = max(self.ready[user] - tie.early, self.ready[user] - self.tb[user])
        before = next((h for h in reversed(range(self.size)) if self.ready[h] > ready), -1)  # as with_dense_parts
        self.dense_at.setdefault(before, []).append((ready, self.costs["rsd"][g]))
        self.dense_at[before].sort()
        if defer and tie.deferrable and g == 0:  # (the fetch goes first: the first group's, as the DP charges it)
            self.deferred[g] = user
            self.costs["rf"][g] = self.costs["rs"][g]
            tf = self.profile.layers[user].tf  # (the product is part of it; unknown: all of it)
            product = min(tie.output_forward, tf) if tie.output_forward else tf
            last_piece = product / (self.cost.world_size * OUTPUT_PIECES)
            self.output_rest[user] = (g, self.forward_update[g] + last_piece)
            self.forward_update[user] += self.forward_update[g]
            self.forward_update[g] = 0.0

    def with_fetches(self, forward: Sequence[Submission]) -> tuple[Submission, ...]:
        """``forward`` after the lookups' fetches the runtime issues before it ([Note: deferred all-gathers in
        the timeline])."""
        for g in self.deferred:
            if not any(("ag", g) in sub for sub in forward):
                raise ValueError(f"group {g} is deferred (its lookup served from the shards) but its ag is not in the "
                                 "forward list; plan it with Problem(..., defer=False)")
        return (*((("rf", g),) for g in sorted(self.deferred)), *forward)

    def chain_step(self, z, g: int):
        """The forward-chain term Z of [Note: the DP] (.schedules; a float or an array) with group g's
        forward-phase all-gathers put before the later ones': ``max(Z, tail[g]) + chain_ag[g]``, and for the
        output layer's group of a deferred one, whose AG comes right after g's, that AG first."""
        if g in self.output_rest:
            tied, rest = self.output_rest[g]
            z = np.maximum(z, rest + self.tail[g + 1]) + self.costs["ag"][tied]
            return np.maximum(z, self.tail[g]) + (self.chain_ag[g] - self.costs["ag"][tied])
        return np.maximum(z, self.tail[g]) + self.chain_ag[g]

    def forward_end(self, g: int, start: float, end_of_ag) -> float:
        """When the forward of group g, started at ``start``, ends; ``end_of_ag(h)``: when AG(h) ends (the
        output layer's group of a deferred AG waits for it part-way: [Note: deferred all-gathers in the
        timeline])."""
        if g not in self.output_rest:
            return start + self.w[g]
        tied, rest = self.output_rest[g]
        return max(start + self.w[g] - rest, end_of_ag(tied)) + rest

    def tail_after(self, op: Op) -> float:
        """The least forward compute left once ``op`` (an AG or AR) has ended."""
        kind, g = op
        if g in self.deferred and kind == "ag":
            user = self.deferred[g]
            return self.output_rest[user][1] + self.tail[user + 1]
        return self.tail[g]

    def with_dense_parts(self, backward: Sequence[Submission]) -> tuple[Submission, ...]:
        """``backward`` with each split group's dense reduce-scatter where the runtime submits it: before
        the first submission issued (all its reductions' gradients ready) after the dense part is ready."""
        dense = sorted((self.dense_ready[g], g) for g in self.split if any(("rs", g) in sub for sub in backward))
        if not dense:
            return tuple(backward)
        out: list[Submission] = []
        issued, k = 0.0, 0
        for sub in backward:
            issued = max([issued, *(self.ready[g] for kind, g in sub if kind != "ag")])
            while k < len(dense) and dense[k][0] < issued:
                out.append((("rsd", dense[k][1]),))
                k += 1
            out.append(sub)
        return (*out, *((("rsd", g),) for _, g in dense[k:]))

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
        (or a tied dense part) exist, and after the last collective at least the forward of G-1 remains (or the
        part of an output layer's forward that waits for a deferred AG, and the forward after it).
        """
        decoupled = (sum(self.costs["rs"]) + sum(self.costs["ag"]) + sum(self.costs["rsd"]) + sum(self.costs["rf"])
                     - self.merge_saving * (self.size - 1))
        link = min(sum(self.costs["ar"]), decoupled)
        final = min([self.w[-1], *(self.tail_after(("ag", g)) for g in self.deferred)])  # (tail_after's least)
        return max(self.compute_bound(), self.link_start + link + final)

    def run_dense_parts(self, t, g: int):
        """Link free time ``t`` (a float or an array) after the dense parts the FIFO puts before group g's
        backward submission (g = -1: after all of them)."""
        for ready, cost in self.dense_at.get(g, ()):
            t = np.maximum(t, ready) + cost
        return t


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
    compute: tuple[tuple[str, float, float], ...] = ()  # (label, start, end) of every compute block
    forward_ends: tuple[float, ...] = ()  # when the forward of each group ends
    backward_end: float = 0.0

    @property
    def plan_times(self) -> tuple[tuple[float, float], ...]:
        """(start, end) of the plan's own submissions: the timeline's without the dense parts it added
        ([Note: split reductions in the timeline]), as ``Prediction.times`` holds them."""
        return tuple((start, end) for sub, start, end in zip(self.submissions, self.starts, self.ends)
                     if sub[0][0] not in ("rsd", "rf"))

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
        return self.backward_end if g < 0 else self.forward_ends[g]

    def compute_spans(self) -> list[tuple[str, float, float]]:
        """(label, start, end) of every block on the compute stream, for Gantt charts."""
        return list(self.compute)


def _compute_spans(problem: Problem, backward: Sequence[tuple[float, float]], updates: dict[int, tuple[float, float]],
                   forward: Sequence[tuple[float, float]]) -> tuple[tuple[str, float, float], ...]:
    """The compute stream as labelled spans: backward blocks (``backward[g]``), the sharded updates
    in step(), then each group's forward, its update (when not sharded) first, in proportion."""
    spans = [(f"B{g}", *backward[g]) for g in reversed(range(problem.size))]
    spans += [(f"U{g}", *span) for g, span in updates.items()]
    for g, (start, end) in enumerate(forward):
        u = problem.forward_update[g]
        split = start + (end - start) * (u / problem.w[g]) if u > 0 else start
        if u > 0:
            spans.append((f"U{g}", start, split))
        spans.append((f"F{g}", split, end))
    return tuple(spans)


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
    backward, forward = problem.with_dense_parts(backward), problem.with_fetches(forward)
    if problem.interference:
        subs = (*backward, *forward)
        return interfered(problem, subs, [problem.submission_cost(sub) for sub in subs], sync_before_forward)
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
            need = (updated.get(g, end_of[("rs", g)]) if kind == "ag" else problem.dense_ready[g] if kind == "rsd"
                    else max(end_of[("rs", g)], problem.backward_end) if kind == "rf" else ready[g])
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
    forward = []
    for g in range(problem.size):
        done = end_of.get(("ag", g), end_of.get(("ar", g)))
        if done is None:
            raise ValueError(f"group {g} is never synchronised by the schedule (no ag or ar op)")
        if g in problem.deferred:  # [Note: deferred all-gathers in the timeline]
            done = end_of[("rf", g)]
        if sync_before_forward:
            done = last
        if done > t:
            t = done
        starts_fwd.append(t)
        t = problem.forward_end(g, t, lambda h: end_of[("ag", h)])
        forward.append((starts_fwd[-1], t))
    update_end = update_end or {}
    compute = _compute_spans(problem, [(r - tb, r) for r, tb in zip(problem.ready, problem.tb)],
                             {g: (end - problem.u[g], end) for g, end in update_end.items()}, forward)
    return Timeline(problem, tuple(subs), tuple(starts), tuple(ends), start_of, end_of,
                    tuple(starts_fwd), t, _plan_bound(problem, subs, starts, ends, sync_before_forward),
                    tuple(labels), dict(update_end), compute, tuple(end for _, end in forward), problem.backward_end)


def _plan_bound(problem: Problem, subs: Sequence[Submission], starts: Sequence[float], ends: Sequence[float],
                sync_before_forward: bool) -> float:
    """This plan's lower bound: compute alone, or head + link busy + the forward after the last submission."""
    if sync_before_forward:
        rest = problem.tail[0]
    else:  # the forward after the last submission: from the earliest group it completes
        rest = min((problem.tail_after(op) for op in subs[-1] if op[0] in ("ag", "ar")), default=problem.w[-1])
    busy = sum(ends) - sum(starts)
    return max(problem.compute_bound(), problem.link_start + busy + rest)


def interfered(problem: Problem, subs: Sequence[Submission], durations: Sequence[float], sync_before_forward: bool,
               labels: Sequence[str] = ()) -> Timeline:
    """The timeline of `subs` (in link order, tied dense parts and lookup fetches included:
    :meth:`Problem.with_dense_parts`, :meth:`Problem.with_fetches`; lasting `durations`) with compute
    slowed while the link runs ([Note: interference]): the two streams simulated event by event.

    The compute stream runs backward (G-1 .. 0), the sharded updates of step() (in the order of the
    forward submissions' all-gathers), then the forward (0 .. G-1); the link runs `subs` in order.
    Each block starts when its stream is free and its input exists: RS/AR(g) the backward of g,
    AG(g) the RS of g (sharded: the update of g), a fetch the rows and the end of backward; the forward
    of g all of g's AG/AR (WFBP: every submission; deferred: [Note: deferred all-gathers in the
    timeline]). Between two events the speed of compute is constant.
    """
    size, busy_rate = problem.size, 1.0 / (1.0 + problem.interference)
    blocks: list[tuple[tuple[str, int], float, object]] = []  # (block, seconds, None | "all" | ops it waits for)
    for g in reversed(range(size)):  # a tied dense part is ready part-way through its user's backward: ("D", tied)
        start = problem.ready[g] - problem.tb[g]
        for ready, tied in sorted((problem.dense_ready[t], t) for t, user in problem.split.items() if user == g):
            blocks.append((("D", tied), ready - start, None))
            start = ready
        blocks.append((("B", g), problem.ready[g] - start, None))
    if problem.shard_update:
        blocks += [(("U", g), problem.u[g], (("rs", g),)) for sub in subs for kind, g in sub if kind == "ag"]
    last_needs: dict[Op, int] = {}  # an op's AR chunks: it is done when its last submission ends
    for i, sub in enumerate(subs):
        for op in sub:
            last_needs[op] = i
    for g in range(size):  # [Note: deferred all-gathers in the timeline]
        needs = (("rf", g),) if g in problem.deferred else (("ag", g) if ("ag", g) in last_needs else ("ar", g),)
        tied, rest = problem.output_rest.get(g, (None, 0.0))
        blocks.append((("F", g), problem.w[g] - rest, "all" if sync_before_forward else needs))
        if tied is not None:  # the output layer's part that waits for the deferred AG: ("R", g)
            blocks.append((("R", g), rest, "all" if sync_before_forward else (("ag", tied),)))

    ended: dict[object, float] = {}  # ("B", g), ("U", g), ("F", g), ("R", g) and ops -> end time
    span: dict[tuple[str, int], tuple[float, float]] = {}
    starts, ends = [0.0] * len(subs), [0.0] * len(subs)
    start_of: dict[Op, float] = {}

    def link_can_start(i: int) -> bool:
        for kind, g in subs[i]:
            needs = ((("U", g) if problem.shard_update else ("rs", g)),) if kind == "ag" else (
                (("D", g),) if kind == "rsd" else (("rs", g), ("B", 0)) if kind == "rf" else (("B", g),))
            if any(need not in ended for need in needs):
                return False
        return True

    now, c, left, c_start, li, link_end = 0.0, 0, None, 0.0, 0, None
    while c < len(blocks) or li < len(subs):
        if left is None and c < len(blocks):
            need = blocks[c][2]
            if need is None or (li == len(subs) if need == "all" else all(op in ended for op in need)):
                left, c_start = blocks[c][1], now
        if link_end is None and li < len(subs) and link_can_start(li):
            starts[li], link_end = now, now + durations[li]
            for op in subs[li]:
                start_of.setdefault(op, now)
        rate = busy_rate if link_end is not None else 1.0
        compute_end = now + left / rate if left is not None else math.inf
        nxt = min(compute_end, link_end if link_end is not None else math.inf)
        if nxt == math.inf:
            raise ValueError(f"schedule deadlocks: {blocks[c][0] if c < len(blocks) else 'nothing'} and "
                             f"submission {label(subs[li]) if li < len(subs) else 'none'} wait for each other")
        if link_end is not None and link_end == nxt:
            ends[li] = nxt
            for op in subs[li]:
                if last_needs[op] == li:
                    ended[op] = nxt
            li, link_end = li + 1, None
        if left is not None:
            if compute_end == nxt:
                ended[blocks[c][0]] = nxt
                span[blocks[c][0]] = (c_start, nxt)
                c, left = c + 1, None
            else:
                left -= (nxt - now) * rate
        now = nxt

    end_of = {op: ended[op] for op in last_needs}
    for tied, user in sorted(problem.split.items(), key=lambda item: -problem.dense_ready[item[0]]):
        span[("B", user)] = (span[("D", tied)][0], span[("B", user)][1])  # the user's whole backward
    for g in problem.output_rest:
        span[("F", g)] = (span[("F", g)][0], span[("R", g)][1])
    forward = [span[("F", g)] for g in range(size)]
    updates = {g: span[("U", g)] for kind, g in (op for sub in subs for op in sub)
               if kind == "ag" and problem.shard_update}
    compute = _compute_spans(problem, [span[("B", g)] for g in range(size)], updates, forward)
    return Timeline(problem, tuple(subs), tuple(starts), tuple(ends), start_of, end_of,
                    tuple(start for start, _ in forward), forward[-1][1],
                    _plan_bound(problem, subs, starts, ends, sync_before_forward), tuple(labels),
                    {g: end for g, (_, end) in updates.items()}, compute, tuple(end for _, end in forward),
                    span[("B", 0)][1])


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
    if problem.interference:  # the same commit order, re-timed with compute and link together
        return interfered(problem, subs, [end - start for start, end in zip(starts, ends)], False, labels)
    return complete(problem, subs, starts, ends, start_of, end_of, False, labels)

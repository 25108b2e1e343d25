"""Tensor fusion (docs/scheduling.md §5): which consecutive layers share one bucket.

A grouping is a tuple of groups, each a tuple of consecutive layer indices, in forward
order, covering every layer once. :func:`fuse` turns a layer profile into a group profile
(times and bytes summed), which is what the schedules and the simulator take.

Strategies: a byte threshold (Horovod), a fixed number of nearby layers, MG-WFBP-style
merging from the measured times, a joint search over these candidates scored by the
simulator (:func:`search`), and Bayesian optimisation of the threshold with optuna,
offline on the simulator or online on measured iteration times (:func:`tune_threshold`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import schedules
from .costmodel import CostModel
from .plan import Plan
from .profile import Layer, Profile
from .simulator import Problem

Grouping = tuple[tuple[int, ...], ...]
MB = 1 << 20
# The decoupled schedules the search scores each grouping with; "optimal" is seeded
# with the greedy, so the search's best is at least as good as any of them.
PLANNERS: dict[str, Callable[[Problem], schedules.Schedule]] = {
    "wfbp": schedules.wfbp,
    "bytescheduler": schedules.bytescheduler,
    "dear": schedules.dear,
    "pipedap": schedules.pipedap,
    "optimal": schedules.optimal,
}


def fuse(profile: Profile, grouping: Grouping) -> Profile:
    """The group profile of `grouping`: per group, summed times and bytes, joined parameters.

    The bucket's fixed cost stays the profile's: the simulator charges it once per group.
    """
    flat = [i for group in grouping for i in group]
    if flat != list(range(len(profile))) or any(not group for group in grouping):
        raise ValueError(
            f"grouping must list layers 0..{len(profile) - 1} once each, in order, in non-empty "
            f"groups; got {grouping}"
        )
    fused = []
    for group in grouping:
        layers = [profile.layers[i] for i in group]
        name = layers[0].name if len(layers) == 1 else f"{layers[0].name}..{layers[-1].name}"
        fused.append(
            Layer(
                name=name,
                params=tuple(p for layer in layers for p in layer.params),
                nbytes=sum(layer.nbytes for layer in layers),
                tf=sum(layer.tf for layer in layers),
                tb=sum(layer.tb for layer in layers),
                u=sum(layer.u for layer in layers),
            )
        )
    return Profile(tuple(fused), {**profile.meta, "groups": [list(g) for g in grouping]}, profile.bucket_cost,
                   profile.ties)


def singletons(profile: Profile) -> Grouping:
    """No fusion: one group per layer."""
    return tuple((i,) for i in range(len(profile)))


def by_threshold(profile: Profile, threshold: int) -> Grouping:
    """Horovod-style: in backward order, fill a bucket while it stays within `threshold` bytes.

    A layer larger than the threshold gets a bucket of its own.
    """
    groups: list[list[int]] = []
    size = 0
    for i in reversed(range(len(profile))):
        nbytes = profile.layers[i].nbytes
        if groups and size + nbytes <= threshold:
            groups[-1].append(i)
            size += nbytes
        else:
            groups.append([i])
            size = nbytes
    return tuple(tuple(sorted(g)) for g in reversed(groups))


def by_count(profile: Profile, count: int) -> Grouping:
    """`count` consecutive layers per bucket, counted from the last layer (backward order)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    n = len(profile)
    starts = sorted({max(0, stop - count) for stop in range(n, 0, -count)})
    return tuple(tuple(range(a, b)) for a, b in zip(starts, [*starts[1:], n]))


def mgwfbp(profile: Profile, cost: CostModel, kind: str = "rs") -> Grouping:
    """MG-WFBP-style merging from measured times (Shi et al., 2019).

    Walking backward, the open bucket's collective (`kind`) would start when both the link
    and its gradients are free. If the next layer's gradients are ready less than one
    start-up later, waiting for them costs less than the start-up a merge saves, so the
    layer joins the bucket; otherwise the bucket is sent and the layer opens a new one.
    """
    problem = Problem(profile, cost)
    line = cost.of(kind)
    groups = [[problem.size - 1]]
    free = 0.0
    for g in reversed(range(problem.size - 1)):
        current = groups[-1]
        start = max(free, problem.ready[current[-1]])
        if problem.ready[g] - start < line.a:
            current.append(g)
        else:
            free = start + line.time(sum(problem.nbytes[i] for i in current))
            groups.append([g])
    return tuple(tuple(sorted(g)) for g in reversed(groups))


FUSION_SPECS = "search, none, mgwfbp, threshold:25MB (or threshold:BYTES), count:4, tune or tune:TRIALS"


def groupings(spec: str, profile: Profile, cost: CostModel) -> dict[str, Grouping]:
    """The named groupings a fusion spec stands for (see :data:`FUSION_SPECS`).

    ``search`` is every candidate; ``tune`` tunes the byte threshold with optuna on the
    simulator (30 trials, or TRIALS), seeded so every rank gets the same answer.
    """
    kind, _, value = spec.partition(":")
    if spec == "search":
        return candidates(profile, cost)
    if spec == "none":
        return {"none": singletons(profile)}
    if spec == "mgwfbp":
        return {"mgwfbp": mgwfbp(profile, cost)}
    if kind == "threshold" and re.fullmatch(r"\d+(\.\d*)?MB", value, re.IGNORECASE):
        return {spec: by_threshold(profile, int(float(value[:-2]) * MB))}
    if kind == "threshold" and value.isdigit():
        return {spec: by_threshold(profile, int(value))}
    if kind == "count" and value.isdigit():
        return {spec: by_count(profile, int(value))}
    if kind == "tune" and (not value or value.isdigit()):
        threshold, _, _ = tune_threshold(profile, cost, trials=int(value or 30))
        return {f"tuned:{threshold / MB:.2f}MB": by_threshold(profile, threshold)}
    raise ValueError(f"unknown fusion {spec!r}; use {FUSION_SPECS}")


def candidates(profile: Profile, cost: CostModel) -> dict[str, Grouping]:
    """The named groupings the joint search scores (duplicates removed, first name kept)."""
    named = {"none": singletons(profile), "mgwfbp": mgwfbp(profile, cost)}
    for mb in (1, 4, 25, 64):  # 25 MB: DDP's bucket cap; 64 MB: Horovod's fusion buffer
        named[f"threshold:{mb}MB"] = by_threshold(profile, mb * MB)
    for count in (2, 4, 8):
        named[f"count:{count}"] = by_count(profile, count)
    unique: dict[Grouping, str] = {}
    for name, grouping in named.items():
        unique.setdefault(grouping, name)
    return {name: grouping for grouping, name in unique.items()}


@dataclass(frozen=True)
class Scored:
    """One (fusion, schedule) pair the search considered."""

    fusion: str
    grouping: Grouping
    schedule: schedules.Schedule
    seconds: float  # planning time of this schedule


def score(profile: Profile, cost: CostModel, fusion: str, grouping: Grouping,
          planners: Sequence[str] = tuple(PLANNERS), shard_update: bool = False) -> list[Scored]:
    """Every schedule in `planners` for one grouping, with its planning time; where the grouping
    leaves a tied embedding alone ([Note: split reductions in the timeline]), with it split and whole,
    and split with its all-gather deferred where the runtime can ([Note: deferred all-gathers in the
    timeline])."""
    fused = fuse(profile, grouping)
    problems = [Problem(fused, cost, shard_update)]
    if problems[0].split:
        problems.append(Problem(fused, cost, shard_update, split=False))
        deferring = Problem(fused, cost, shard_update, defer=True)
        problems += [deferring] if deferring.deferred else []
    out = []
    for problem in problems:
        for name in planners:
            if problem.deferred and name in ("wfbp", "bytescheduler"):  # all-reduced: no all-gather to defer
                continue
            start = time.perf_counter()
            schedule = PLANNERS[name](problem)
            out.append(Scored(fusion, grouping, schedule, time.perf_counter() - start))
    return out


def search(profile: Profile, cost: CostModel, planners: Sequence[str] = tuple(PLANNERS),
           groupings: dict[str, Grouping] | None = None, shard_update: bool = False) -> tuple[Scored, list[Scored]]:
    """Joint fusion + order search: every candidate grouping under every planner.

    Returns the best plannable (fusion, schedule) pair and everything considered.
    """
    considered = []
    for fusion, grouping in (groupings or candidates(profile, cost)).items():
        considered += score(profile, cost, fusion, grouping, planners, shard_update)
    plannable = [s for s in considered if s.schedule.backward]
    if not plannable:
        raise ValueError(f"no plannable schedule among {list(planners)}; include dear, pipedap or optimal")
    best = min(plannable, key=lambda s: s.schedule.iteration_time)
    return best, considered


def tune_threshold(
    profile: Profile,
    cost: CostModel,
    planner: str = "pipedap",
    trials: int = 30,
    seed: int = 0,
    measure: Callable[[Plan], float] | None = None,
) -> tuple[int, float, list[tuple[int, float]]]:
    """Bayesian optimisation (optuna TPE) of the fusion threshold in bytes.

    Offline the objective is the simulated iteration time of `planner`'s schedule; online,
    pass `measure(plan) -> seconds` to score each candidate plan by running it. Returns the
    best threshold, its objective value and the (threshold, value) history. Seeded, so
    offline tuning gives every rank the same answer.
    """
    try:
        import optuna
    except ImportError:
        raise ImportError("threshold tuning needs optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    smallest = max(1, min(layer.nbytes for layer in profile.layers))
    total = max(smallest + 1, sum(layer.nbytes for layer in profile.layers))

    def objective(trial: optuna.Trial) -> float:
        threshold = trial.suggest_int("threshold", smallest, total, log=True)
        schedule = PLANNERS[planner](Problem(fuse(profile, by_threshold(profile, threshold)), cost))
        return measure(schedule.to_plan()) if measure else schedule.iteration_time

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    history = [(t.params["threshold"], t.value) for t in study.trials if t.value is not None]
    return study.best_params["threshold"], study.best_value, history

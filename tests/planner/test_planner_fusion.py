"""Fusion: groupings by hand, fused profiles, the joint search and threshold tuning."""

from __future__ import annotations

import pytest

from pipedap.planner import fusion, schedules
from pipedap.planner.costmodel import AlphaBeta, CostModel, from_link
from pipedap.planner.profile import Layer, Profile
from pipedap.planner.simulator import Problem


def _profile(sizes, tb=1.0):
    return Profile(tuple(Layer(f"l{i}", (f"l{i}.w", f"l{i}.b"), m, 0.5, tb, 0.1) for i, m in enumerate(sizes)))


def test_fuse_sums_and_joins():
    fused = fusion.fuse(_profile([10, 20, 30]), ((0,), (1, 2)))
    assert [g.name for g in fused.layers] == ["l0", "l1..l2"]
    second = fused.layers[1]
    assert second.params == ("l1.w", "l1.b", "l2.w", "l2.b")
    assert (second.nbytes, second.tf, second.tb, second.u) == (50, 1.0, 2.0, pytest.approx(0.2))
    with pytest.raises(ValueError, match="once each, in order"):
        fusion.fuse(_profile([10, 20, 30]), ((0, 2), (1,)))


def test_threshold_fills_buckets_in_backward_order():
    profile = _profile([5, 5, 5, 20, 5, 5])
    # Backward: l5+l4 = 10, l3 (20) alone (over 10), l2+l1 = 10, l0 alone.
    assert fusion.by_threshold(profile, 10) == ((0,), (1, 2), (3,), (4, 5))
    assert fusion.by_threshold(profile, 1000) == ((0, 1, 2, 3, 4, 5),)
    assert fusion.by_threshold(profile, 1) == fusion.singletons(profile)


def test_count_groups_from_the_last_layer():
    profile = _profile([1] * 5)
    assert fusion.by_count(profile, 2) == ((0,), (1, 2), (3, 4))
    assert fusion.by_count(profile, 9) == ((0, 1, 2, 3, 4),)
    with pytest.raises(ValueError, match="count must be >= 1"):
        fusion.by_count(profile, 0)


def test_mgwfbp_merges_when_waiting_is_cheaper_than_a_startup():
    # RS = 1 + 0.1 M. tb: l3 1, l2 0.5, l1 3, l0 0.5 -> ready: l3 1, l2 1.5, l1 4.5, l0 5.
    # Bucket {l3} would start at 1; l2 is ready 0.5 later (< a = 1): merge. {l3, l2} starts
    # at 1.5; l1 is ready 3 later: send (10 bytes: 2, link free at 3.5), open {l1}, which
    # starts at 4.5; l0 is ready 0.5 later: merge.
    half = AlphaBeta(1.0, 0.1)
    cost = CostModel(2, half, half, half)
    profile = Profile(tuple(Layer(f"l{i}", (f"p{i}",), 5, 0.1, tb) for i, tb in enumerate([0.5, 3.0, 0.5, 1.0])))
    assert fusion.mgwfbp(profile, cost) == ((0, 1), (2, 3))


def test_search_returns_the_best_of_everything_it_considered():
    profile = _profile([4_000_000, 100_000, 3_000_000, 50_000, 2_000_000, 10_000], tb=0.004)
    cost = from_link(8, 1.25e8, 5e-4)
    best, considered = fusion.search(profile, cost)
    names = {s.fusion for s in considered}
    assert {"none", "mgwfbp"} <= names
    assert {s.schedule.name for s in considered} == set(fusion.PLANNERS)
    plannable = [s.schedule.iteration_time for s in considered if s.schedule.backward]
    assert best.schedule.iteration_time == min(plannable)
    plan = best.schedule.to_plan()
    assert plan.params == profile.params


def test_tune_threshold_offline_and_online():
    pytest.importorskip("optuna")
    profile = _profile([400_000 * (i % 3 + 1) for i in range(12)], tb=0.002)
    cost = from_link(4, 1.25e8, 2e-3)
    threshold, value, history = fusion.tune_threshold(profile, cost, trials=12, seed=1)
    assert len(history) == 12 and value == min(v for _, v in history)
    problem = Problem(fusion.fuse(profile, fusion.by_threshold(profile, threshold)), cost)
    assert schedules.pipedap(problem).iteration_time == value
    assert fusion.tune_threshold(profile, cost, trials=12, seed=1)[0] == threshold  # seeded

    # Online: a stand-in for measured iteration times that prefers exactly 3 groups.
    seen = []

    def measure(plan):
        seen.append(len(plan.groups))
        return abs(len(plan.groups) - 3) + 1.0

    _, value, _ = fusion.tune_threshold(profile, cost, trials=25, seed=0, measure=measure)
    assert len(seen) == 25 and value == min(abs(n - 3) + 1.0 for n in seen)

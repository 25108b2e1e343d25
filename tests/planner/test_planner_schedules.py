"""Schedules: hand-worked greedy moves, and properties over seeded random instances."""

from __future__ import annotations

import random

import pytest

from pipedap.planner import schedules
from pipedap.planner.plan import Group
from tests.planner.conftest import random_options

TOL = 1e-9


def test_greedy_moves_ag_behind_rs(make_problem):
    # RS = AG = 1 + 0.5 M. g1: 2 bytes (cost 2), tb 1; g0: 2 bytes, tb 5 (ready at 6).
    # DeAR: rs1 1-3, rs0 6-8, ag0 8-10, ag1 10-12; forward g0 10-11, g1 12-13: T = 13.
    # n = 1: S_bc = 6 - 3 = 3 > a = 1; S_fc = stall at g1 = 12 - 11 = 1;
    # S_bc + S_fc + a = 5 > T_ag(1) = 2 -> AG(1) behind RS(1): rs1 1-3, ag1 3-5,
    # rs0 6-8, ag0 8-10; forward g0 10-11, g1 11-12: T = 12.
    problem = make_problem([(2, 1.0, 5.0, 0.0), (2, 1.0, 1.0, 0.0)])
    assert schedules.dear(problem).iteration_time == 13
    for check in (True, False):
        greedy = schedules.pipedap(problem, check=check)
        assert greedy.info["options"] == "FB"
        assert greedy.backward == ((("rs", 1),), (("ag", 1),), (("rs", 0),))
        assert greedy.forward == ((("ag", 0),),)
        assert greedy.iteration_time == 12
    assert schedules.optimal(problem).iteration_time == 12


def test_greedy_merges_ag_with_previous_rs(make_problem):
    # g1: 2 bytes, tb 1 (ready 1), tf 1; g0: 2 bytes, tb 1 (ready 2), tf 0.5.
    # DeAR: rs1 1-3, rs0 3-5, ag0 5-7, ag1 7-9; forward g0 7-7.5, g1 9-10: T = 10.
    # n = 1: S_bc = 3 - 3 = 0, not > a = 1; S_fc = 10 - 7.5 - 1 = 1.5; n - 1 = 0 saves one
    # start-up: 0 + 1.5 + 1 = 2.5 > T_ag(1) = 2 -> merge AG(1) into RS(0)'s submission:
    # rs1 1-3, rs0+ag1 3-6 (2 + 2 - 1), ag0 6-8; forward g0 8-8.5, g1 8.5-9.5: T = 9.5.
    problem = make_problem([(2, 0.5, 1.0, 0.0), (2, 1.0, 1.0, 0.0)])
    assert schedules.dear(problem).iteration_time == 10
    greedy = schedules.pipedap(problem)
    assert greedy.info["options"] == "FM"
    assert greedy.backward == ((("rs", 1),), (("rs", 0), ("ag", 1)))
    assert greedy.iteration_time == 9.5
    # Behind RS(1) instead would give 10.5: the merge is the optimum here.
    assert schedules.from_options(problem, "x", "FB").iteration_time == 10.5
    assert schedules.optimal(problem).iteration_time == 9.5


def test_greedy_keeps_dear_when_nothing_fits(make_problem):
    # A huge AG (cost 101) never fits the slack: the greedy stays at DeAR.
    problem = make_problem([(2, 1.0, 1.0, 0.0), (200, 1.0, 1.0, 0.0)])
    assert schedules.pipedap(problem).info["options"] == "FF"


def test_decoupled_layout():
    backward, forward = schedules.decoupled("FMBF")
    assert backward == [
        (("rs", 3),), (("rs", 2),), (("ag", 2),), (("rs", 1),), (("rs", 0), ("ag", 1))
    ]
    assert forward == [(("ag", 0),), (("ag", 3),)]
    with pytest.raises(ValueError, match="group 0"):
        schedules.decoupled("MF")


def test_plan_of_gives_the_builtin_submission_orders(make_problem):
    """The runtime's plans without a given plan (docs/scheduling.md §4), for 3 groups."""
    groups = [Group(f"g{i}", (f"p{i}",), 4 * (i + 1)) for i in range(3)]
    wfbp = schedules.plan_of("wfbp", groups, 4)
    assert wfbp.backward == ((("ar", 2),), (("ar", 1),), (("ar", 0),)) and wfbp.forward == ()
    assert wfbp.sync_before_forward and wfbp.schedule == "wfbp" and wfbp.world_size == 4
    dear = schedules.plan_of("dear", groups, 4)
    assert dear.backward == ((("rs", 2),), (("rs", 1),), (("rs", 0),))
    assert dear.forward == ((("ag", 0),), (("ag", 1),), (("ag", 2),))
    assert not dear.sync_before_forward and dear.schedule == "dear"
    assert dear.groups == tuple(groups) and dear.predicted is None
    # the simulated schedules of the same name run the same submissions
    problem = make_problem([(4, 1.0, 1.0, 0.0)] * 3)
    for name, plan in (("wfbp", wfbp), ("dear", dear)):
        simulated = getattr(schedules, name)(problem)
        assert (simulated.backward, simulated.forward, simulated.sync_before_forward) == (
            plan.backward, plan.forward, plan.sync_before_forward)
    with pytest.raises(ValueError, match="no built-in plan for schedule 'pipedap'"):
        schedules.plan_of("pipedap", groups, 4)


def test_fast_evaluation_matches_simulator(random_problems):
    rng = random.Random(5)
    for problem in random_problems(60, 1, 30):
        options = random_options(rng, problem)
        fast = schedules._evaluate(problem, options)
        tl = schedules.from_options(problem, "options", options).timeline  # (deferred AGs merged)
        assert fast[0] == pytest.approx(tl.iteration_time, rel=1e-12)
        for g in range(problem.size):
            assert fast[1][g] == pytest.approx(tl.start_of[("rs", g)], rel=1e-12)
            assert fast[2][g] == pytest.approx(tl.end_of[("rs", g)], rel=1e-12)
            assert fast[3][g] == pytest.approx(tl.forward_end(g), rel=1e-12)


def _all(problem):
    greedy = schedules.pipedap(problem)
    every = {
        "dear": schedules.dear(problem),
        "pipedap": greedy,
        "optimal": schedules.optimal(problem, seed=greedy),
    }
    if not problem.deferred:  # (all-reduced: nothing to defer)
        every["wfbp"] = schedules.wfbp(problem)
        every["bytescheduler"] = schedules.bytescheduler(problem, partitions=(65536, 1 << 20), credits=(1, 2))
    return every


def test_order_and_bounds_on_random_instances(random_problems):
    for problem in random_problems(300, 1, 40):
        result = _all(problem)
        t = {name: s.iteration_time for name, s in result.items()}
        assert t["optimal"] <= t["pipedap"] + TOL * t["pipedap"]
        assert t["pipedap"] <= t["dear"] + TOL * t["dear"]
        bound = problem.lower_bound()
        for name, schedule in result.items():
            tl = schedule.timeline
            assert tl.iteration_time >= tl.lower_bound * (1 - TOL), name
            assert tl.lower_bound >= bound * (1 - TOL), name


def test_optimal_equals_exhaustive_small(random_problems):
    problems = random_problems(250, 1, 6) + random_problems(4, 9, 10)
    proven = 0
    for problem in problems:
        best = schedules.exhaustive(problem).iteration_time
        exact = schedules.optimal(problem)
        assert exact.info["proven_optimal"]
        assert exact.iteration_time == pytest.approx(best, rel=TOL)
        if "dp_iteration_time" in exact.info:  # the DP's own value of its plan is the simulator's
            assert exact.info["dp_iteration_time"] == pytest.approx(exact.iteration_time, rel=TOL)
        proven += exact.iteration_time < schedules.pipedap(problem).iteration_time - TOL * best
    # The oracle must also see cases where the greedy is not optimal, or it tests little.
    assert proven > 0


def test_optimal_beats_greedy_somewhere_and_never_loses(random_problems):
    # With the cap forced low the DP is a beam, but it is still seeded with the greedy.
    for problem in random_problems(40, 30, 80):
        greedy = schedules.pipedap(problem)
        beam = schedules.optimal(problem, max_states=2, seed=greedy)
        assert beam.iteration_time <= greedy.iteration_time
        assert beam.name == "optimal"


def test_exhaustive_refuses_large_problems(random_problems):
    (problem,) = random_problems(1, 13, 13)
    with pytest.raises(ValueError, match="use optimal"):
        schedules.exhaustive(problem)


def test_planning_is_deterministic(random_problems):
    (problem,) = random_problems(1, 120, 120)
    first, second = schedules.optimal(problem), schedules.optimal(problem)
    assert first.backward == second.backward and first.forward == second.forward
    assert first.to_plan().digest() == second.to_plan().digest()


def test_greedy_two_startup_rule_and_the_simulator_check(make_problem):
    # Three groups of 2 bytes (RS = AG = 2), tb 1 each (ready: g2 at 1, g1 at 2, g0 at 3),
    # tf 1, 0.5, 1. DeAR: rs2 1-3, rs1 3-5, rs0 5-7, ag0 7-9, ag1 9-11, ag2 11-13;
    # forward g0 9-10, g1 11-11.5, g2 13-14: T = 14.
    # n = 1: S_bc = 0, S_fc = 14 - 10 - 1.5 = 2.5, 0 + 2.5 + a = 3.5 > 2: merge into RS(0):
    #   rs0+ag1 5-8, ag0 8-10, ag2 10-12; forward g0 10-11, g1 11-11.5, g2 12-13: T = 13.
    # n = 2: S_bc = 3 - 3 = 0, S_fc = 13 - 11.5 - 1 = 0.5, and n - 1 > 0 counts 2a:
    #   0 + 0.5 + 2 = 2.5 > 2: merge into RS(1): rs1+ag2 3-6, rs0+ag1 6-9, ag0 9-11;
    #   forward g0 11-12, g1 12-12.5, g2 12.5-13.5: T = 13.5, worse than 13.
    problem = make_problem([(2, 1.0, 1.0, 0.0), (2, 0.5, 1.0, 0.0), (2, 1.0, 1.0, 0.0)])
    assert schedules.dear(problem).iteration_time == 14
    paper = schedules.pipedap(problem, check=False)
    assert paper.info["options"] == "FMM" and paper.iteration_time == 13.5
    checked = schedules.pipedap(problem)
    assert checked.info["options"] == "FMF" and checked.iteration_time == 13
    assert schedules.optimal(problem).iteration_time == schedules.exhaustive(problem).iteration_time <= 13

"""The simulator against timelines computed by hand (SCHEDULING.md §3).

Cost model in all cases: RS = AG = 1 + 0.5 M, AR = 2 + M (time units, M bytes).
Groups: g0 (4 bytes, tf 1, tb 2, u 0.5), g1 (2 bytes, tf 1, tb 1, u 0), so
ready[1] = 1, ready[0] = 3, backward ends at 3; RS/AG cost 3 for g0 and 2 for g1.
"""

from __future__ import annotations

import pytest

from pipedap.planner.simulator import simulate, simulate_bytescheduler

LAYERS = [(4, 1.0, 2.0, 0.5), (2, 1.0, 1.0, 0.0)]


def test_dear_timeline(make_problem):
    problem = make_problem(LAYERS)
    tl = simulate(problem, [(("rs", 1),), (("rs", 0),)], [(("ag", 0),), (("ag", 1),)])
    # rs1 1-3, rs0 3-6, ag0 6-9, ag1 9-11; forward: g0 waits to 9, update 0.5, forward to 10.5;
    # g1 waits for ag1 until 11, forward to 12.
    assert tl.starts == (1, 3, 6, 9)
    assert tl.ends == (3, 6, 9, 11)
    assert tl.forward_start == (9, 11)
    assert tl.iteration_time == 12
    assert tl.forward_end(-1) == 3 and tl.forward_end(0) == 10.5
    # Link busy 10 + head tb[1] = 1 + tail after ag1 (forward of g1) = 1: the plan is tight.
    assert tl.link_busy == 10 and tl.lower_bound == 12


def test_merged_submission_pays_one_startup(make_problem):
    problem = make_problem(LAYERS)
    tl = simulate(problem, [(("rs", 1),), (("rs", 0), ("ag", 1))], [(("ag", 0),)])
    # rs1 1-3; rs0+ag1 from 3 costs 3 + 2 - 1 = 4 -> 7; ag0 7-10. g0 forward from 10
    # (+0.5 update) to 11.5; g1 (ready at 7) 11.5-12.5.
    assert tl.ends == (3, 7, 10)
    assert tl.forward_start == (10, 11.5)
    assert tl.iteration_time == 12.5


def test_ag_behind_rs_waits_for_next_rs(make_problem):
    problem = make_problem(LAYERS)
    tl = simulate(problem, [(("rs", 1),), (("ag", 1),), (("rs", 0),)], [(("ag", 0),)])
    # rs1 1-3, ag1 3-5, rs0 5-8, ag0 8-11; g0 11-12.5 (update included), g1 12.5-13.5.
    assert tl.starts == (1, 3, 5, 8)
    assert tl.iteration_time == 13.5
    assert tl.end_of[("ag", 1)] == 5


def test_wfbp_waits_for_all_allreduces(make_problem):
    problem = make_problem(LAYERS)
    tl = simulate(problem, [(("ar", 1),), (("ar", 0),)], sync_before_forward=True)
    # ar1 (cost 4) 1-5, ar0 (cost 6) 5-11; forward from 11: g0 to 12.5, g1 to 13.5.
    assert tl.ends == (5, 11)
    assert tl.forward_start == (11, 12.5)
    assert tl.iteration_time == 13.5
    # Busy 10 + head 1 + whole forward 2.5 = 13.5.
    assert tl.lower_bound == 13.5


def test_bytescheduler_priority_and_credit(make_problem):
    # g1: 4 bytes = 2 chunks of 2, ready at 1; g0: 2 bytes = 1 chunk, ready at 2. A chunk
    # of 2 bytes costs AR = 2 + 2 = 4. No update, tf = 1.
    problem = make_problem([(2, 1.0, 1.0, 0.0), (4, 1.0, 1.0, 0.0)])
    # Credit of one chunk: g0's chunk preempts g1's second chunk at t = 5.
    tl = simulate_bytescheduler(problem, partition=2, credit=2)
    assert [(s.label, s.start, s.end) for s in tl.link] == [
        ("AR1[1/2]", 1, 5), ("AR0[1/1]", 5, 9), ("AR1[2/2]", 9, 13)
    ]
    assert tl.iteration_time == 14  # g0 9-10, g1 waits to 13, 13-14
    # Credit of two chunks: both of g1's chunks are committed at t = 1, g0 goes last.
    tl = simulate_bytescheduler(problem, partition=2, credit=4)
    assert [s.label for s in tl.link] == ["AR1[1/2]", "AR1[2/2]", "AR0[1/1]"]
    assert tl.iteration_time == 15  # g0 13-14, g1 14-15


def test_global_lower_bound_by_hand(make_problem):
    problem = make_problem(LAYERS)
    # compute 3 + 2.5 = 5.5; link: min(AR 4+6, RS+AG 10 - one merge 1) = 9; head 1, tail 1.
    assert problem.compute_bound() == 5.5
    assert problem.lower_bound() == 11


def test_invalid_bytescheduler_parameters(make_problem):
    with pytest.raises(ValueError, match="partition and credit"):
        simulate_bytescheduler(make_problem(LAYERS), partition=0, credit=1)


def test_sharded_updates_run_in_step_before_their_all_gathers(make_problem):
    """[Note: sharded updates in the timeline] (issue 17), on the same groups."""
    from pipedap.planner.simulator import Problem

    plain = make_problem(LAYERS)
    problem = Problem(plain.profile, plain.cost, shard_update=True)
    tl = simulate(problem, [(("rs", 1),), (("rs", 0),)], [(("ag", 0),), (("ag", 1),)])
    # rs1 1-3, rs0 3-6; step(): update g0 6-6.5 (after rs0), g1 (u 0) at 6.5; ag0 6.5-9.5,
    # ag1 9.5-11.5; forward from 6.5: g0 waits for ag0 (9.5), no update, to 10.5; g1 11.5-12.5.
    assert tl.starts == (1, 3, 6.5, 9.5) and tl.ends == (3, 6, 9.5, 11.5)
    assert tl.forward_start == (9.5, 11.5) and tl.iteration_time == 12.5
    assert problem.compute_bound() == 3 + 0.5 + 2  # backward, the updates in step(), the forward
    assert ("U0", 6.0, 6.5) in tl.compute_spans() and ("F0", 9.5, 10.5) in tl.compute_spans()

"""A tied embedding reduced in two parts, as the planner sees it ([Note: split reductions in the timeline]).

Cost model: RS = AG = 1 + 0.5 M, AR = 2 + M, 4 workers. Groups (nbytes, tf, tb, u): g0 the tied
embedding (8 bytes: RS = AG = 5), g1 (2 bytes, tb 8), g2 the output layer (2 bytes, tb 1), so
ready[2] = 1, ready[1] = 9, ready[0] = 10. The tie sends no rows: its late all-gather is the
start-up of the shape exchange plus that of the rows, 2.
"""

from __future__ import annotations

import dataclasses

import pytest

from pipedap.planner import fusion, make_plan, schedules
from pipedap.planner.costmodel import AlphaBeta, CostModel
from pipedap.planner.plan import Plan, PlanError
from pipedap.planner.profile import OUTPUT_PIECES, Layer, Profile, Tie, elementwise_max
from pipedap.planner.simulator import Problem, interfered, simulate

HALF = AlphaBeta(1.0, 0.5)
COST = CostModel(4, rs=HALF, ag=HALF, ar=AlphaBeta(2.0, 1.0))
LAYERS = (Layer("emb", ("emb.weight",), 8, 1.0, 1.0), Layer("mid", ("mid.weight",), 2, 1.0, 8.0),
          Layer("out", ("out.bias",), 2, 1.0, 1.0))
TIE = Tie("emb.weight", "out.bias", 0)


def problem(ties=(TIE,), **options) -> Problem:
    return Problem(Profile(LAYERS, ties=ties), COST, **options)


def test_the_dense_part_goes_on_the_link_when_the_output_layer_is_ready():
    tl = simulate(problem(), *schedules.decoupled("FFF"))
    # rs2 1-3, rsd0 3-8 (ready at 1, before rs1 is issued at 9), rs1 9-11, rows of g0 11-13,
    # ag0 13-18, ag1 18-20, ag2 20-22; forward g0 18-19, g1 20-21, g2 22-23.
    assert tl.submissions == ((("rs", 2),), (("rsd", 0),), (("rs", 1),), (("rs", 0),), (("ag", 0),), (("ag", 1),),
                              (("ag", 2),))
    assert tl.starts == (1, 3, 9, 11, 13, 18, 20)
    assert tl.ends == (3, 8, 11, 13, 18, 20, 22)
    assert tl.iteration_time == 23
    # reduced whole: rs2 1-3, rs1 9-11, rs0 11-16, ag0 16-21, ag1 21-23, ag2 23-25; forward ends at 26
    assert simulate(problem(ties=()), *schedules.decoupled("FFF")).iteration_time == 26


def test_plans_hold_only_their_own_submissions_and_their_predicted_times():
    dear = schedules.dear(problem())
    plan = dear.to_plan()
    assert all(kind != "rsd" for sub in (*plan.backward, *plan.forward) for kind, _ in sub)
    assert plan.predicted.times == ((1, 3), (9, 11), (11, 13), (13, 18), (18, 20), (20, 22))
    assert plan.predicted.iteration_time == 23


def test_an_output_layer_without_parameters_is_the_first_group_ready_in_backward():
    assert problem(ties=(dataclasses.replace(TIE, user=""),)).split == {0: 2}


def test_where_the_runtime_reduces_it_whole_so_does_the_simulator():
    untied = problem(ties=())
    assert problem(shard_update=True).split == {}
    fused = Problem(fusion.fuse(Profile(LAYERS, ties=(TIE,)), ((0, 1), (2,))), COST)
    assert fused.split == {}  # not alone in its group
    assert problem(ties=(dataclasses.replace(TIE, user="emb.weight"),)).split == {}  # no earlier dense part
    wfbp, plain = schedules.wfbp(problem()), schedules.wfbp(untied)  # all-reduced whole
    assert wfbp.timeline.submissions == plain.timeline.submissions
    assert wfbp.iteration_time == plain.iteration_time


def test_the_rows_cost_what_every_rank_sends():
    rows = problem(ties=(dataclasses.replace(TIE, rows_bytes=3),))
    assert rows.costs["rs"][0] == pytest.approx(1 + 0.5 * 4 * 3 + 1)  # all-gather of 4 x 3 bytes + its shapes
    assert rows.costs["rsd"][0] == 5 and rows.dense_at == {1: [(1.0, 5.0)]}  # ready at 1, before rs1 (9)


def test_a_dense_part_sent_in_pieces_starts_during_the_output_layers_backward():
    # early 0.5 of g2's backward (0-1): ready at 0.5. Two pieces of 4 bytes (3 each) after their start-ups,
    # and the last piece ready 0.25 after the first: the link runs it 0.5-6.5, before rs2 (issued at 1).
    pieces = problem(ties=(dataclasses.replace(TIE, early=0.5, span=0.25, pieces=2),))
    assert pieces.dense_ready == {0: 0.5} and pieces.costs["rsd"][0] == 6 and pieces.link_start == 0.5
    tl = simulate(pieces, *schedules.decoupled("FFF"))
    assert tl.submissions[:3] == ((("rsd", 0),), (("rs", 2),), (("rs", 1),))
    assert tl.starts == (0.5, 6.5, 9, 11, 13, 18, 20)
    assert tl.iteration_time == 23
    slow = problem(ties=(dataclasses.replace(TIE, early=0.5, span=9.0, pieces=2),))
    assert slow.costs["rsd"][0] == 12  # the link waits for the last piece, then sends it
    assert problem(ties=(dataclasses.replace(TIE, early=5.0),)).dense_ready == {0: 0.0}  # not before g2's backward


def test_a_tie_with_negative_timing_or_no_pieces_is_refused():
    with pytest.raises(ValueError, match="early"):
        dataclasses.replace(TIE, early=-1.0)
    with pytest.raises(ValueError, match="pieces"):
        dataclasses.replace(TIE, pieces=0)
    with pytest.raises(ValueError, match="ties"):
        Profile.from_dict({**Profile(LAYERS).to_dict(), "ties": [{"param": "emb.weight", "user": "",
                                                                    "rows_bytes": 1, "span": "soon"}]})


def test_ties_round_trip_and_ranks_agree_on_the_most_rows(tmp_path):
    profile = Profile(LAYERS, ties=(TIE,))
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile
    assert "ties" not in Profile(LAYERS).to_dict()  # (the hashes of plans without ties stay what they were)
    assert "early" not in profile.to_dict()["ties"][0]  # (nor a whole dense part's keys)
    timed = Profile(LAYERS, ties=(dataclasses.replace(TIE, early=0.5, span=0.25, pieces=8),))
    timed.save(tmp_path / "t.json")
    assert Profile.load(tmp_path / "t.json") == timed
    more = Profile(LAYERS, ties=(dataclasses.replace(TIE, rows_bytes=7, early=0.25, span=0.5, pieces=8),))
    # every rank's rows fit, and the parts are ready when the latest rank has them
    assert elementwise_max([timed, more]).ties == (dataclasses.replace(TIE, rows_bytes=7, early=0.25, span=0.5,
                                                                       pieces=8),)
    with pytest.raises(ValueError, match="'ties' must be a list"):
        Profile.from_dict({**profile.to_dict(), "ties": [{"param": "emb.weight"}]})


def test_the_planner_splits_only_where_its_timeline_is_faster():
    plan = make_plan(Profile(LAYERS, ties=(TIE,)), COST, planner="dear", fusion="none")
    assert plan.split == (0,) and plan.predicted.iteration_time == 23
    costly = dataclasses.replace(TIE, rows_bytes=10)  # rows: 1 + 0.5 x 40 + 1 = 22 s, more than the split saves
    plan = make_plan(Profile(LAYERS, ties=(costly,)), COST, planner="dear", fusion="none")
    assert plan.split == () and plan.predicted.iteration_time == 26


def test_a_plan_carries_its_split_groups():
    plan = make_plan(Profile(LAYERS, ties=(TIE,)), COST, planner="optimal", fusion="none")
    assert plan.split == (0,)
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.digest() != dataclasses.replace(plan, split=()).digest()  # ranks agree on it
    assert plan.sharded().split == ()  # a sharded update reduces every bucket whole
    wfbp = schedules.wfbp(problem()).to_plan()
    with pytest.raises(PlanError, match="split lists group 0; only a reduce-scattered group"):
        dataclasses.replace(wfbp, split=(0,))
    with pytest.raises(PlanError, match="key 'split' must be a list of group indices"):
        Plan.from_json({**plan.to_dict(), "split": "0"})


# --- [Note: deferred all-gathers in the timeline] ---------------------------------------------------------

DEFERRABLE = dataclasses.replace(TIE, deferrable=True)
# g1's forward takes 10 s, and g0 updates for 0.5 s: time enough for g0's all-gather beside the forward
LONG = (dataclasses.replace(LAYERS[0], u=0.5), dataclasses.replace(LAYERS[1], tf=10.0), LAYERS[2])


def long_problem(**options) -> Problem:
    return Problem(Profile(LONG, ties=(DEFERRABLE,)), COST, **options)


def test_a_deferred_all_gather_waits_for_the_output_layer_and_the_lookup_for_its_rows():
    # undeferred: rs2 1-3, rsd0 3-8, rs1 9-11, rows of g0 11-13, ag0 13-18, ag1 18-20, ag2 20-22;
    # forward g0 18-19.5 (its update first), g1 20-30, g2 30-31.
    assert schedules.dear(long_problem()).iteration_time == 31
    deferred = schedules.dear(long_problem(defer=True))
    assert deferred.forward == ((("ag", 1),), (("ag", 2),), (("ag", 0),))
    tl = deferred.timeline
    # the fetch rf0 (its rows' cost, 2) right after the rows, 13-15; ag1 15-17; ag2 17-19; ag0 right behind it
    # 19-24. Forward g0 15-16 (no update), g1 17-27, g2 27-28.5: ag0 ended before, so g2 computes as usual, g0's
    # update (0.5) then its forward (1, the output layer's product: the tie's is unknown). What would have
    # waited for ag0: g0's update and the last of the 4 ranks' x 8 pieces of the product.
    assert tl.submissions[-4:] == ((("rf", 0),), (("ag", 1),), (("ag", 2),), (("ag", 0),))
    assert tl.starts[-4:] == (13, 15, 17, 19) and tl.ends[-4:] == (15, 17, 19, 24)
    assert tl.forward_start == (15, 17, 27) and tl.iteration_time == 28.5
    assert tl.problem.output_rest == {2: (0, 0.5 + 1 / (4 * OUTPUT_PIECES))}
    assert ("U2", 27, 27.5) in tl.compute_spans() and not any(label == "U0" for label, _, _ in tl.compute_spans())
    assert tl.lower_bound <= tl.iteration_time
    # the fast evaluation and the event simulation (no interference) agree, fetches included
    assert schedules._evaluate(tl.problem, "FFF")[0] == 28.5
    subs = (*tl.submissions,)
    event = interfered(tl.problem, subs, [tl.problem.submission_cost(s) for s in subs], False)
    assert event.starts == tl.starts and event.ends == tl.ends
    assert event.forward_start == tl.forward_start and event.iteration_time == tl.iteration_time


def test_the_plan_of_a_deferred_schedule_lists_it_and_only_its_own_submissions():
    plan = schedules.dear(long_problem(defer=True)).to_plan()
    assert plan.split == (0,) and plan.defer == (0,)
    assert all(kind in ("rs", "ag") for sub in (*plan.backward, *plan.forward) for kind, _ in sub)
    assert plan.predicted.times[-3:] == ((15, 17), (17, 19), (19, 24)) and plan.predicted.iteration_time == 28.5
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.digest() != dataclasses.replace(plan, defer=()).digest()  # ranks agree on it
    assert "defer" not in schedules.dear(long_problem()).to_plan().to_dict()
    with pytest.raises(PlanError, match="defer lists group 1; only a split group"):
        dataclasses.replace(plan, defer=(1,))
    with pytest.raises(PlanError, match="key 'defer' must be a list of group indices"):
        Plan.from_json({**plan.to_dict(), "defer": [True]})


def test_only_a_deferrable_tie_is_deferred_and_its_output_layer_keeps_its_all_gather_in_forward():
    deferring = long_problem(defer=True)
    assert deferring.deferred == {0: 2} and deferring.fixed_forward == {0, 2}
    assert deferring.chain_ag == [2, 2, 2 + 5]  # g0: its fetch; g2: both all-gathers
    assert Problem(Profile(LONG, ties=(TIE,)), COST, defer=True).deferred == {}  # the runtime cannot
    assert long_problem(defer=True, split=False).deferred == {}
    assert schedules.optimal(deferring).info["options"][2] == "F" and schedules.exhaustive(deferring).iteration_time \
        == pytest.approx(schedules.optimal(deferring).iteration_time)
    with pytest.raises(ValueError, match="the AG of group 2 must stay in the forward phase"):
        schedules.from_options(deferring, "moved", "FFB")
    with pytest.raises(ValueError, match="its ag is not in the forward list"):
        schedules.wfbp(deferring)  # all-reduced: nothing to defer (the search does not ask)
    # an output layer before the last group (BERT's decoder, before the next-sentence head)
    middle = Problem(Profile(LONG, ties=(dataclasses.replace(DEFERRABLE, user="mid.weight"),)), COST, defer=True)
    assert middle.deferred == {0: 1}
    tl = schedules.dear(middle).timeline
    assert tl.submissions[-4:] == ((("rf", 0),), (("ag", 1),), (("ag", 0),), (("ag", 2),))
    assert middle.output_rest == {1: (0, 0.5 + 10 / (4 * OUTPUT_PIECES))}  # (the product unknown: all of g1's)
    assert tl.forward_start[1] == tl.end_of[("ag", 1)] and tl.forward_start[0] == tl.end_of[("rf", 0)]
    assert tl.end_of[("ag", 0)] == 27 and tl.forward_ends[1] == 22 + 10.5  # ag0 ended before g1's last piece


def test_the_planner_defers_only_where_its_timeline_is_faster():
    plan = make_plan(Profile(LONG, ties=(DEFERRABLE,)), COST, planner="dear", fusion="none")
    assert plan.defer == (0,) and plan.predicted.iteration_time == 28.5
    # with g1's forward short, the lookup's fetch and the deferred all-gather cost more than they save:
    # deferred, the forward of g2 would wait for ag0 until 24 instead of ending at 23
    plan = make_plan(Profile(LAYERS, ties=(DEFERRABLE,)), COST, planner="dear", fusion="none")
    assert plan.split == (0,) and plan.defer == () and plan.predicted.iteration_time == 23


def test_the_output_layer_computes_beside_the_deferred_all_gather_all_but_its_last_piece():
    # g1's forward short, g2's long (2 s, of which the output layer's product is 1 s: the tie's 2 pieces
    # took 0.5 s apart). Link: rs2 1-3, rsd0 (2 pieces of 3) 3-9, rs1 9-11, rows 11-13, rf0 13-15, ag1
    # 15-17, ag2 17-19, ag0 19-24. Forward g0 15-16, g1 17-18, g2 from 19: all but g0's update (0.5) and the
    # last of the 4 ranks' x 8 pieces of the product (1/32), to 20.97; the rest from 24, to 24.53125. With
    # the product unknown all of g2's 2 s counts as product: its last piece is 1/16 (24.5625). With this
    # rank's rows only beside ag0 (the runtime before) 3/4 of the product waited: 25.25; merged into g2's
    # all-gather (before that) all of g2's forward: 26.5.
    assert OUTPUT_PIECES == 8
    layers = (dataclasses.replace(LAYERS[0], u=0.5), LAYERS[1], dataclasses.replace(LAYERS[2], tf=2.0))
    timed = dataclasses.replace(DEFERRABLE, pieces=2, span=0.5)
    assert timed.output_forward == 1.0
    for tie, rest, end in ((timed, 0.53125, 24.53125), (dataclasses.replace(timed, span=0.0), 0.5625, 24.5625)):
        problem = Problem(Profile(layers, ties=(tie,)), COST, defer=True)
        assert problem.output_rest == {2: (0, rest)}
        tl = schedules.dear(problem).timeline
        assert tl.ends[-4:] == (15, 17, 19, 24) and tl.forward_start == (15, 17, 19)
        assert tl.iteration_time == end and schedules._evaluate(problem, "FFF")[0] == end
        subs = (*tl.submissions,)
        event = interfered(problem, subs, [problem.submission_cost(s) for s in subs], False)
        assert event.iteration_time == end and event.forward_ends == tl.forward_ends
        assert tl.lower_bound == 24 + rest == problem.tail_after(("ag", 0)) + 24  # the link's end, then the rest
        assert schedules.optimal(problem).iteration_time == pytest.approx(schedules.exhaustive(problem).iteration_time)


def test_deferrable_ties_round_trip_and_every_rank_must_be_able_to_defer(tmp_path):
    profile = Profile(LAYERS, ties=(DEFERRABLE,))
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile
    assert "deferrable" not in Profile(LAYERS, ties=(TIE,)).to_dict()["ties"][0]
    assert elementwise_max([profile, Profile(LAYERS, ties=(TIE,))]).ties == (TIE,)
    with pytest.raises(ValueError, match="deferrable"):
        Profile.from_dict({**profile.to_dict(), "ties": [{**profile.to_dict()["ties"][0], "deferrable": "yes"}]})

"""make_plan: the one way a profile and a cost model become a plan, and the hash of what it was made from."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from pipedap.planner import PLANNABLE, Plan, PlanError, fusion, make_plan, schedules
from pipedap.planner.costmodel import from_link
from pipedap.planner.make import sharded_profile
from pipedap.planner.profile import Layer, Profile
from pipedap.planner.simulator import Problem

SIZES = [4_000_000, 100_000, 3_000_000, 50_000, 2_000_000, 10_000, 1_500_000, 700_000]


def _profile(tb: float = 0.004) -> Profile:
    return Profile(tuple(Layer(f"l{i}", (f"l{i}.w", f"l{i}.b"), m, tb / 2, tb, tb / 20) for i, m in enumerate(SIZES)),
                   {"model": "toy"})


COST = from_link(8, 1.25e8, 5e-4)


def test_same_inputs_give_the_same_plan_and_inputs_hash():
    first, second = make_plan(_profile(), COST), make_plan(_profile(), COST)
    assert first == second and first.digest() == second.digest()
    assert len(first.inputs_hash) == 64 and first.inputs_hash == second.inputs_hash
    assert first.world_size == COST.world_size and first.params == _profile().params


def _inputs_hash(profile: Profile | None = None, cost=COST, **options) -> str:
    return make_plan(profile or _profile(), cost, **options).inputs_hash


@pytest.mark.parametrize(
    "change",
    [
        {"cost": from_link(8, 1.25e9, 5e-4)},  # another cost model
        {"profile": _profile(tb=0.005)},  # other layer times
        {"planner": "pipedap"},
        {"fusion": "none"},
    ],
    ids=["cost", "profile", "planner", "fusion"],
)
def test_any_other_input_gives_another_hash(change):
    assert _inputs_hash(**change) != _inputs_hash()


def test_a_spec_and_the_groupings_it_stands_for_are_the_same_inputs():
    profile = _profile()
    by_spec = make_plan(profile, COST, fusion="search")
    by_groupings = make_plan(profile, COST, fusion=fusion.candidates(profile, COST))
    assert by_spec.inputs_hash == by_groupings.inputs_hash and by_spec.digest() == by_groupings.digest()


@pytest.mark.parametrize("planner", PLANNABLE)
def test_every_planner_is_reachable_and_runs_its_schedule(planner):
    profile = _profile()
    plan = make_plan(profile, COST, planner=planner, fusion="none")
    expected = fusion.PLANNERS[planner](Problem(fusion.fuse(profile, fusion.singletons(profile)), COST))
    assert plan.schedule == planner
    assert (plan.backward, plan.forward) == (expected.backward, expected.forward)
    assert plan.predicted.iteration_time == expected.iteration_time


@pytest.mark.parametrize(
    ("spec", "grouping"),
    [
        ("none", fusion.singletons),
        ("mgwfbp", lambda p: fusion.mgwfbp(p, COST)),
        ("threshold:4MB", lambda p: fusion.by_threshold(p, 4 * fusion.MB)),
        ("threshold:3100000", lambda p: fusion.by_threshold(p, 3_100_000)),
        ("count:3", lambda p: fusion.by_count(p, 3)),
    ],
)
def test_every_fixed_fusion_spec_gives_its_grouping(spec, grouping):
    profile = _profile()
    plan = make_plan(profile, COST, fusion=spec)
    expected = [tuple(p for i in group for p in profile.layers[i].params) for group in grouping(profile)]
    assert [g.params for g in plan.groups] == expected


def test_search_takes_the_best_candidate():
    profile = _profile()
    best = make_plan(profile, COST, fusion="search")
    each = [make_plan(profile, COST, fusion={name: g}) for name, g in fusion.candidates(profile, COST).items()]
    assert len(each) > 1
    assert best.predicted.iteration_time == min(p.predicted.iteration_time for p in each)


def test_tuned_fusion_is_reachable_and_seeded():
    pytest.importorskip("optuna")
    profile = _profile()
    plan = make_plan(profile, COST, planner="pipedap", fusion="tune:6")
    assert plan == make_plan(profile, COST, planner="pipedap", fusion="tune:6")
    threshold, value, _ = fusion.tune_threshold(profile, COST, trials=6)
    assert plan.predicted.iteration_time == value
    assert [g.nbytes for g in plan.groups] == [g.nbytes for g in fusion.fuse(profile, fusion.by_threshold(profile, threshold)).layers]


def test_bytescheduler_plan_is_its_tuned_simulation():
    plan = make_plan(_profile(), COST, planner="bytescheduler", fusion="none")
    problem = Problem(_profile(), COST)
    best = schedules.bytescheduler(problem)
    assert plan.schedule == "bytescheduler" and plan.backward == best.backward
    assert plan.predicted.iteration_time == best.iteration_time and dict(plan.chunks) == dict(best.chunks)
    assert all(n >= 2 for _, n in plan.chunks) and len(plan.backward) == sum(plan.pieces(g) for g in range(len(SIZES)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"planner": "mgwfbp"}, "planner 'mgwfbp' cannot make a plan; use one of optimal"),
        ({"fusion": "threshold:lots"}, "unknown fusion 'threshold:lots'; use search"),
        ({"fusion": {}}, "no fusion candidates"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_plan(_profile(), COST, **kwargs)


def test_the_inputs_hash_round_trips_and_old_files_without_it_still_load(tmp_path):
    plan = make_plan(_profile(), COST)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").inputs_hash == plan.inputs_hash
    old = plan.to_dict()
    del old["inputs_hash"]  # a plan file written before the field existed
    loaded = Plan.from_json(json.dumps(old))
    assert loaded.inputs_hash == "" and loaded.digest() == plan.digest()
    with pytest.raises(PlanError, match="key 'digest'"):  # the hash is provenance; the digest still guards the content
        Plan.from_json(json.dumps({**old, "digest": "0" * 64}))


def test_the_planner_stays_pure():
    """The planner imports no torch and nothing of the runtime: plans are made and tested anywhere."""
    code = ("import sys, pipedap.planner, pipedap.planner.make, pipedap.planner.fusion; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('pipedap.') "
            "and not m.startswith('pipedap.planner')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # what `import pipedap` itself loads: the log's rank prefix and the heap setting (pipedap/heap.py)
    assert result.stdout.strip() == "['pipedap.heap', 'pipedap.log']"


def test_a_plan_for_shard_update_has_dear_order_and_per_shard_update_times():
    """Issue 17: make_plan(shard_update=True) plans the fusion for the sharded timeline."""
    import dataclasses

    from pipedap.planner.profile import Layer, Profile

    layers = tuple(Layer(f"l{i}", (f"l{i}.w",), 4_000_000, 0.01, 0.02, 0.04) for i in range(6))
    profile, cost = Profile(layers), from_link(4, 1.25e8, 5e-5)
    plan = make_plan(profile, cost, planner="optimal", shard_update=True)
    assert plan.schedule == "dear" and plan.sharded() is plan  # every all-gather in the forward phase
    unsharded = make_plan(profile, cost, planner="dear")
    assert plan.inputs_hash != unsharded.inputs_hash
    # the sharded update of 1/4 of each bucket, in step(): faster than DeAR's whole updates in the forward
    assert plan.predicted.iteration_time < unsharded.predicted.iteration_time
    slower = make_plan(Profile(tuple(dataclasses.replace(layer, u=0.16) for layer in layers)), cost,
                       planner="dear", shard_update=True)
    assert slower.predicted.iteration_time > plan.predicted.iteration_time
    with pytest.raises(ValueError, match="a sharded plan has DeAR's order"):
        make_plan(profile, cost, planner="wfbp", shard_update=True)


def test_a_bucket_s_fixed_cost_is_charged_once_per_group_so_fusing_saves_it():
    """[Note: a bucket's fixed cost]: the H200 case, where a link that moves nothing made fusing look worthless."""
    costly = dataclasses.replace(_profile(), bucket_cost=1e-3)
    free_link = from_link(1, 1.25e10, 5e-4)  # one rank: the ring moves nothing
    apart = Problem(fusion.fuse(costly, fusion.singletons(costly)), free_link).compute_bound()
    together = Problem(fusion.fuse(costly, (tuple(range(len(SIZES))),)), free_link).compute_bound()
    assert apart - together == pytest.approx((len(SIZES) - 1) * 1e-3)
    assert len(make_plan(_profile(), free_link, fusion="none").groups) == len(SIZES)
    plan = make_plan(costly, free_link)
    assert len(plan.groups) == 1 and plan.predicted.iteration_time == pytest.approx(together)
    # Sharded, a rank's update is a shard's, but the fixed cost is per call: not divided by the world size.
    shards = Problem(sharded_profile(costly, COST.world_size), COST, shard_update=True)
    updates = sum(layer.u for layer in costly.layers) / COST.world_size
    assert shards.step_updates == pytest.approx(updates + len(SIZES) * 1e-3)

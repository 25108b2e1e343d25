"""Plan JSON: round trip, digest, and rejection of corrupt or mismatched files."""

from __future__ import annotations

import json

import pytest

from pipedap.planner import schedules
from pipedap.planner.plan import Group, Plan, PlanError

LAYERS = [(4, 1.0, 2.0, 0.5), (2, 1.0, 1.0, 0.0), (8, 0.5, 1.0, 0.0)]


@pytest.fixture
def plan(make_problem) -> Plan:
    problem = make_problem(LAYERS)
    schedule = schedules.from_options(problem, "pipedap", "FMB")
    return schedule.to_plan(inputs_hash="abc")


def test_round_trip(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path, params=["l0.weight", "l1.weight", "l2.weight"])
    assert loaded == plan
    assert loaded.digest() == plan.digest()


def test_json_layout(plan):
    doc = plan.to_dict()
    assert [s["ops"] for s in doc["backward"]] == [[["rs", 2]], [["ag", 2]], [["rs", 1]], [["rs", 0], ["ag", 1]]]
    assert [s["merged"] for s in doc["backward"]] == [False, False, False, True]
    assert [s["ops"] for s in doc["forward"]] == [[["ag", 0]]]
    assert doc["groups"][2] == {"index": 2, "name": "l2", "nbytes": 8, "params": ["l2.weight"]}
    assert doc["predicted"]["iteration_time"] == plan.predicted.iteration_time


def test_digest_covers_what_runs_not_predictions(plan, make_problem):
    doc = plan.to_dict()
    doc["predicted"]["iteration_time"] = 99.0
    doc["backward"][0]["start"] = 42.0
    assert Plan.from_json(json.dumps(doc)).digest() == plan.digest()
    other = schedules.from_options(make_problem(LAYERS), "pipedap", "FMF").to_plan()
    assert other.digest() != plan.digest()
    assert len(plan.digest()) == 64


def _corrupt(plan: Plan, edit) -> dict:
    doc = plan.to_dict()
    edit(doc)
    return doc


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=7), "key 'version' is 7"),
        (lambda d: d.pop("groups"), "key 'groups' is missing"),
        (lambda d: d.update(world_size="4"), "key 'world_size' is missing or not a int"),
        (lambda d: d["groups"][1].update(index=5), r"groups\[1\].index is 5"),
        (lambda d: d["groups"][0].update(params=[]), r"groups\[0\].params must be a non-empty list"),
        (lambda d: d["groups"][2].update(nbytes=-1), r"groups\[2\].nbytes must be a non-negative integer"),
        (lambda d: d["backward"][0].update(ops="rs2"), r"backward\[0\].ops must be a list"),
        (lambda d: d["backward"][0].update(ops=[["xx", 2]]), r"backward\[0\].ops\[0\] = \('xx', 2\)"),
        (lambda d: d["backward"][0].update(ops=[["rs", 9]]), r"backward\[0\].ops\[0\] names group 9"),
        (lambda d: d["forward"][0].update(ops=[["rs", 0]]), r"forward\[0\].ops\[0\] is 'rs'"),
        (lambda d: d["backward"].insert(0, d["backward"].pop(1)), r"backward\[0\].ops\[0\]: ag of group 2 is not after the rs"),
        (lambda d: d["forward"].clear(), r"group 0 has ops \['rs'\]"),
        (lambda d: d["groups"][0].update(nbytes=5), "key 'digest' is"),
        (lambda d: d.update(predicted={"iteration_time": "x"}), "key 'predicted' needs numeric"),
    ],
)
def test_corrupt_plans_are_rejected_naming_the_key(plan, edit, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(json.dumps(_corrupt(plan, edit)), where="p.json")


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"version": 1, "groups": [')
    with pytest.raises(PlanError, match="bad.json: not valid JSON"):
        Plan.load(path)
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(tmp_path / "missing.json")


def test_plan_for_another_model_is_rejected(plan):
    text = plan.to_json()
    with pytest.raises(PlanError, match=r"groups\[1\].params\[0\] = 'l1.weight' is not a parameter of the model"):
        Plan.from_json(text, params=["l0.weight", "fc.weight", "l2.weight"])
    with pytest.raises(PlanError, match="key 'groups' lacks 1 parameter.*'extra.bias'"):
        Plan.from_json(text, params=["l0.weight", "l1.weight", "l2.weight", "extra.bias"])


def test_duplicate_parameter_rejected(plan):
    doc = plan.to_dict()
    doc["groups"][2]["params"] = ["l0.weight"]
    del doc["digest"]
    with pytest.raises(PlanError, match=r"groups\[2\].params\[0\] = 'l0.weight' is already in groups\[0\].params\[0\]"):
        Plan.from_json(doc, params=["l0.weight", "l1.weight", "l2.weight"])


def test_bytescheduler_plan_runs_the_simulated_piece_order(make_problem, tmp_path):
    """The preemption case of test_bytescheduler_priority_and_credit: g0's piece overtakes g1's second."""
    problem = make_problem([(2, 1.0, 1.0, 0.0), (4, 1.0, 1.0, 0.0)])
    plan = schedules.bytescheduler(problem, partitions=(2,), credits=(1,)).to_plan()
    assert plan.schedule == "bytescheduler" and not plan.sync_before_forward and plan.forward == ()
    assert plan.backward == ((("ar", 1),), (("ar", 0),), (("ar", 1),)) and plan.chunks == ((1, 2),)
    assert (plan.pieces(0), plan.pieces(1)) == (1, 2) and plan.predicted.iteration_time == 14
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan and json.loads(path.read_text())["chunks"] == {"1": 2}
    doc = plan.to_dict()
    doc["chunks"] = {"1": 3}
    with pytest.raises(PlanError, match="group 1 is chunked in 3 pieces but has 2 backward 'ar' ops"):
        Plan.from_json(doc)


@pytest.mark.parametrize(("backward", "chunks", "message"), [
    ([(("ar", 1),), (("ar", 1),), (("ar", 0),)], (), r"repeats ar of group 1; each op is issued once"),
    ([(("ar", 1), ("ar", 1)), (("ar", 0),)], ((1, 2),), r"repeats ar of group 1; .*\(group 1 has 2 pieces\)"),
    ([(("ar", 1),), (("ar", 0),)], ((1, 1),), r"chunks: group 1 in 1 pieces"),
    ([(("ar", 1),), (("ar", 0),)], ((5, 2),), r"chunks: group 5 in 2 pieces"),
    ([(("rs", 1),), (("rs", 1),), (("ar", 0),)], ((1, 2),), r"repeats rs of group 1"),
])
def test_bad_chunked_plans_are_refused(backward, chunks, message):
    groups = (Group("a", ("a.w",), 8), Group("b", ("b.w",), 8))
    with pytest.raises(PlanError, match=message):
        Plan("bytescheduler", 2, groups, tuple(backward), (), chunks=chunks)


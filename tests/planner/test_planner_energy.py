"""pipedap.planner.energy: --power parsing, busy and idle time from a simulated iteration, the energy."""

from __future__ import annotations

import json

import pytest

from pipedap.planner import costmodel, energy, schedules
from pipedap.planner.profile import Layer, Profile
from pipedap.planner.simulator import Problem

POWERS = energy.Powers(energy.Power(300.0, 60.0), energy.Power(10.0, 5.0))


def test_pairs_and_json_give_the_same_powers(tmp_path):
    assert energy.parse_power("busy=300,idle=60,link_busy=10,link_idle=5") == POWERS
    assert energy.parse_power(" busy=300 , idle=60 ") == energy.Powers(energy.Power(300.0, 60.0))  # link: 0 W
    path = tmp_path / "powers.json"
    path.write_text(json.dumps(POWERS.to_dict()))
    assert energy.parse_power(str(path)) == POWERS
    assert energy.Powers.from_dict(POWERS.to_dict()) == POWERS


@pytest.mark.parametrize("text, message", [
    ("busy=300", "give both busy and idle (got only one)"),
    ("idle=60,busy=x", "busy='x' must be a number of watts >= 0"),
    ("busy=-1,idle=60", "busy='-1' must be a number of watts >= 0"),
    ("busy=nan,idle=60", "busy='nan' must be a number of watts >= 0"),
    ("busy=300,idle=60,link_busy=10", "give both link_busy and link_idle"),
    ("link_busy=10,link_idle=5", "the compute device's busy= and idle= are needed"),
    ("busy=300,idle=60,gpu=250", "'gpu=250' is not one of busy=W, idle=W, link_busy=W, link_idle=W"),
    ("300,60", "'300' is not one of busy=W"),
    ("/nonexistent/powers.json", "cannot read it as JSON"),
])
def test_a_bad_power_names_the_key_the_value_and_what_is_accepted(text, message):
    with pytest.raises(ValueError) as err:
        energy.parse_power(text)
    assert str(err.value).startswith(f"--power {text!r}: ") and message in str(err.value)
    assert "busy=W,idle=W" in str(err.value) or "number of watts" in str(err.value)


@pytest.mark.parametrize("document, message", [
    ({"link": {"busy": 1, "idle": 1}}, "the JSON needs a 'compute' entry"),
    ({"compute": {"busy": 1}}, "'compute' must be {\"busy\": W, \"idle\": W}"),
    ({"compute": {"busy": 1, "idle": 1}, "nic": {}}, "the JSON needs a 'compute' entry (and may have 'link')"),
    ([1, 2], "got list"),
])
def test_a_bad_power_file_says_what_it_needs(tmp_path, document, message):
    path = tmp_path / "powers.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="--power") as err:
        energy.parse_power(str(path))
    assert message in str(err.value)


def test_estimate_by_hand():
    e = energy.estimate(energy.Occupancy(2.0, 1.5, 0.5), POWERS, samples=8)
    assert e["compute"] == {"busy_s": 1.5, "idle_s": 0.5, "joules": 300 * 1.5 + 60 * 0.5}
    assert e["link"] == {"busy_s": 0.5, "idle_s": 1.5, "joules": 10 * 0.5 + 5 * 1.5}
    assert e["joules"] == pytest.approx(480 + 12.5) and e["joules_per_sample"] == pytest.approx(492.5 / 8)
    without = energy.estimate(energy.Occupancy(2.0, 1.5), None, samples=8)  # times only, no link
    assert set(without) == {"seconds", "compute"} and "joules" not in without["compute"]
    longer = energy.estimate(energy.Occupancy(1.0, 1.5, 0.2), POWERS, samples=1)  # busy > iteration: all busy
    assert longer["compute"] == {"busy_s": 1.0, "idle_s": 0.0, "joules": 300.0}
    with pytest.raises(ValueError, match="Occupancy.compute_busy_s = -1"):
        energy.Occupancy(1.0, -1)


def test_the_job_formula_agrees_with_one_workers_iteration():
    """Data parallelism: R ranks, B samples per rank in T seconds; the whole job's joules per sample
    from its throughput equal one worker's joules per iteration over its B samples."""
    ranks, batch, seconds, compute, link = 4, 8, 2.0, 1.5, 0.5
    worker = energy.estimate(energy.Occupancy(seconds, compute, link), POWERS, batch)
    job = energy.job_estimate(POWERS, ranks, ranks * batch / seconds, compute / batch, link / batch)
    assert job["joules_per_sample"] == pytest.approx(worker["joules_per_sample"])
    assert job["compute_busy_share"] == pytest.approx(0.75) and job["link_busy_share"] == pytest.approx(0.25)


def test_a_schedule_that_finishes_sooner_draws_less_for_the_same_busy_time():
    layers = tuple(Layer(f"l{i}", (f"l{i}.w",), 4_000_000, 0.002, 0.004, 0.0005) for i in range(8))
    problem = Problem(Profile(layers), costmodel.from_link(2, 125e6, 50e-6))
    wfbp, dear = schedules.wfbp(problem).timeline, schedules.dear(problem).timeline
    compute = sum(problem.tb) + sum(problem.w)  # every block on the compute stream, once
    slow, fast = energy.Occupancy.of_timeline(wfbp), energy.Occupancy.of_timeline(dear)
    assert slow.compute_busy_s == pytest.approx(compute) and fast.compute_busy_s == pytest.approx(compute)
    assert slow.link_busy_s == pytest.approx(fast.link_busy_s, rel=0.05)  # the same bytes
    assert fast.iteration_s < slow.iteration_s
    saved = energy.estimate(slow, POWERS, 8)["joules"] - energy.estimate(fast, POWERS, 8)["joules"]
    idle_w = POWERS.compute.idle_w + POWERS.link.idle_w
    assert saved == pytest.approx(idle_w * (slow.iteration_s - fast.iteration_s), rel=0.05)

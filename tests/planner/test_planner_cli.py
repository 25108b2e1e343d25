"""The planning CLI end to end on a profile file, and its error messages."""

from __future__ import annotations

import sys

import pytest

from pipedap.planner import costmodel
from pipedap.planner.plan import Plan
from pipedap.planner.profile import Layer, Profile
from pipedap.tools import plan as cli


@pytest.fixture
def profile_file(tmp_path):
    layers = tuple(Layer(f"l{i}", (f"l{i}.weight", f"l{i}.bias"), 2_000_000 + 100_000 * i, 0.002, 0.004, 0.0005)
                   for i in range(12))
    path = tmp_path / "profile.json"
    Profile(layers, {"model": "toy"}).save(path)
    return path


def test_plan_from_profile_file(profile_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, chart = tmp_path / "plan.json", tmp_path / "gantt.png"
    argv = ["--profile", str(profile_file), "--workers", "8", "--bandwidth", "1gbit", "--latency", "50us",
            "--out", str(out), "--gantt", str(chart)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("wfbp", "bytescheduler", "dear", "pipedap", "optimal", "lower bound", "done in"):
        assert name in printed
    plan = Plan.load(out, params=Profile.load(profile_file).params)
    assert plan.schedule == "optimal" and plan.world_size == 8
    assert chart.stat().st_size > 0


def test_power_adds_each_schedules_busy_idle_and_energy(profile_file, capsys):
    argv = ["--profile", str(profile_file), "--workers", "8", "--bandwidth", "1gbit", "--fusion", "none",
            "--batch-size", "4", "--power", "busy=300,idle=60"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "per worker and iteration (busy and idle ms; batch 4); powers compute 300/60 W, link 0/0 W" in printed
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines()
            if line.split() and line.split()[0] in ("wfbp", "dear") and len(line.split()) == 8}
    compute = 12 * (0.002 + 0.004 + 0.0005)  # the profile's blocks, the same under every schedule
    for iteration, busy, idle, _, _, joules, per_sample in rows.values():
        assert float(busy) == pytest.approx(compute * 1e3, abs=0.1) and float(iteration) == pytest.approx(
            float(busy) + float(idle), abs=0.2)
        assert float(joules) == pytest.approx(300 * float(busy) / 1e3 + 60 * float(idle) / 1e3, rel=2e-3)
        assert float(per_sample) == pytest.approx(float(joules) / 4, rel=2e-3)
    assert set(rows) == {"wfbp", "dear"}
    with pytest.raises(SystemExit):
        cli.main(["--profile", str(profile_file), "--workers", "8", "--bandwidth", "1gbit", "--power", "busy=1"])
    assert "--power 'busy=1': give both busy and idle" in capsys.readouterr().err


def test_interference_replaces_the_cost_models_and_slows_the_prediction(profile_file, tmp_path, capsys):
    predicted = {}
    for given in (None, "0.4", "40%"):
        out = tmp_path / f"plan{given}.json"
        argv = ["--profile", str(profile_file), "--workers", "2", "--bandwidth", "5gbit", "--fusion", "none",
                "--out", str(out), *(["--interference", given] if given else [])]
        assert cli.main(argv) == 0
        assert f"compute {0 if given is None else 40}% slower while the link is busy" in capsys.readouterr().out
        predicted[given] = Plan.load(out).predicted.iteration_time
    assert predicted["0.4"] == predicted["40%"] > predicted[None] * 1.05


def test_plan_with_cost_model_file_and_fixed_fusion(profile_file, tmp_path):
    cost = tmp_path / "cost.json"
    costmodel.save(costmodel.from_link(4, 1.25e9, 1e-5), cost)
    out = tmp_path / "plan.json"
    argv = ["--profile", str(profile_file), "--cost-model", str(cost), "--workers", "4",
            "--fusion", "count:3", "--schedule", "dear", "--out", str(out)]
    assert cli.main(argv) == 0
    plan = Plan.load(out)
    assert plan.schedule == "dear" and len(plan.groups) == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "4", "--bandwidth", "1gbit", "--fusion", "magic"], "unknown fusion 'magic'"),
        (["--workers", "16", "--cost-model", "missing.json"], "cannot read cost-model JSON"),
    ],
)
def test_errors_are_reported(profile_file, extra, message, capsys):
    assert cli.main(["--profile", str(profile_file), *extra]) == 2
    assert message in capsys.readouterr().err


def test_workers_required(profile_file):
    with pytest.raises(SystemExit):
        cli.main(["--profile", str(profile_file), "--bandwidth", "1gbit"])


def test_model_without_models_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "models", None)  # makes `import models` fail
    assert cli.main(["--model", "resnet50", "--workers", "2", "--bandwidth", "1gbit"]) == 2
    assert "--model needs torch and the models package" in capsys.readouterr().err


def test_outputs_go_into_folders_that_do_not_exist_yet(profile_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out" / "sub"
    argv = ["--profile", str(profile_file), "--workers", "8", "--bandwidth", "1gbit", "--fusion", "none",
            "--out", str(out / "plan.json"), "--gantt", str(out / "plan.png")]
    assert cli.main(argv) == 0
    assert (out / "plan.json").is_file() and (out / "plan.png").is_file()


def test_shard_update_plans_dear_order_for_the_sharded_timeline(profile_file, tmp_path, capsys):
    """Issue 17: --shard-update writes a plan DistributedOptimizer(shard_update=True) runs as it is."""
    out = tmp_path / "plan.json"
    assert cli.main(["--profile", str(profile_file), "--workers", "4", "--bandwidth", "1gbit", "--shard-update",
                 "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.schedule == "dear" and plan.sharded() is plan
    assert "(sharded update)" in capsys.readouterr().out

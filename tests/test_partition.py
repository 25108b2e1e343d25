"""The pipeline partitioner: chains of modules, the dynamic programme, the generated stage packages."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from models import sequential
from pipedap.pipeline import partition as P
from pipedap.pipeline.config import PipelineConfig, PipelineConfigError
from pipedap.pipeline.runtime import module_list
from pipedap.tools import partition as tool

ROOT = Path(__file__).resolve().parents[1]


def random_costs(seed: int, n: int):
    """A stage time that is compute over replicas plus a random synchronisation cost, and random boundaries."""
    rng = random.Random(seed)
    compute = [rng.uniform(0.1, 2.0) for _ in range(n)]
    sync = {}
    boundary = [rng.uniform(0.0, 1.5) for _ in range(n)]

    def stage_time(i: int, j: int, m: int) -> float:
        if m > 1 and (i, j, m) not in sync:
            sync[i, j, m] = rng.uniform(0.0, 1.0) * (j - i)
        return (sum(compute[i:j]) + sync.get((i, j, m), 0.0)) / m

    return stage_time, boundary.__getitem__


@pytest.mark.parametrize("parallelism", P.PARALLELISMS)
def test_the_programme_finds_what_exhaustive_search_finds(parallelism):
    checked = 0
    for seed in range(40):
        for n in range(1, 7):
            for workers in range(1, 5):
                if parallelism == "pipeline" and workers > n:
                    continue
                stage_time, boundary = random_costs(seed * 100 + n * 10 + workers, n)
                got = P.best_partition(n, workers, stage_time, boundary, parallelism)
                assert got.workers == workers
                assert got.stages[0].start == 0 and got.stages[-1].end == n
                assert all(a.end == b.start for a, b in zip(got.stages, got.stages[1:]))
                assert got.seconds == pytest.approx(P.exhaustive_partition(n, workers, stage_time, boundary,
                                                                           parallelism), rel=1e-12)
                checked += 1
    assert checked > 500


def test_a_slow_boundary_keeps_the_modules_on_one_stage_and_a_fast_one_splits_them():
    compute = [1.0, 1.0, 1.0, 1.0]

    def stage_time(i, j, m):
        return sum(compute[i:j]) / m + (0.0 if m == 1 else 5.0)  # replicas pay a heavy synchronisation

    slow = P.best_partition(4, 2, stage_time, lambda i: 10.0, "hybrid")
    fast = P.best_partition(4, 2, stage_time, lambda i: 0.1, "hybrid")
    assert [(s.start, s.end, s.replicas) for s in fast.stages] == [(0, 2, 1), (2, 4, 1)]
    assert len(slow.stages) == 1 and slow.stages[0].replicas == 2 and slow.seconds == pytest.approx(7.0)


def test_a_partition_names_its_configs():
    result = P.best_partition(4, 3, lambda i, j, m: (j - i) / m, lambda i: 0.0, "pipeline")
    assert result.kind() == "pipeline"
    assert result.module_to_stage_map() == [0, 1, 2, 2]
    assert result.stage_to_rank_map() == {"0": [0], "1": [1], "2": [2]}
    PipelineConfig.load({"module_to_stage_map": result.module_to_stage_map(),
                         "stage_to_rank_map": result.stage_to_rank_map()}).validate(4, 3)


@pytest.mark.parametrize("args, message", [
    ((3, 4, "pipeline"), "a pipeline of 4 stages needs at least 4 modules"),
    ((3, 2, "diagonal"), "parallelism 'diagonal'"),
    ((0, 2, "hybrid"), "need at least one module"),
])
def test_impossible_partitions_are_refused(args, message):
    n, workers, parallelism = args
    with pytest.raises(ValueError, match=message):
        P.best_partition(n, workers, lambda i, j, m: 1.0, lambda i: 0.0, parallelism)


def test_a_replicated_stage_is_priced_by_pipedaps_planner():
    modules = [P.ModuleCost(f"m{i}", 0.01, 0.02, 1000, 4_000_000) for i in range(4)]
    fast = P.Costs(modules, bandwidth=1e12, latency=0.0)
    slow = P.Costs(modules, bandwidth=1e6, latency=0.0)
    assert fast.stage_time(0, 4, 1) == pytest.approx(0.12)
    assert fast.stage_time(0, 4, 2) == pytest.approx(0.06, rel=0.01)  # free link: half the minibatches each
    # 16 MB of gradients over 1 MB/s: the synchronisation (and so the stage) takes seconds
    assert slow.stage_time(0, 4, 2) > 5.0
    assert fast.boundary_time(0) == pytest.approx(2 * 1000 / 1e12)


def test_measuring_a_chain_gives_times_and_sizes():
    chain = [("a", nn.Linear(8, 16)), ("b", nn.ReLU()), ("c", nn.Linear(16, 4))]
    costs = P.measure(chain, torch.randn(5, 8), iterations=2)
    assert [c.label for c in costs] == ["a", "b", "c"]
    assert [c.output_bytes for c in costs] == [5 * 16 * 4, 5 * 16 * 4, 5 * 4 * 4]
    assert [c.param_bytes for c in costs] == [(8 * 16 + 16) * 4, 0, (16 * 4 + 4) * 4]
    assert all(c.forward > 0 and c.backward > 0 for c in costs)
    assert all(p.grad is None for _, m in chain for p in m.parameters())
    assert costs[0].update > 0 and costs[1].update == 0 and costs[2].update > 0  # the optimizer step: modules with parameters
    assert costs[0].compute == costs[0].forward + costs[0].backward + costs[0].update


def test_the_update_counts_in_a_stage_and_moves_the_cut():
    """A module whose parameters take long to update (VGG-16's classifier) makes its stage slow: the cut moves
    work away from it. An update_seconds step leaves the parameters as they were."""
    modules = [P.ModuleCost(f"m{i}", 0.5, 1.0, 1000, 8) for i in range(4)] + [P.ModuleCost("fc", 0.5, 1.0, 1000, 8, 4.0)]
    costs = P.Costs(modules, bandwidth=1e12, latency=0.0)
    best = P.best_partition(len(modules), 2, costs.stage_time, costs.boundary_time, "pipeline")
    assert [(st.start, st.end) for st in best.stages] == [(0, 4), (4, 5)] and best.seconds == pytest.approx(6.0)
    plain = P.Costs([P.ModuleCost(m.label, m.forward, m.backward, m.output_bytes, m.param_bytes) for m in modules],
                    bandwidth=1e12, latency=0.0)
    unaware = P.best_partition(5, 2, plain.stage_time, plain.boundary_time, "pipeline")
    assert unaware.seconds == pytest.approx(4.5) and unaware.stages[0].end < 4  # balanced on forward + backward
    assert costs.stage_time(unaware.stages[1].start, 5, 1) >= 7.0  # which leaves the update's stage at 7 s or more
    layer = nn.Linear(4, 4)
    layer(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in layer.parameters()]
    assert P.update_seconds(layer, iterations=2) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_a_stage_computes_slower_beside_its_boundaries_transfers_and_the_cut_seeks_a_small_boundary():
    """[Note: a stage beside its transfers]: c + σ min(c, T), T both ways of the boundaries around the stage. Two
    cuts of nearly equal compute: without interference the balanced one wins, with it the one whose activation
    is 100x smaller (VGG-16's pooling layer)."""
    modules = [P.ModuleCost("conv", 0.5, 0.5, 100_000_000, 8), P.ModuleCost("pool", 0.02, 0.03, 1_000_000, 0),
               P.ModuleCost("fc", 0.4, 0.5, 4_000, 8)]
    plain = P.Costs(modules, bandwidth=200e6, latency=0.0)
    aware = P.Costs(modules, bandwidth=200e6, latency=0.0, interference=0.5)
    assert aware.transfers(0, 1) == pytest.approx(1.0) and aware.transfers(1, 2) == pytest.approx(1.01)
    assert aware.transfers(0, 3) == 0.0  # one stage: nothing crosses a boundary
    assert aware.stage_time(0, 1, 1) == pytest.approx(1.0 + 0.5 * 1.0)
    assert aware.stage_time(2, 3, 1) == pytest.approx(0.9 + 0.5 * 0.01)
    assert aware.stage_time(1, 2, 1) == pytest.approx(0.05 + 0.5 * 0.05)  # capped at its compute
    assert aware.stage_time(0, 3, 1) == plain.stage_time(0, 3, 1) == pytest.approx(1.95)
    assert aware.stage_time(0, 1, 2) == pytest.approx(plain.stage_time(0, 1, 2) + 0.5 * 1.0 / 2)  # a replica's share
    cuts = {}
    for name, costs in (("plain", plain), ("aware", aware)):
        best = P.best_partition(3, 2, costs.stage_time, costs.boundary_time, "pipeline")
        cuts[name] = (best.stages[0].end, best.seconds)
    assert cuts["plain"] == (1, pytest.approx(1.0)) and cuts["aware"] == (2, pytest.approx(1.055))
    with pytest.raises(ValueError, match="interference -0.1: expected a number >= 0"):
        P.Costs(modules, bandwidth=1.0, latency=0.0, interference=-0.1)


@pytest.mark.parametrize("name", sequential.names())
def test_each_chain_computes_what_its_model_computes(name):
    torch.manual_seed(0)
    model = models.get(name, num_classes=10).eval()
    side = max(32, models.info(name).min_input_size)
    x = torch.randn(2, 3, side, side)
    y = x
    with torch.no_grad():
        for _, module in sequential.chain(name, model):
            y = module(y)
        assert torch.equal(y, model(x))


def test_no_chain_entry_starts_with_an_in_place_operation():
    for name in sequential.names():
        for label, module in sequential.chain(name):
            first = next(iter(module)) if isinstance(module, nn.Sequential) and len(module) else module
            assert not getattr(first, "inplace", False), (name, label)


@pytest.mark.parametrize("name", ["gpt2", "bert_base", "bert_large"])
def test_the_language_models_are_not_chains_and_it_says_why(name):
    with pytest.raises(sequential.NotAChainError, match=rf"{name} is not a chain of modules: .*tied"):
        sequential.chain(name)


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_the_committed_two_stage_packages_compute_what_the_whole_model_computes(name):
    package = importlib.import_module(f"models.{name}.gpus=2")
    torch.manual_seed(0)
    staged = package.model(nn.CrossEntropyLoss(), num_classes=10)
    assert [entry[1:] for entry in staged] == [(["input0"], ["out0"]), (["out0"], ["out1"]), (["out1"], ["loss"])]
    torch.manual_seed(0)
    whole = models.get(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(nn.Sequential(*module_list(staged)[:-1]).eval()(x), whole.eval()(x))
    here = Path(package.__file__).parent
    for conf, world in (("mp_conf.json", 2), ("dp_conf.json", 2), ("hybrid_conf.json", 3)):
        PipelineConfig.load(here / conf).validate(len(staged), world)
    record = json.loads((here / "partition.json").read_text())
    assert record["model"] == name and record["workers"] == 2 and len(record["stages"]) == 2


def test_a_stage_list_that_is_not_a_chain_is_refused_naming_the_entry():
    entries = [(nn.Identity(), ["input0"], ["out0", "out1"]), (nn.MSELoss(), ["out0", "out1"], ["loss"])]
    with pytest.raises(PipelineConfigError, match=r"model entry 0 takes \['input0'\] and returns \['out0', 'out1'\]"):
        module_list(entries)
    with pytest.raises(PipelineConfigError, match=r"model entry 1 takes \['out9'\]"):
        module_list([(nn.Identity(), ["input0"], ["out0"]), (nn.MSELoss(), ["out9"], ["loss"])])


def test_a_package_whose_model_changed_says_to_regenerate():
    with pytest.raises(sequential.NotAChainError, match="regenerate it"):
        sequential.stage_modules("resnet50", [["conv1"], ["fc"]], nn.CrossEntropyLoss())


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"generated_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("parallelism, conf", [("pipeline", "mp_conf.json"), ("data", "dp_conf.json")])
def test_the_tool_writes_a_package_that_loads_and_configs_that_fit_it(tmp_path, capsys, parallelism, conf):
    costs = ROOT / "models" / "vgg16" / "gpus=2" / "partition.json"
    out = tmp_path / "pkg"
    assert tool.main(["--model", "vgg16", "--workers", "2", "--bandwidth", "125mbit", "--costs", str(costs),
                      "--parallelism", parallelism, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pipeline:" in printed and f"wrote {out / conf}" in printed
    staged = _import(out / "__init__.py").model(nn.CrossEntropyLoss(), num_classes=10)
    PipelineConfig.load(out / conf).validate(len(staged), 2)
    PipelineConfig.load(out / "dp_conf.json").validate(len(staged), 2)
    record = json.loads((out / "partition.json").read_text())
    assert record["parallelism"] == parallelism and record["command"].startswith("python -m pipedap.tools.partition")
    assert len(record["stages"]) == (2 if parallelism == "pipeline" else 1)


def test_the_tool_refuses_a_language_model_naming_why(tmp_path, capsys):
    assert tool.main(["--model", "gpt2", "--workers", "2", "--bandwidth", "1gbit", "--out", str(tmp_path)]) == 2
    assert "gpt2 is not a chain of modules" in capsys.readouterr().err


def test_the_tool_measures_when_given_no_costs(tmp_path, monkeypatch, capsys):
    """A small image keeps the measurement short; the package still loads."""
    monkeypatch.setattr(sys, "argv", ["partition"])
    out = tmp_path / "r"
    assert tool.main(["--model", "resnet50", "--workers", "2", "--bandwidth", "1gbit", "-b", "2", "--image-size",
                      "32", "--iterations", "1", "--parallelism", "hybrid", "--out", str(out)]) == 0
    record = json.loads((out / "partition.json").read_text())
    assert len(record["modules"]) == len(sequential.chain("resnet50"))
    assert all(m["forward"] > 0 for m in record["modules"])



def pipeline_costs(forward, backward, output_mb):
    """Costs of one module per stage on a 125 Mbit/s link, and the partition with a stage per module."""
    modules = [P.ModuleCost(f"m{i}", f, b, int(output_mb * 1e6), 1000) for i, (f, b) in enumerate(zip(forward,
                                                                                                       backward))]
    cost = P.Costs(modules, bandwidth=125e6 / 8, latency=0.0)
    stages = tuple(P.Stage(i, i + 1, 1, cost.stage_time(i, i + 1, 1)) for i in range(len(modules)))
    return cost, P.Partition(stages, tuple(cost.boundary_time(i) for i in range(len(modules) - 1)))


def test_the_recommended_units_cover_the_round_trip_and_reach_the_period():
    """Random two- and three-stage pipelines: never fewer units than stage 0's round trip over the period
    (a unit cannot come back sooner), the fewest that reach the period, and PipeDream's count where
    the transfers are negligible."""
    rng = random.Random(7)
    for case in range(24):
        stages = 2 + case % 2
        forward, backward = [rng.uniform(0.1, 1.0) for _ in range(stages)], [rng.uniform(0.2, 2.0) for _ in range(stages)]
        cost, result = pipeline_costs(forward, backward, rng.uniform(0.0, 30.0))
        extra = cost.extra_in_flight(result)
        trip = sum(forward) + sum(backward) + sum(result.boundaries)
        assert stages + extra * (stages - 1) >= math.ceil(trip / result.seconds * (1 - 0.01))
        one_way = [b / 2 for b in result.boundaries]
        assert P.one_f_one_b_period(forward, backward, one_way, extra) <= result.seconds * 1.01
        if extra:
            assert P.one_f_one_b_period(forward, backward, one_way, extra - 1) > result.seconds * 1.01
        _, quick = pipeline_costs(forward, backward, 0.0)
        assert cost.extra_in_flight(quick) == 0


@pytest.mark.parametrize("forward, backward, output_mb, expected", [
    ([0.70, 0.66], [1.36, 1.34], 12.8, 1),  # ResNet-50's two stages at 125 Mbit/s: 1.64 s of transfers
    ([0.70, 0.66], [1.36, 1.34], 0.1, 0),   # a small boundary: PipeDream's count covers it
    # Three stages, the middle one the slowest: 1 extra per later stage (5, 3, 1 in flight).
    # The same extra on every stage (4, 3, 1) left it 15% slow at any count: stage 1 waited
    # for activations that stage 0 forwards only after a backward.
    ([0.4, 0.5, 0.3], [0.8, 1.0, 0.6], 6.0, 1),
    ([0.4, 0.5, 0.3], [0.8, 1.0, 0.6], 0.05, 0),
])
def test_the_extra_units_in_flight_it_recommends_are_the_fewest_that_reach_the_period(forward, backward,
                                                                                      output_mb, expected):
    cost, result = pipeline_costs(forward, backward, output_mb)
    extra = cost.extra_in_flight(result)
    assert extra == expected
    one_way = [b / 2 for b in result.boundaries]
    assert P.one_f_one_b_period(forward, backward, one_way, extra) <= result.seconds * 1.01
    if extra:
        assert P.one_f_one_b_period(forward, backward, one_way, extra - 1) > result.seconds * 1.01


def test_replicated_stages_get_no_recommendation():
    cost, _ = pipeline_costs([0.5, 0.5], [1.0, 1.0], 10.0)
    hybrid = P.Partition((P.Stage(0, 1, 2, 1.0), P.Stage(1, 2, 1, 1.5)), (1.0,))
    assert cost.extra_in_flight(hybrid) is None

"""The pipeline runtime's parts that need no MPI: configs, schedules, tags, weight stashing, start-up checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipedap.pipeline import communication, schedules, stashing, transport
from pipedap.pipeline.config import PipelineConfig, PipelineConfigError
from pipedap.pipeline.runtime import StageModule, StageRuntime, micro_batch

sys.path.insert(0, str(Path(__file__).parent / "mpi_scripts"))
from pipeline_reference import stage_orders  # noqa: E402

HYBRID = {"module_to_stage_map": [0, 0, 1, 1, 1], "stage_to_rank_map": {"0": [0, 1], "1": [2]}}


def config(stage_map, ranks) -> PipelineConfig:
    return PipelineConfig.load({"module_to_stage_map": stage_map,
                                "stage_to_rank_map": {str(s): r for s, r in ranks.items()}})


# --- configs ---------------------------------------------------------------------


def test_a_config_loads_from_json_and_answers_queries(tmp_path):
    path = tmp_path / "hybrid_conf.json"
    path.write_text(json.dumps(HYBRID))
    c = PipelineConfig.load(path)
    c.validate(num_modules=5, world_size=3)
    assert c.num_stages == 2 and c.ranks(0) == (0, 1) and c.stage_of(2) == 1
    assert c.modules_of(0) == [0, 1] and c.modules_of(1) == [2, 3, 4]
    assert [c.rank_for(0, j) for j in range(4)] == [0, 1, 0, 1] and c.rank_for(1, 3) == 2
    assert c.to_dict() == HYBRID and PipelineConfig.load(c) is c


@pytest.mark.parametrize("stage_map, ranks, modules, world, message", [
    ([0, 0, 1, 1], {0: [0], 1: [1]}, 5, 2,
     r"'module_to_stage_map' has 4 entries but the model has 5 modules \(the last one is the loss\)"),
    ([0, 0, 1, 1, 1], {0: [0], 1: [1]}, 5, 3, r"places 2 ranks \(0, 1\) but the job has 3; start it with mpirun -np 2"),
    ([0, 0, 1, 1, 1], {0: [0], 1: [2]}, 5, 2, r"rank 1 has no stage \(ranks placed: 0, 2\)"),
    ([0, 0, 1, 1, 1], {0: [0, 1]}, 5, 2, r"stage 1 has no rank; add \"1\": \[rank\]"),
    ([0, 0, 1, 1, 1], {0: [0], 1: []}, 5, 1, r"stage 1 has no rank"),
    ([0, 0, 1, 1, 1], {0: [0], 1: [1], 2: [2]}, 5, 3, r"names stage 2, but 'module_to_stage_map' has stages 0..1"),
    ([0, 0, 2, 2, 2], {0: [0], 2: [1]}, 5, 2, r"stage 1 has no module"),
    ([0, 1, 0, 1, 1], {0: [0], 1: [1]}, 5, 2, r"module 2 is on stage 0 after a module on stage 1"),
    ([0, 0, 1, 1, 1], {0: [0, 1], 1: [1]}, 5, 2, r"rank 1 is in stage 1 and also in stage 0"),
])
def test_a_bad_config_names_the_key_stage_or_rank_and_the_fix(stage_map, ranks, modules, world, message):
    with pytest.raises(PipelineConfigError, match=message):
        config(stage_map, ranks).validate(modules, world)


# a malformed config (its keys and values): tests/test_bad_input.py


def test_an_unreadable_config_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(PipelineConfigError, match="broken.json: cannot read the pipeline config"):
        PipelineConfig.load(path)


# --- schedules -------------------------------------------------------------------


def order(schedule, c, stage, replica, n, m=1, extra=0) -> list[str]:
    return [e.kind[0].upper() + ("" if e.unit < 0 else str(e.unit))
            for e in schedules.events(schedule, c, stage, replica, n, m, extra)]


def test_1f1b_admits_s_minus_s_units_then_alternates_and_steps_after_each_backward():
    c = config([0, 1, 2, 2], {0: [0], 1: [1], 2: [2]})
    assert [schedules.admitted(c, s) for s in range(3)] == [3, 2, 1]
    assert order("1f1b", c, 0, 0, 5) == ["F0", "F1", "F2", "B0", "S", "F3", "B1", "S", "F4", "B2", "S", "B3", "S",
                                         "B4", "S"]
    assert order("1f1b", c, 2, 0, 3) == ["F0", "B0", "S", "F1", "B1", "S", "F2", "B2", "S"]
    # the same per-stage order as the test's independent reference
    for s in range(3):
        ours = [(e.kind[0].upper(), e.unit) for e in schedules.events("1f1b", c, s, 0, 7) if e.kind != "step"]
        assert ours == stage_orders(3, 7)[s]
    assert schedules.stashes_weights("1f1b", c, 0) and not schedules.stashes_weights("1f1b", c, 2)
    assert not schedules.stashes_weights("flush", c, 0)


def test_extra_in_flight_admits_more_units_per_later_stage():
    c = config([0, 1, 2, 2], {0: [0], 1: [1], 2: [2]})
    assert [schedules.admitted(c, s, 2) for s in range(3)] == [7, 4, 1]
    assert order("1f1b", c, 1, 0, 6, extra=1) == ["F0", "F1", "F2", "B0", "S", "F3", "B1", "S", "F4", "B2", "S", "F5", "B3",
                                          "S", "B4", "S", "B5", "S"]
    for s in range(3):
        ours = [(e.kind[0].upper(), e.unit) for e in schedules.events("1f1b", c, s, 0, 7, 1, 1) if e.kind != "step"]
        assert ours == stage_orders(3, 7, extra=1)[s]
    hybrid = PipelineConfig.load(HYBRID)  # stage 0 on 2 ranks: PipeDream's 2, plus 1
    assert schedules.admitted(hybrid, 0, 1) == 3 and schedules.admitted(hybrid, 1, 1) == 1
    two = config([0, 1, 1], {0: [0], 1: [1]})
    assert schedules.stashes_weights("1f1b", two, 0, 1) and not schedules.stashes_weights("1f1b", two, 1, 1)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_extra_in_flight_must_be_a_count(bad):
    c = config([0, 1, 1], {0: [0], 1: [1]})
    with pytest.raises(ValueError, match="extra_in_flight must be an int >= 0"):
        schedules.check("1f1b", c, 1, bad)


@pytest.mark.parametrize("schedule, micro", [("flush", 2), ("no_pipelining", 1)])
def test_extra_in_flight_is_refused_outside_1f1b(schedule, micro):
    c = config([0, 1, 1], {0: [0], 1: [1]})
    with pytest.raises(ValueError, match=f"extra_in_flight=1 admits more units under 1F1B; schedule '{schedule}'"):
        schedules.check(schedule, c, micro, 1)


def test_no_pipelining_runs_one_unit_at_a_time_and_flush_steps_once_per_minibatch():
    c = config([0, 1, 1], {0: [0], 1: [1]})
    assert order("no_pipelining", c, 0, 0, 2) == ["F0", "B0", "S", "F1", "B1", "S"]
    assert order("flush", c, 0, 0, 2, 3) == ["F0", "F1", "B0", "F2", "B1", "B2", "S", "F3", "F4", "B3", "F5", "B4",
                                             "B5", "S"]
    assert schedules.backward_passes_per_step("flush", c, 0, 3) == 3
    assert schedules.backward_passes_per_step("1f1b", c, 0, 1) == 1


def test_replicas_take_units_round_robin_and_accumulate_their_share():
    c = PipelineConfig.load(HYBRID)
    assert schedules.admitted(c, 0) == 2 and schedules.admitted(c, 1) == 1  # PipeDream's counts
    assert order("flush", c, 0, 1, 1, 4) == ["F1", "F3", "B1", "B3", "S"]
    assert order("flush", c, 1, 0, 1, 4) == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3", "S"]
    assert order("no_pipelining", c, 0, 1, 4) == ["F1", "B1", "S", "F3", "B3", "S"]
    assert schedules.backward_passes_per_step("flush", c, 0, 4) == 2
    assert schedules.backward_passes_per_step("flush", c, 1, 4) == 4


def test_a_schedule_refuses_what_it_cannot_run():
    c = PipelineConfig.load(HYBRID)
    with pytest.raises(ValueError, match="unknown pipeline schedule 'gpipe'"):
        schedules.check("gpipe", c, 1)
    with pytest.raises(ValueError, match="micro_batches=4 needs schedule='flush'"):
        schedules.check("1f1b", c, 4)
    with pytest.raises(ValueError, match="stage 0 has 2 replicas, which do not share micro_batches=3"):
        schedules.check("flush", c, 3)
    with pytest.raises(ValueError, match="num_minibatches must be a multiple of 2, got 5"):
        schedules.check_length("1f1b", c, 5)
    schedules.check_length("flush", c, 5)


# --- tags, micro-batches, stashing -----------------------------------------------


def test_tags_are_distinct_per_unit_and_kind_and_stay_below_mpis_bound():
    kinds = (communication.ACTIVATION, communication.TARGET, communication.GRADIENT)
    tags = {communication.tag(u, k) for u in range(communication.TAG_UNITS) for k in kinds}
    assert len(tags) == 3 * communication.TAG_UNITS and max(tags) < 32768
    assert communication.tag(communication.TAG_UNITS + 5, 2) == communication.tag(5, 2)
    with pytest.raises(ValueError):
        communication.tag(0, 3)


def test_micro_batches_are_equal_slices_and_an_uneven_split_is_refused():
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    mx, my = micro_batch((x, y), 3, 1)
    assert mx.tolist() == [[4.0, 5.0], [6.0, 7.0]] and my.tolist() == [2, 3]
    with pytest.raises(ValueError, match="a minibatch of 6 samples .* does not split into 4 equal micro-batches"):
        micro_batch((x, y), 4, 0)


def test_stashing_makes_backward_use_the_weights_of_its_forward():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    before = layer.weight.detach().clone()
    with stashing.stash_weights(layer.parameters()):
        out = torch.tanh(layer(x)).sum()
    with torch.no_grad():
        layer.weight.add_(1.0)  # an update between forward and backward
    out.backward()
    expected = x.detach().clone().requires_grad_()
    torch.tanh(nn.functional.linear(expected, before, layer.bias.detach())).sum().backward()
    assert torch.equal(x.grad, expected.grad)
    assert layer.weight.grad is not None  # the gradient still lands in the parameter


# --- start-up ----------------------------------------------------------------------


def test_outside_any_launcher_the_runtime_asks_for_what_gloo_needs(monkeypatch):
    """No MPI launcher and no torch.distributed environment: the error names the flag to pass."""
    monkeypatch.setattr(transport, "_connected", None)
    for var in (*transport.settings.RANK_VARIABLES, "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match=r"needs RANK: pass --rank \(or set RANK\)"):
        StageRuntime([nn.Linear(2, 2), nn.MSELoss()], HYBRID, optimizer=torch.optim.SGD)
    with pytest.raises(RuntimeError, match=r"needs MASTER_ADDR: pass --master_addr"):
        transport.connect(rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank 3 is outside the job's 2 ranks \(0..1\); pass --rank"):
        transport.connect(rank=3, world_size=2, master_addr="127.0.0.1")
    assert transport._connected is None


def test_under_an_mpi_launcher_the_engine_is_the_transport(monkeypatch):
    monkeypatch.setattr(transport, "_connected", None)
    engine = SimpleNamespace(rank=0, size=2, name="engine (MPI)")
    assert transport.connect(environ={"OMPI_COMM_WORLD_RANK": "0"}, make_engine=lambda: engine) is engine
    assert transport.connect() is engine  # the first call decides


def test_gloo_replicas_divide_the_summed_gradients_by_the_units_of_an_update():
    """One replica (no group) with k = 4 accumulated passes: the step uses the mean, as DistributedOptimizer does."""
    layer = nn.Linear(3, 1, bias=False)
    layer.weight.grad = torch.full_like(layer.weight, 8.0)
    opt = transport.AveragingOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), None, 4)
    before = layer.weight.detach().clone()
    opt.step()
    assert torch.equal(layer.weight.detach(), before - 2.0)


def test_a_stage_module_runs_its_modules_and_the_loss_last():
    stage = StageModule([nn.Identity(), nn.MSELoss()], has_loss=True)
    assert stage(torch.ones(2), torch.zeros(2)).item() == 1.0
    assert torch.equal(StageModule([nn.Identity()], has_loss=False)(torch.ones(2)), torch.ones(2))

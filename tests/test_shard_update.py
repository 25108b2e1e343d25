"""Issue 17's sharded update, the parts that need no MPI: which optimizers can be sharded (the
element-wise probe), the rank-independent state (ranges and their assembly), the sharded plan,
and the pieces of a bucket. The runs under mpirun are in test_optimizer_mpi.py."""

import pytest
import torch

import pipedap
from pipedap import shard_update
from pipedap.buckets import build_bucket
from pipedap.planner.plan import Group, Plan, PlanError
from pipedap.planner.schedules import plan_of


class PlainMomentum(torch.optim.Optimizer):
    """A user's element-wise optimizer."""

    def __init__(self, params, lr=0.1, beta=0.8):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["beta"]).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])


class TrustRatioSGD(torch.optim.Optimizer):
    """LARS-like: the step of a tensor is scaled by ||p|| / ||grad|| of the whole tensor."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                ratio = p.norm() / (p.grad.norm() + 1e-12)
                p.add_(p.grad, alpha=-group["lr"] * float(ratio))


def params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


ELEMENTWISE = {
    "SGD nesterov, weight decay": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "AdamW amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "two groups": lambda ps: torch.optim.Adam([{"params": ps[:1], "lr": 0.5}, {"params": ps[1:]}], lr=1e-3),
    "user's": lambda ps: PlainMomentum(ps),
}


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_element_wise_optimizers_pass_the_probe(name):
    shard_update.check_elementwise(ELEMENTWISE[name](params()))


def not_elementwise():
    cases = [("TrustRatioSGD", lambda ps: TrustRatioSGD(ps), "does not update element by element"),
             ("LBFGS", lambda ps: torch.optim.LBFGS(ps), "cannot step a flat piece")]
    if hasattr(torch.optim, "Adafactor"):  # factored second moments of matrices
        cases.append(("Adafactor", lambda ps: torch.optim.Adafactor(ps, lr=1e-2), "does not update element by element"))
    if hasattr(torch.optim, "Muon"):  # orthogonalised matrix updates; refuses 1-D tensors
        cases.append(("Muon", lambda ps: torch.optim.Muon([ps[0]], lr=1e-2), "cannot step a flat piece"))
    return cases


@pytest.mark.parametrize("name, make, message", not_elementwise(), ids=[c[0] for c in not_elementwise()])
def test_optimizers_that_use_the_whole_tensor_are_refused_naming_them(name, make, message):
    with pytest.raises(ValueError, match=message) as err:
        shard_update.check_elementwise(make(params()))
    assert f"shard_update=True: {name} (param group 0)" in str(err.value)
    assert "use shard_update=False" in str(err.value)


def test_the_probe_leaves_the_optimizer_untouched():
    ps = params()
    opt = torch.optim.Adam(ps, lr=1e-2)
    before = [p.detach().clone() for p in ps]
    shard_update.check_elementwise(opt)
    assert len(opt.state) == 0 and opt.param_groups[0]["params"] == ps
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_bytescheduler_with_shard_update_is_refused_at_wrap_time():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="ByteScheduler all-reduces buckets in pieces"):
        pipedap.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                     schedule="bytescheduler", shard_update=True)


# --- the state as ranges ---------------------------------------------------------------


def adam_state(n: int, offset: float = 0.0) -> dict:
    return {"step": torch.tensor(3.0), "exp_avg": torch.arange(n, dtype=torch.float64) + offset}


def test_ranges_saved_by_three_ranks_assemble_into_the_pieces_of_two():
    whole = adam_state(10)
    saved = [(0, a, b, {"step": whole["step"], "exp_avg": whole["exp_avg"][a:b]}) for a, b in ((0, 4), (4, 7), (7, 10))]
    first, second = shard_update.assemble(saved, 0, 0, 5), shard_update.assemble(saved, 0, 5, 10)
    assert torch.equal(first["exp_avg"], whole["exp_avg"][:5]) and torch.equal(second["exp_avg"], whole["exp_avg"][5:])
    assert first["step"].dim() == 0 and first["step"].item() == 3.0  # not element-wise: taken whole
    assert shard_update.assemble(saved, 1, 0, 5) is None  # a parameter without state
    with pytest.raises(ValueError, match="elements 4..7 of parameter #0 are in none of the given parts"):
        shard_update.assemble([saved[0], saved[2]], 0, 0, 10)


def test_a_torch_state_round_trips_through_ranges_in_its_shapes():
    p = torch.nn.Parameter(torch.zeros(2, 5))
    state = {p: {"step": torch.tensor(1.0), "exp_avg": torch.arange(10.0).view(2, 5)}}
    ranges = shard_update.ranges_of_params(state, {id(p): 0})
    assert ranges[0][:3] == (0, 0, 10) and ranges[0][3]["exp_avg"].shape == (10,)
    again = shard_update.whole_param_state(ranges, 0, p)
    assert torch.equal(again["exp_avg"], state[p]["exp_avg"]) and again["step"].shape == ()


def test_sharded_parts_must_be_every_rank_of_one_save():
    part = {"format": shard_update.SHARDED_FORMAT, "world_size": 3, "param_groups": [], "ranges": []}
    shard_update.check_sharded_parts([dict(part, rank=r) for r in range(3)])
    with pytest.raises(ValueError, match=r"the parts are of ranks \[0, 2\], but they were saved by 3 ranks"):
        shard_update.check_sharded_parts([dict(part, rank=0), dict(part, rank=2)])
    with pytest.raises(ValueError, match="part 0 is not a sharded_state_dict"):
        shard_update.check_sharded_parts([{"state": {}}])


# --- the sharded plan ------------------------------------------------------------------


GROUPS = tuple(Group(f"g{i}", (f"p{i}",), 100) for i in range(3))


def test_a_wfbp_plan_becomes_reduce_scatters_in_backward_and_all_gathers_before_the_forward():
    plan = plan_of("wfbp", GROUPS, 2).sharded()
    assert plan.backward == ((("rs", 2),), (("rs", 1),), (("rs", 0),))
    # in the reduce-scatters' order: step() updates the shards whose reduce-scatter ended first
    assert plan.forward == ((("ag", 2),), (("ag", 1),), (("ag", 0),)) and plan.sync_before_forward


def test_a_dear_plan_is_already_sharded_and_a_pipedap_plan_moves_its_all_gathers_forward():
    dear = plan_of("dear", GROUPS, 2)
    assert dear.sharded() is dear
    pipedap_plan = Plan("handwritten", 2, GROUPS, ((("rs", 2),), (("ag", 2),), (("rs", 1),), (("rs", 0), ("ag", 1))),
                        ((("ag", 0),),))
    sharded = pipedap_plan.sharded()
    assert sharded.backward == dear.backward and sharded.forward == dear.forward
    chunked = Plan("bytescheduler", 2, GROUPS, ((("ar", 2),), (("ar", 1),), (("ar", 0),), (("ar", 2),)), (),
                   chunks=((2, 2),))
    with pytest.raises(PlanError, match="reduce-scattered whole"):
        chunked.sharded()


# --- the pieces of a bucket ----------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_pieces_of_every_rank_cover_each_parameter_once_and_view_the_buffers(world):
    torch.manual_seed(0)
    layers = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 2))]
    values = [p.detach().clone() for p in layers]
    index_of = {id(p): i for i, p in enumerate(layers)}
    group_of = {id(p): 0 for p in layers}
    covered = {i: [] for i in range(len(layers))}
    for rank in range(world):
        bucket = build_bucket(0, [(f"p{i}", p) for i, p in enumerate(layers)], world, rank)
        bucket.flatten_params()
        assert all(torch.equal(p, v) for p, v in zip(layers, values))  # moved, values kept
        assert all(p.data_ptr() >= bucket.params_buffer.data_ptr() for p in layers)
        for piece in shard_update.pieces_of(bucket, index_of, group_of):
            covered[piece.index].append((piece.start, piece.stop))
            assert torch.equal(piece.tensor, layers[piece.index].detach().flatten()[piece.start:piece.stop])
            assert piece.tensor.data_ptr() >= bucket.params_shard.data_ptr()  # inside this rank's shard
            assert piece.tensor.grad.data_ptr() >= bucket.shard.data_ptr()
            piece.tensor.data.add_(1.0)  # writes through to the parameter
            written = layers[piece.index].detach().flatten()[piece.start:piece.stop]
            assert torch.equal(written, values[piece.index].flatten()[piece.start:piece.stop] + 1)
        for p, v in zip(layers, values):  # undo this rank's writes for the next rank's check
            p.data.copy_(v)
    for i, p in enumerate(layers):
        spans = sorted(covered[i])
        assert spans[0][0] == 0 and spans[-1][1] == p.numel()
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans

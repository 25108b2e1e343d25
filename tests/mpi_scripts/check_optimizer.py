"""DistributedOptimizer against single-process training (run under mpirun; argv[1] picks a part).

The reference runs in the same process on a copy of the model: each step it
back-propagates every rank's shard with the loss divided by the world size and
steps a plain optimizer, which is single-process training on the concatenated
batch (for models without batch statistics it is the same gradient; with
BatchNorm it is what data parallelism computes, each shard normalised alone).
Exits non-zero on the first mismatch. With ``--shard-update`` the parts wrap with
``shard_update=True`` (issue 17) and run in float64, so that the sharded update must
match single-process training to 1e-9.
"""

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import pipedap as hvd
from pipedap.planner.plan import Group, Plan
from pipedap.planner.schedules import plan_of

hvd.init()
R, P = hvd.rank(), hvd.size()
B = 4  # samples per rank and step
STEPS = 10
SHARD = "--shard-update" in sys.argv
TOL = 1e-9 if SHARD else 1e-5
if SHARD:
    torch.set_default_dtype(torch.float64)


# --- models -----------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 4)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        # no conv bias before BatchNorm (it cancels it: the gradient would be pure rounding noise)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class Tied(nn.Module):
    """The output projection is the embedding matrix (one Parameter used by two modules)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.emb(tokens).mean(dim=1))))


class UnusedBranch(MLP):
    """`branch` is never called: its parameters never get a gradient."""

    def __init__(self):
        super().__init__()
        self.branch = nn.Linear(16, 16)


class SomeRanks(MLP):
    """`branch` runs only for shards of even ranks: odd ranks have no gradient for it in any step."""

    def __init__(self):
        super().__init__()
        self.branch = nn.Linear(16, 16)
        self.use_branch = True

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.fc3(torch.tanh(self.fc2(h)))


class Frozen(MLP):
    def __init__(self):
        super().__init__()
        self.fc1.requires_grad_(False)


MODELS = {"mlp": MLP, "cnn_bn": SmallCNN, "tied": Tied, "unused_branch": UnusedBranch, "some_ranks": SomeRanks,
          "frozen": Frozen}


def set_shard(model, rank: int) -> None:
    """Models whose forward depends on the shard's rank (SomeRanks) learn it here."""
    if isinstance(model, SomeRanks):
        model.use_branch = rank % 2 == 0


def batch(model_name: str, step: int, n: int):
    """The global batch of a step (identical on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    if model_name == "cnn_bn":
        x = torch.randn(n, 3, 6, 6, generator=g)
    elif model_name == "tied":
        x = torch.randint(0, 10, (n, 3), generator=g)
    else:
        x = torch.randn(n, 8, generator=g)
    classes = 10 if model_name == "tied" else 4
    return x, torch.randint(0, classes, (n,), generator=g)


# --- optimizers -------------------------------------------------------------------


class PlainMomentum(torch.optim.Optimizer):
    """A user-defined optimizer with a required constructor argument and per-parameter state."""

    def __init__(self, params, lr, beta=0.8):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["beta"]).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])


def make_optimizer(name: str, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":  # two groups with different hyperparameters
        half = len(params) // 2
        return torch.optim.SGD([{"params": params[:half], "lr": 0.05}, {"params": params[half:]}],
                               lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    return PlainMomentum(params, lr=0.05)


OPTIMIZERS = ["sgd", "adam", "adamw", "custom"]


# --- plans ------------------------------------------------------------------------


def module_groups(model: nn.Module) -> list[Group]:
    from pipedap.buckets import default_groups

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = {n: p.numel() * 4 for n, p in named}
    return [Group(g[0], tuple(g), sum(sizes[n] for n in g)) for g in default_groups(named, 0)]


def handwritten_pipedap_plan(model: nn.Module) -> Plan:
    """AG of the last group moved right behind its RS; AG of the next merged with the RS after it."""
    groups = module_groups(model)
    n = len(groups)
    backward = [(("rs", n - 1),), (("ag", n - 1),)]
    moved = {n - 1}
    if n >= 3:
        backward += [(("rs", n - 2),), (("rs", n - 3), ("ag", n - 2))]
        moved.add(n - 2)
        backward += [(("rs", g),) for g in reversed(range(n - 3))]
    else:
        backward += [(("rs", g),) for g in reversed(range(n - 1))]
    forward = [(("ag", g),) for g in range(n) if g not in moved]
    return Plan("handwritten", P, tuple(groups), tuple(backward), tuple(forward))


def handwritten_bytescheduler_plan(model: nn.Module) -> Plan:
    """ByteScheduler's kind of plan: the last group in 3 pieces and the first in 2, the first's
    pieces overtaking the last one's third (Plan.chunks)."""
    groups = module_groups(model)
    n = len(groups)
    backward = [(("ar", n - 1),), (("ar", n - 1),), *[(("ar", g),) for g in reversed(range(1, n - 1))],
                (("ar", 0),), (("ar", n - 1),), (("ar", 0),)]
    return Plan("bytescheduler", P, tuple(groups), tuple(backward), (), chunks=((n - 1, 3), (0, 2)))


SCHEDULES = ("wfbp", "dear", "pipedap") if SHARD else ("wfbp", "dear", "pipedap", "bytescheduler")


def plan_for(schedule: str, model: nn.Module):
    plans = {"pipedap": handwritten_pipedap_plan, "bytescheduler": handwritten_bytescheduler_plan}
    return plans[schedule](model) if schedule in plans else None


def wrap(opt, model, schedule, **options):
    """DistributedOptimizer as the parts test it: a bucket per module, the schedule's handwritten plan."""
    return hvd.DistributedOptimizer(opt, model=model, schedule=schedule, plan=plan_for(schedule, model),
                                    fusion_bytes=0, shard_update=SHARD, **options)


# --- training ---------------------------------------------------------------------


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def reference_step(model, opt, model_name, step, clip=None, micro=1, average_micro=True):
    """Single process: every rank's shard, loss / (P * micro), then one plain step.

    average_micro=False sums the micro-batches (what no_sync() accumulation computes).
    """
    opt.zero_grad()
    for m in range(micro):
        x, y = batch(model_name, step * micro + m, B * P)
        for r in range(P):
            set_shard(model, r)
            scale = P * (micro if average_micro else 1)
            (loss_of(model, x[r * B : (r + 1) * B], y[r * B : (r + 1) * B]) / scale).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
    opt.step()


def distributed_step(model, opt, model_name, step, clip=None, micro=1):
    set_shard(model, R)
    opt.zero_grad()
    for m in range(micro):
        x, y = batch(model_name, step * micro + m, B * P)
        loss_of(model, x[R * B : (R + 1) * B], y[R * B : (R + 1) * B]).backward()
    if clip is not None:
        hvd.clip_grad_norm_(opt, clip)
    opt.step()


def compare(what, model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()  # state_dict applies pending updates
    worst = 0.0
    for name, ref in reference.named_parameters():
        diff = (ours[name] - theirs[name]).abs().max().item()
        scale = 1.0 + ref.abs().max().item()
        worst = max(worst, diff / scale)
        if not diff <= TOL * scale:  # (NaN differs too)
            sys.exit(f"rank {R}: {what}: parameter {name} differs by {diff:.3g} (scale {scale:.3g})")
    return worst


def compare_state(what, ours, theirs):
    """Two optimizer state_dicts in torch's format: same keys, hyperparameters and values."""
    if ours["param_groups"] != theirs["param_groups"] or ours["state"].keys() != theirs["state"].keys():
        sys.exit(f"rank {R}: {what}: param_groups or state keys differ: {ours['param_groups']} / {theirs['param_groups']}")
    for index, entries in theirs["state"].items():
        for key, value in entries.items():
            mine = ours["state"][index][key]
            if not (torch.is_tensor(value) and mine.shape == value.shape and torch.allclose(mine, value, atol=TOL)):
                sys.exit(f"rank {R}: {what}: state of parameter #{index}, {key!r} differs")


def fresh(model_name):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    return model, copy.deepcopy(model)


def run_matrix():
    worst = 0.0
    for schedule in SCHEDULES:
        for opt_name in OPTIMIZERS:
            for model_name in MODELS:
                model, reference = fresh(model_name)
                opt = wrap(make_optimizer(opt_name, model), model, schedule)
                ref_opt = make_optimizer(opt_name, reference)
                for step in range(STEPS):
                    distributed_step(model, opt, model_name, step)
                    reference_step(reference, ref_opt, model_name, step)
                worst = max(worst, compare(f"{schedule}/{opt_name}/{model_name}", model, reference))
                if model_name == "unused_branch":
                    untouched = MODELS[model_name]
                    torch.manual_seed(0)
                    init = untouched().branch.weight
                    if not torch.equal(model.branch.weight, init):
                        sys.exit(f"rank {R}: {schedule}/{opt_name}: the unused branch was modified")
    print(f"rank {R}: matrix OK: {len(SCHEDULES)} schedules x {len(OPTIMIZERS)} optimizers x {len(MODELS)} models, "
          f"worst relative difference {worst:.2e}")


def run_features():
    for schedule in SCHEDULES:
        # an LR scheduler changes the effective rate (and matches the reference)
        model, reference = fresh("mlp")
        opt = wrap(make_optimizer("sgd", model), model, schedule)
        ref_opt = make_optimizer("sgd", reference)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
        ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.1)
        for step in range(8):
            distributed_step(model, opt, "mlp", step)
            reference_step(reference, ref_opt, "mlp", step)
            sched.step()
            ref_sched.step()
        compare(f"{schedule} LR scheduler", model, reference)
        assert abs(opt.param_groups[1]["lr"] - 0.1 * 0.01) < 1e-12, opt.param_groups[1]["lr"]

        # save mid-run, load into a fresh run and continue = uninterrupted
        model, reference = fresh("cnn_bn")
        opt = wrap(make_optimizer("adamw", model), model, schedule)
        ref_opt = make_optimizer("adamw", reference)
        for step in range(6):
            distributed_step(model, opt, "cnn_bn", step)
            reference_step(reference, ref_opt, "cnn_bn", step)
        checkpoint = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
        compare_state(f"{schedule} optimizer state_dict", checkpoint["opt"], ref_opt.state_dict())
        torch.manual_seed(123)
        resumed = SmallCNN()
        resumed.load_state_dict(checkpoint["model"])
        resumed_opt = make_optimizer("adamw", resumed)
        resumed_opt.load_state_dict(checkpoint["opt"])
        resumed_opt = wrap(resumed_opt, resumed, schedule)
        for step in range(6, 12):
            distributed_step(resumed, resumed_opt, "cnn_bn", step)
            reference_step(reference, ref_opt, "cnn_bn", step)
        compare(f"{schedule} checkpoint/resume", resumed, reference)

        # eval between steps sees the updated weights (the forward pre-hooks apply them)
        model, reference = fresh("mlp")
        opt = wrap(make_optimizer("adam", model), model, schedule)
        ref_opt = make_optimizer("adam", reference)
        probe = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))
        for step in range(4):
            distributed_step(model, opt, "mlp", step)
            reference_step(reference, ref_opt, "mlp", step)
            model.eval()
            with torch.no_grad():
                out = model(probe)
            model.train()
            if not torch.allclose(out, reference(probe).detach(), atol=1e-5):
                sys.exit(f"rank {R}: {schedule}: eval after step {step} did not see the updated weights")

        # synchronize() after step() applies the pending update (before evaluating or saving) and
        # starts no communication of its own: training goes on exactly
        model, reference = fresh("mlp")
        opt = wrap(make_optimizer("adam", model), model, schedule)
        ref_opt = make_optimizer("adam", reference)
        for step in range(4):
            distributed_step(model, opt, "mlp", step)
            reference_step(reference, ref_opt, "mlp", step)
            opt.synchronize()
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                if not torch.allclose(p.detach(), q.detach(), atol=1e-5):
                    sys.exit(f"rank {R}: {schedule}: after step {step} and synchronize(), {name} is not current")
        compare(f"{schedule} synchronize after step", model, reference)

        # accumulation: backward_passes_per_step=2 averages the micro-batches (= the 2x larger
        # batch); no_sync() accumulates locally and communicates once (sums them, as DDP does)
        for how in ("passes", "no_sync"):
            model, reference = fresh("mlp")
            opt = wrap(make_optimizer("sgd", model), model, schedule,
                       backward_passes_per_step=2 if how == "passes" else 1)
            ref_opt = make_optimizer("sgd", reference)
            for step in range(5):
                opt.zero_grad()
                for m in range(2):
                    x, y = batch("mlp", step * 2 + m, B * P)
                    shard = (x[R * B : (R + 1) * B], y[R * B : (R + 1) * B])
                    if how == "no_sync" and m == 0:
                        with opt.no_sync():
                            loss_of(model, *shard).backward()
                    else:
                        loss_of(model, *shard).backward()
                opt.step()
                reference_step(reference, ref_opt, "mlp", step, micro=2, average_micro=how == "passes")
            compare(f"{schedule} accumulation ({how})", model, reference)

        # global-norm clipping from the reduce-scatter shards = torch's clip on the averaged gradients
        model, reference = fresh("cnn_bn")
        opt = wrap(make_optimizer("sgd", model), model, schedule)
        ref_opt = make_optimizer("sgd", reference)
        for step in range(6):
            distributed_step(model, opt, "cnn_bn", step, clip=0.05)
            reference_step(reference, ref_opt, "cnn_bn", step, clip=0.05)
        compare(f"{schedule} clip_grad_norm_", model, reference)

        # Horovod's idiom: synchronize(), clip with torch, step inside skip_synchronize()
        model, reference = fresh("mlp")
        opt = wrap(make_optimizer("sgd", model), model, schedule)
        ref_opt = make_optimizer("sgd", reference)
        for step in range(5):
            opt.zero_grad()
            x, y = batch("mlp", step, B * P)
            loss_of(model, x[R * B : (R + 1) * B], y[R * B : (R + 1) * B]).backward()
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            with opt.skip_synchronize():
                opt.step()
            reference_step(reference, ref_opt, "mlp", step, clip=0.05)
        compare(f"{schedule} synchronize + skip_synchronize", model, reference)

        # AMP's GradScaler: synchronize, unscale, then the scaler steps inside skip_synchronize
        model, reference = fresh("mlp")
        opt = wrap(make_optimizer("adam", model), model, schedule)
        ref_opt = make_optimizer("adam", reference)
        scaler, ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(5):
            opt.zero_grad()
            x, y = batch("mlp", step, B * P)
            scaler.scale(loss_of(model, x[R * B : (R + 1) * B], y[R * B : (R + 1) * B])).backward()
            opt.synchronize()
            scaler.unscale_(opt)
            with opt.skip_synchronize():
                scaler.step(opt)
            scaler.update()
            ref_opt.zero_grad()
            for r in range(P):
                ref_scaler.scale(loss_of(reference, x[r * B : (r + 1) * B], y[r * B : (r + 1) * B]) / P).backward()
            ref_scaler.unscale_(ref_opt)
            ref_scaler.step(ref_opt)
            ref_scaler.update()
        compare(f"{schedule} GradScaler", model, reference)
    # schedule="pipedap" without a plan: measures 2 steps, switches plan mid-run, still exact
    import os

    os.environ["PIPEDAP_PROFILE_STEPS"] = "2"
    for model_name in MODELS:
        model, reference = fresh(model_name)
        opt = hvd.DistributedOptimizer(make_optimizer("adamw", model), model=model, schedule="pipedap", fusion_bytes=0,
                                       shard_update=SHARD)
        ref_opt = make_optimizer("adamw", reference)
        for step in range(8):
            distributed_step(model, opt, model_name, step)
            reference_step(reference, ref_opt, model_name, step)
        assert P == 1 or opt.plan.schedule == ("dear" if SHARD else "optimal"), opt.plan  # (no order to plan)
        compare(f"online-planned pipedap/{model_name}", model, reference)
    print(f"rank {R}: features OK")


def run_broadcasts():
    torch.manual_seed(R)  # a different model and BatchNorm statistics on every rank
    model = SmallCNN()
    model.bn1.running_mean.fill_(R)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    torch.manual_seed(0)
    want = SmallCNN()
    for name, t in model.state_dict().items():
        expected = torch.zeros_like(t) if name == "bn1.running_mean" else want.state_dict()[name]
        if not torch.equal(t, expected):
            sys.exit(f"rank {R}: broadcast_parameters: {name} is not rank 0's")
    opt = make_optimizer("sgd", model)
    opt.param_groups[0]["lr"] = 0.5 + R  # per-group options differ before the broadcast
    hvd.broadcast_optimizer_state(opt, root_rank=0)  # before the first step
    assert opt.param_groups[0]["lr"] == 0.5, opt.param_groups[0]["lr"]
    metric = hvd.allreduce(torch.tensor([float(R)]), name="metric")
    assert metric.item() == (P - 1) / 2
    print(f"rank {R}: broadcasts OK")


def run_mismatch():
    model = MLP(hidden=16 if R != 1 else 12)
    try:
        hvd.DistributedOptimizer(make_optimizer("sgd", model), model=model, schedule="dear")
        print(f"rank {R}: NOT DETECTED")
    except ValueError as e:
        print(f"rank {R}: DETECTED {e}")


def run_given_plan():
    """A given DeAR plan with schedule="pipedap" runs as given: no online planning (issue 12).

    It is given as a Plan, as its JSON file and through $PIPEDAP_PLAN; each run trains past the
    profiling steps and must still run the given plan, and match single-process training. A
    control run without a plan must switch within those steps, so the check can fail.
    """
    import os
    import tempfile

    os.environ["PIPEDAP_PROFILE_STEPS"] = "2"
    steps = 6  # one warm-up + 2 measured steps, then 3 more
    model_name = "mlp"

    def train(what, plan=None):
        model, reference = fresh(model_name)
        opt = hvd.DistributedOptimizer(make_optimizer("sgd", model), model=model, schedule="pipedap", plan=plan)
        ref_opt = make_optimizer("sgd", reference)
        plans = [(opt.plan.schedule, opt.plan.digest())]
        for step in range(steps):
            distributed_step(model, opt, model_name, step)
            reference_step(reference, ref_opt, model_name, step)
            plans.append((opt.plan.schedule, opt.plan.digest()))
        compare(what, model, reference)
        return opt, plans

    opt, plans = train("pipedap planned online")  # control
    assert plans[0][0] == "dear" and plans[-1][0] == "optimal" and opt._pipedap.online is None, plans

    model, _ = fresh(model_name)
    given = plan_of("dear", module_groups(model), P)  # one bucket per module: not the default fusion
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dear.json")
        given.save(path)
        for how, plan in (("Plan", given), ("file", path), ("PIPEDAP_PLAN", None)):
            if plan is None:
                os.environ["PIPEDAP_PLAN"] = path
            try:
                opt, plans = train(f"pipedap with a dear plan ({how})", plan)
            finally:
                os.environ.pop("PIPEDAP_PLAN", None)
            assert opt._pipedap.online is None, how
            assert plans == [("dear", given.digest())] * (steps + 1), (how, plans)
            print(f"rank {R}: given dear plan kept ({how})")
    print(f"rank {R}: given plan OK")


def run_plan_mismatch():
    """Every rank compares the plan's digest at wrap time: rank 1 given another plan raises everywhere."""
    import os
    import tempfile

    model, _ = fresh("mlp")
    dear, handwritten = plan_of("dear", module_groups(model), P), handwritten_pipedap_plan(model)
    digests = (dear.digest(), handwritten.digest())

    def try_wrap(how, plan=None):
        try:
            hvd.DistributedOptimizer(make_optimizer("sgd", model), model=model, schedule="pipedap", plan=plan)
            print(f"rank {R}: NOT DETECTED ({how})")
        except (ValueError, OSError) as e:
            named = all(d in str(e) for d in digests) and "different plan file or $PIPEDAP_PLAN" in str(e)
            print(f"rank {R}: DETECTED ({how}){' with both digests' if named else ''}: {e}")

    try_wrap("Plan", dear if R != 1 else handwritten)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"{name}.json") for name in ("dear", "handwritten")]
        dear.save(paths[0])
        handwritten.save(paths[1])
        os.environ["PIPEDAP_PLAN"] = paths[R == 1]
        try:
            try_wrap("PIPEDAP_PLAN")
        finally:
            os.environ.pop("PIPEDAP_PLAN")
        try_wrap("missing file", paths[0] if R != 1 else os.path.join(tmp, "absent.json"))
    opt = hvd.DistributedOptimizer(make_optimizer("sgd", model), model=model, schedule="pipedap", plan=dear)
    assert opt.plan.digest() == digests[0]
    print(f"rank {R}: same plan OK")


part = sys.argv[1]
{"matrix": run_matrix, "features": run_features, "broadcasts": run_broadcasts,
 "mismatch": run_mismatch, "given_plan": run_given_plan,
 "plan_mismatch": run_plan_mismatch}[part]()

"""The planner on a real job (run under mpirun): measured cost model, agreed profiles, one plan everywhere."""

import os
import sys
import tempfile

import torch

import pipedap as hvd
from pipedap import measure
from pipedap.planner import make_plan
from pipedap.planner.profile import Layer, Profile

hvd.init()
R, P = hvd.rank(), hvd.size()

# a cost model measured with the comm core: positive start-up and per-byte cost, cached by host set
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "costmodel.json") if R == 0 else None
    path = hvd.broadcast_object(path)
    os.environ["PIPEDAP_CACHE_DIR"] = os.path.dirname(path)
    model = measure.cost_model(sizes=(16 << 10, 256 << 10, 2 << 20))
    for kind in ("rs", "ag", "ar"):
        line = model.of(kind)
        assert line.a >= 0 and line.b > 0, (kind, line)
    again = measure.cost_model()  # now from the cache: identical
    assert again == model, (again, model)
    hvd.barrier()

# every rank profiles differently (noise), agrees on the element-wise maximum, and plans
layers = [Layer(f"l{i}", (f"p{i}",), 1 << (12 + i % 6), tf=0.001 * (i + 1), tb=0.002 * (i + 1) * (1 + 0.1 * R))
          for i in range(12)]
agreed = measure.agree_profile(Profile(tuple(layers)))
assert agreed.layers[3].tb == max(0.002 * 4 * (1 + 0.1 * r) for r in range(P)), agreed.layers[3]
local = make_plan(agreed, model, fusion="none")
broadcast = measure.plan_on_rank0(lambda: make_plan(agreed, model, fusion="none"))
digests = hvd.allgather_object((local.digest(), broadcast.digest(), local.inputs_hash, broadcast.inputs_hash))
assert len({d for four in digests for d in four[:2]}) == 1, digests
assert len({h for four in digests for h in four[2:]}) == 1, digests  # every rank planned from the same inputs
print(f"rank {R}: identical plans {broadcast.digest()[:12]} on {P} ranks")

# what the reducer's path of a bucket costs the training thread, link left out: small, positive, agreed by every rank
costly = measure.with_bucket_cost(agreed)
host = costly.bucket_cost - agreed.bucket_cost
assert 0 < host < 0.05, f"rank {R}: {host * 1e3:.3f} ms of host work per bucket"
assert len(set(hvd.allgather_object(costly.bucket_cost))) == 1, "ranks charge different bucket costs"
print(f"rank {R}: {host * 1e6:.0f} us of host work per bucket")

# schedule="pipedap" without a plan measures, plans on rank 0 and switches on every rank at once
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Linear(64 if i else 16, 64) for i in range(6)], torch.nn.Linear(64, 4))
os.environ["PIPEDAP_PROFILE_STEPS"] = "3"
os.environ["PIPEDAP_PROFILE_WARMUP_MAX"] = "10"  # the tests' default is 1 (conftest.py): here, until memory is warm
opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), model=net, schedule="pipedap",
                               fusion_bytes=0)
assert opt.plan.schedule == "dear" and opt.planning is None and opt.measuring
fresh = []  # the last rank's heap grows by 64 MB in each of the first two steps: the warm-up waits for both
for step in range(9):
    opt.zero_grad()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step * P + R))
    net(x).pow(2).mean().backward()
    if R == P - 1 and step < 2:
        fresh.append(torch.ones(16 << 20))
    opt.step()
    if step == 1:  # a barrier (no collectives) while the planner listens to the engine: it used to raise IndexError
        hvd.barrier()
    if step == 4:
        assert opt.measuring, "planned before the last rank's memory was warm"
    if step == 5:  # three warm-up steps (the last quiet on every rank) + 3 measured steps
        assert opt.plan.schedule == "optimal" and opt.plan.predicted is not None, opt.plan.schedule
        assert not opt.measuring
        # how the plan was made, the same on every rank (σ is not measured: PIPEDAP_INTERFERENCE=off in tests,
        # see conftest.py; tests/test_interference.py checks the measured one)
        made = opt.planning
        if measure.interference_on():  # one rank has no link to slow its compute: σ is 0, not measured
            assert P == 1 and made["interference"] == 0.0, made
        else:
            assert made["interference"] is None, made
        assert made["cost_model"]["world_size"] == P and made["profile_layers"] == len(opt.plan.groups), made
        assert made["cost_source"].startswith(("fitted to the profiling steps", "the cluster's microbenchmark")), made
        steps = made["profiling_steps"]  # the DeAR steps it planned from, as measured and as its model predicts them
        assert steps["measured_s"] > 0 and steps["predicted_s"] > 0, made
        # the model planned on is one of the candidates, and the fit was made of one sample per operation
        assert steps["predicted_s"] in (steps["fitted_predicted_s"], steps["microbenchmark_predicted_s"]), made
        samples = made["fit_samples"]
        assert all(len(samples[k]) <= len(opt.plan.groups) for k in ("rs", "ag")), made
        assert len({repr(m) for m in hvd.allgather_object(made)}) == 1, "ranks planned from different facts"
opt.synchronize()
digests = hvd.allgather_object(opt.plan.digest())
assert len(set(digests)) == 1, digests
params = hvd.allgather_object([p.detach().clone() for p in net.parameters()])
assert all(torch.equal(a, b) for theirs in params for a, b in zip(params[0], theirs)), "ranks diverged"
print(f"rank {R}: online plan {opt.plan.schedule} predicts {opt.plan.predicted.iteration_time * 1e3:.2f} ms")
sys.stdout.flush()

"""pipedap.interference under mpirun, every rank pinned to core 0 (so the engines must take compute's time).

Writes {"sigma": [per rank], "measured": [per rank, by measure.cost_model], "cached": its copy read back,
"off": with PIPEDAP_INTERFERENCE=off, "online": [per rank: the σ the online planner mapped its profile with,
and on rank 0 the (profile's, cost model's) σ of the plans it made], "planning": [per rank: the σ
the optimizer reports it planned with (opt.planning)]}.
"""

import json
import os
import sys

os.sched_setaffinity(0, {0})  # before init: the engine thread inherits it

import torch  # noqa: E402

import pipedap as hvd  # noqa: E402
from pipedap import interference, measure, online_planner  # noqa: E402

hvd.init()
sigma = interference.measure()
sizes = (16 << 10, 1 << 20)
os.environ["PIPEDAP_INTERFERENCE"] = "off"
off, _ = measure.measure_cost_model(sizes)
os.environ["PIPEDAP_INTERFERENCE"] = "measure"
measured = measure.cost_model(sizes=sizes)  # measures (interference too) and caches
cached = measure.cost_model(measure_if_missing=False)

# the online planner end to end: it measures σ, maps the profile's times with it, and plans with a model that has it
seen: dict = {"clock": [], "plans": []}
real_clock, real_make_plan = interference.clean_clock, online_planner.make_plan


def clean_clock(busy, sigma):
    seen["clock"].append(sigma)
    return real_clock(busy, sigma)


def make_plan(profile, cost, **options):
    seen["plans"].append((profile.meta["interference"], cost.interference))
    return real_make_plan(profile, cost, **options)


interference.clean_clock, online_planner.make_plan = clean_clock, make_plan
os.environ["PIPEDAP_PROFILE_STEPS"] = "2"
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), model=net, schedule="pipedap",
                               fusion_bytes=0)
for _ in range(5):
    opt.zero_grad()
    net(torch.randn(32, 256)).pow(2).mean().backward()
    opt.step()
opt.synchronize()
assert opt.plan.schedule != "dear", "the online planner did not switch plans"
result = {"sigma": hvd.allgather_object(sigma), "measured": hvd.allgather_object(measured.interference),
          "cached": cached.interference, "off": off.interference, "online": hvd.allgather_object(seen),
          "planning": hvd.allgather_object(opt.planning["interference"])}
if hvd.rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
    print(result)
hvd.shutdown()

"""A PipeDAP plan made inside the benchmark job, for runs started without ``--plan FILE``.

Steps (every rank takes part; rank 0 decides and broadcasts, so all ranks run one plan):

1. profile: every rank times its model on its own batch at the same time (so the
   numbers include the contention of the real run); the element-wise maximum is used;
2. cost model: α-β lines from ``--bandwidth``/``--latency`` (a ring on links of that
   speed), or, without ``--bandwidth``, fitted to reduce-scatter, all-gather and
   all-reduce times measured now on this job's ranks;
3. plan: the exact planner (seeded with the PipeDAP greedy) over the fusion candidates,
   or over the one grouping of ``--threshold`` bytes when given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pipedap import comm
from pipedap.planner import costmodel, fusion
from pipedap.planner.costmodel import CostModel
from pipedap.planner.plan import Plan, hash_inputs
from pipedap.planner.profile import Profile, elementwise_max
from pipedap.profiler import profile_model

# Message sizes (bytes of the full buffer) the cost-model probe times, and repeats per size.
PROBE_SIZES = (64 << 10, 512 << 10, 4 << 20, 16 << 20)
PROBE_REPEATS = 3
PROFILE_WARMUP, PROFILE_ITERATIONS = 1, 3

Say = Callable[[str], None]


def measure_cost(say: Say) -> CostModel:
    """Fit the cost model to collectives timed now on every rank (rank 0's times are used)."""
    world = comm.size()
    say(f"measuring RS/AG/AR at {len(PROBE_SIZES)} sizes up to {PROBE_SIZES[-1] >> 20} MiB "
        f"x {PROBE_REPEATS} on {world} ranks (a few seconds)")
    samples: dict[str, list[tuple[float, float]]] = {"rs": [], "ag": [], "ar": []}
    for nbytes in PROBE_SIZES:
        count = max(world, nbytes // 4 // world * world)
        full = torch.ones(count)
        shard = torch.ones(count // world)
        runs = {"rs": (comm.reducescatter, full), "ag": (comm.allgather, shard), "ar": (comm.allreduce, full)}
        for kind, (collective, tensor) in runs.items():
            times = []
            for _ in range(PROBE_REPEATS):
                comm.barrier()
                start = time.perf_counter()
                collective(tensor, name=f"probe.{kind}")
                times.append(time.perf_counter() - start)
            samples[kind].append((count * 4, min(times)))
    samples = comm.broadcast_object(samples, name="probe.samples")
    model, reports = costmodel.fit(samples, world)
    for kind in ("rs", "ag", "ar"):
        line = model.of(kind)
        say(f"  {kind}: {line.a * 1e6:.0f} us + {1 / line.b / 1e6 if line.b else float('inf'):.0f} MB/s "
            f"(rms relative residual {reports[kind].rms_relative:.0%})")
    return model


def assumed_cost(bandwidth: str, latency: str, say: Say) -> CostModel:
    """The ring cost model on links of ``bandwidth`` (e.g. 1gbit) and ``latency`` (e.g. 50us)."""
    say(f"cost model: ring on {bandwidth} links, {latency} latency (assumed, not measured)")
    return costmodel.from_link(comm.size(), costmodel.parse_bandwidth(bandwidth), costmodel.parse_duration(latency))


def profile(model: torch.nn.Module, inputs: Any, targets: Any, loss: Callable, say: Say) -> Profile:
    """Per-layer times, measured on every rank at once, agreed as their element-wise maximum."""
    start = time.perf_counter()
    say(f"profiling the model on every rank ({PROFILE_WARMUP} + {PROFILE_ITERATIONS} iterations, "
        "about 5 batches' time)")
    measured = profile_model(model, inputs, targets, loss, warmup=PROFILE_WARMUP, iterations=PROFILE_ITERATIONS,
                             agree=lambda p: elementwise_max(comm.allgather_object(p, name="profile")))
    compute = sum(layer.tf + layer.tb + layer.u for layer in measured.layers)
    say(f"  {len(measured)} layers, compute {compute * 1e3:.1f} ms per batch; took {time.perf_counter() - start:.1f} s")
    return measured


def make_plan(model: torch.nn.Module, inputs: Any, targets: Any, loss: Callable, *, bandwidth: str | None,
              latency: str, threshold: int | None, say: Say) -> tuple[Plan, dict]:
    """Profile, model the network, plan on rank 0; every rank returns the same plan and facts."""
    measured = profile(model, inputs, targets, loss, say)
    cost = assumed_cost(bandwidth, latency, say) if bandwidth else measure_cost(say)
    facts = {"cost_model": cost.to_dict(), "cost_source": f"assumed {bandwidth}, {latency}" if bandwidth
             else "measured on this job's ranks", "profile_layers": len(measured)}
    doc = None
    if comm.rank() == 0:
        start = time.perf_counter()
        groupings = ({f"threshold:{threshold}B": fusion.by_threshold(measured, threshold)} if threshold
                     else fusion.candidates(measured, cost))
        best, _ = fusion.search(measured, cost, planners=("optimal",), groupings=groupings)
        inputs_hash = hash_inputs(measured.to_dict(), cost.to_dict(), {"fusion": best.fusion, "schedule": "optimal"})
        doc = best.schedule.to_plan(inputs_hash).to_dict()
        say(f"planned over {len(groupings)} fusion candidate(s) in {time.perf_counter() - start:.2f} s: "
            f"fusion {best.fusion}, {len(best.schedule.timeline.problem.nbytes)} groups, predicted "
            f"{best.schedule.iteration_time * 1e3:.1f} ms per batch")
    plan = Plan.from_json(comm.broadcast_object(doc, name="plan"), where="the benchmark's plan")
    return plan, facts

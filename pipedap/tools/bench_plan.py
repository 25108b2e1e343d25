"""A PipeDAP plan for an assumed network, made inside the benchmark job (``--bandwidth``).

Without ``--plan`` or ``--bandwidth`` the benchmark lets ``DistributedOptimizer`` plan
online from the training it measures. With ``--bandwidth B --latency L`` it plans for a
ring on links of that speed instead (e.g. to run the plan meant for the network you are
emulating):

1. profile: every rank times the model on its own batch at the same time (so the numbers
   include the contention of the real run); all ranks agree on the element-wise maximum;
2. cost model: the ring α-β model of :func:`pipedap.planner.costmodel.from_link`;
3. plan (rank 0, broadcast): :func:`pipedap.planner.make_plan` with the exact planner
   (seeded with the PipeDAP greedy; ByteScheduler's tuned piece order for that baseline)
   over the fusion candidates, or over the one grouping of ``--threshold`` bytes when given.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from pipedap import engine, measure, units
from pipedap.planner import costmodel, make_plan
from pipedap.planner.plan import Plan
from pipedap.planner.profile import Profile
from pipedap.profiler import profile_model
from pipedap.tied_embeddings import split_enabled

PROFILE_WARMUP, PROFILE_ITERATIONS = 1, 3  # batches, at least: seconds each on a CPU host
PROFILE_MIN_SECONDS = 0.5  # each phase at least this long: tens of batches on a GPU

Say = Callable[[str], None]


def profile_for_planning(model: torch.nn.Module, inputs: Any, targets: Any, loss: Callable, *, compressed: bool,
                         sharded: bool) -> Profile:
    """The benchmark's profile of one training batch, with the reducer's fixed cost per bucket:
    at least PROFILE_WARMUP + PROFILE_ITERATIONS batches, each phase PROFILE_MIN_SECONDS at least.
    Its ties are left out where the job (gradients ``compressed``, updates ``sharded``) reduces them whole."""
    device = next(model.parameters()).device
    profile = profile_model(model, inputs, targets, loss, warmup=PROFILE_WARMUP, iterations=PROFILE_ITERATIONS,
                            min_seconds=PROFILE_MIN_SECONDS)
    if not split_enabled(compressed=compressed, sharded=sharded, passes=1):
        profile = dataclasses.replace(profile, ties=())
    return measure.with_bucket_cost(profile, device)


def plan_for_link(model: torch.nn.Module, inputs: Any, targets: Any, loss: Callable, *, bandwidth: str,
                  latency: str, threshold: int | None, say: Say, wire_fraction: float = 1.0,
                  planner: str = "optimal", shard_update: bool = False) -> tuple[Plan, dict]:
    """Profile, plan on rank 0 for the assumed link; every rank returns the same plan and facts.

    ``wire_fraction``: the bytes on the link per gradient byte (0.5 with fp16/bf16 compression).
    """
    started = time.perf_counter()
    say("profiling the model on every rank")
    profile = profile_for_planning(model, inputs, targets, loss, compressed=wire_fraction != 1.0, sharded=shard_update)
    if wire_fraction != 1.0:
        profile = dataclasses.replace(profile, layers=tuple(
            dataclasses.replace(layer, nbytes=round(layer.nbytes * wire_fraction)) for layer in profile.layers))
    compute = sum(layer.tf + layer.tb + layer.u for layer in profile.layers)
    say(f"  {profile.meta['warmup']} + {profile.meta['iterations']} batches, {len(profile)} layers, compute "
        f"{compute * 1e3:.1f} ms per batch, {profile.bucket_cost * 1e3:.2f} ms of host work per bucket; "
        f"took {time.perf_counter() - started:.1f} s")
    cost = costmodel.from_link(engine.size(), units.parse_bandwidth(bandwidth), units.parse_duration(latency))
    say(f"cost model: ring on {bandwidth} links with {latency} latency (assumed, not measured)")

    def plan_here() -> Plan:
        began = time.perf_counter()
        spec = f"threshold:{threshold}" if threshold else "search"
        plan = make_plan(profile, cost, planner=planner, fusion=spec, shard_update=shard_update)
        say(f"planned (fusion {spec}) in {time.perf_counter() - began:.2f} s: {len(plan.groups)} groups, "
            f"predicted {plan.predicted.iteration_time * 1e3:.1f} ms per batch")
        return plan

    facts = costmodel.planning_facts(cost, f"assumed ring on {bandwidth} links, {latency}", len(profile))
    return measure.plan_on_rank0(plan_here), facts

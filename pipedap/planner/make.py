"""The one way a profile and a cost model become a plan (plan CLI, benchmark, online planner).

Every place that plans calls :func:`make_plan`, so a plan made offline and one made
online from the same numbers are the same plan, with the same ``inputs_hash``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .costmodel import CostModel
from .fusion import FUSION_SPECS, Grouping, groupings, search
from .plan import Plan, hash_inputs
from .profile import Profile

# The schedules a plan can be made with.
PLANNABLE = ("optimal", "pipedap", "dear", "wfbp", "bytescheduler")
# With shard_update every all-gather is in the forward phase: the order is DeAR's, only the fusion is chosen.
SHARDED_PLANNERS = ("optimal", "pipedap", "dear")


def sharded_profile(profile: Profile, world_size: int) -> Profile:
    """The profile with each update time divided by the world size: what one rank's shard takes."""
    layers = tuple(dataclasses.replace(layer, u=layer.u / world_size) for layer in profile.layers)
    return dataclasses.replace(profile, layers=layers)


def make_plan(profile: Profile, cost: CostModel, *, planner: str = "optimal",
              fusion: str | Mapping[str, Grouping] = "search", shard_update: bool = False) -> Plan:
    """The plan of `planner` for `profile` on `cost`, over the fusion candidates `fusion`.

    `planner` is one of :data:`PLANNABLE` (``pipedap``: the paper's greedy; ``optimal``:
    the exact planner seeded with it). `fusion` is a spec (:data:`.fusion.FUSION_SPECS`,
    e.g. ``"none"`` to keep the profile's layers as the groups) or named groupings; the
    candidate with the shortest simulated iteration wins. The world size is the cost
    model's. The plan's ``inputs_hash`` is the SHA-256 of the profile, the cost model, the
    planner and the candidate groupings: what the plan was made from, so equal hashes mean
    the same inputs (and, planning being deterministic, the same plan).

    With `shard_update` the plan is for ``DistributedOptimizer(shard_update=True)``: the
    profile's update times (of whole buckets) are divided by the world size, the timeline
    puts the updates in ``step()`` before the all-gathers ([Note: sharded updates in the
    timeline]), and since every all-gather is then in the forward phase the order is DeAR's:
    the planner chooses the fusion only, and the plan is named ``dear``.
    """
    if planner not in PLANNABLE:
        raise ValueError(f"planner {planner!r} cannot make a plan; use one of {', '.join(PLANNABLE)}")
    if shard_update and planner not in SHARDED_PLANNERS:
        raise ValueError(f"planner {planner!r} with shard_update: a sharded plan has DeAR's order; use one of "
                         f"{', '.join(SHARDED_PLANNERS)}")
    if shard_update:
        profile, planner = sharded_profile(profile, cost.world_size), "dear"
    if isinstance(fusion, str):
        candidates = groupings(fusion, profile, cost)
    else:
        candidates = dict(fusion)
    if not candidates:
        raise ValueError(f"no fusion candidates to plan over; pass a spec ({FUSION_SPECS}) or named groupings")
    best, _ = search(profile, cost, planners=(planner,), groupings=candidates, shard_update=shard_update)
    options = {"planner": planner, "fusion": {name: [list(group) for group in g] for name, g in candidates.items()}}
    if shard_update:  # (absent otherwise: the hashes of unsharded plans stay what they were)
        options["shard_update"] = True
    return best.schedule.to_plan(hash_inputs(profile.to_dict(), cost.to_dict(), options))

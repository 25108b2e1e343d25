"""The one way a profile and a cost model become a plan (plan CLI, benchmark, online planner).

Every place that plans calls :func:`make_plan`, so a plan made offline and one made
online from the same numbers are the same plan, with the same ``inputs_hash``.
"""

from __future__ import annotations

from collections.abc import Mapping

from .costmodel import CostModel
from .fusion import FUSION_SPECS, Grouping, groupings, search
from .plan import Plan, hash_inputs
from .profile import Profile

# The schedules a plan can be made with.
PLANNABLE = ("optimal", "pipedap", "dear", "wfbp", "bytescheduler")


def make_plan(profile: Profile, cost: CostModel, *, planner: str = "optimal",
              fusion: str | Mapping[str, Grouping] = "search") -> Plan:
    """The plan of `planner` for `profile` on `cost`, over the fusion candidates `fusion`.

    `planner` is one of :data:`PLANNABLE` (``pipedap``: the paper's greedy; ``optimal``:
    the exact planner seeded with it). `fusion` is a spec (:data:`.fusion.FUSION_SPECS`,
    e.g. ``"none"`` to keep the profile's layers as the groups) or named groupings; the
    candidate with the shortest simulated iteration wins. The world size is the cost
    model's. The plan's ``inputs_hash`` is the SHA-256 of the profile, the cost model, the
    planner and the candidate groupings: what the plan was made from, so equal hashes mean
    the same inputs (and, planning being deterministic, the same plan).
    """
    if planner not in PLANNABLE:
        raise ValueError(f"planner {planner!r} cannot make a plan; use one of {', '.join(PLANNABLE)}")
    if isinstance(fusion, str):
        candidates = groupings(fusion, profile, cost)
    else:
        candidates = dict(fusion)
    if not candidates:
        raise ValueError(f"no fusion candidates to plan over; pass a spec ({FUSION_SPECS}) or named groupings")
    best, _ = search(profile, cost, planners=(planner,), groupings=candidates)
    options = {"planner": planner, "fusion": {name: [list(group) for group in g] for name, g in candidates.items()}}
    return best.schedule.to_plan(hash_inputs(profile.to_dict(), cost.to_dict(), options))

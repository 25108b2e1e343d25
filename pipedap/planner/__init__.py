"""The planner: timing model, profiles, schedules, fusion and simulation (docs/scheduling.md).

Pure Python + numpy: no torch, no MPI, so plans can be computed, inspected and tested on
any machine. Layers, bottom up:

* :mod:`.costmodel`: α-β model of rs/ag/ar (fit from samples, or from link parameters).
* :mod:`.profile`: per-layer compute times and gradient bytes (JSON).
* :mod:`.plan`: the Plan the runtime executes (JSON, validation, digest).
* :mod:`.simulator`: the §3 timeline of a schedule: iteration time and lower bounds.
* :mod:`.schedules`: WFBP, ByteScheduler, DeAR, PipeDAP greedy, the exact planner.
* :mod:`.fusion`: grouping layers into buckets, and the joint fusion + order search.
* :mod:`.make`: :func:`make_plan`, the one way a profile and a cost model become a Plan.
"""

from .costmodel import AlphaBeta, CostModel
from .make import PLANNABLE, make_plan
from .plan import Plan, PlanError
from .profile import Layer, Profile
from .simulator import Problem, Timeline, simulate

__all__ = [
    "PLANNABLE", "AlphaBeta", "CostModel", "Layer", "Plan", "PlanError", "Problem", "Profile", "Timeline",
    "make_plan", "simulate",
]

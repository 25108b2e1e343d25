"""Pipeline parallelism (PipeDream's runtime): stages over ranks, 1F1B with weight stashing, flush, replicas.

See docs/pipeline.md. :class:`StageRuntime` runs one rank's stage; configs are
PipeDream's JSON (``module_to_stage_map``, ``stage_to_rank_map``). Names load on
first use, so ``pipedap.pipeline.config`` and ``.schedules`` import without the
compiled core.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PipelineConfig": "pipedap.pipeline.config",
    "PipelineConfigError": "pipedap.pipeline.config",
    "SCHEDULES": "pipedap.pipeline.schedules",
    "StageModule": "pipedap.pipeline.runtime",
    "StageRuntime": "pipedap.pipeline.runtime",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipedap.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

"""PipeDream's pipeline configuration: which stage runs each module, which ranks run each stage.

The format is PipeDream's ``mp_conf.json`` / ``dp_conf.json`` / ``hybrid_conf.json``::

    {"module_to_stage_map": [0, 0, 1, 1, 1], "stage_to_rank_map": {"0": [0, 1], "1": [2]}}

Entry i of ``module_to_stage_map`` is the stage of module i (the last module is
the loss, so it is on the last stage); ``stage_to_rank_map`` lists each stage's
ranks. Several ranks on one stage are replicas of it: unit j (a minibatch, or a
micro-batch with ``flush``) runs on replica ``j % n`` of a stage of n ranks,
PipeDream's round-robin.

:meth:`PipelineConfig.validate` checks a config against the model and the job
and raises :class:`PipelineConfigError` naming the key, stage or rank and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

KEYS = ("module_to_stage_map", "stage_to_rank_map")
EXAMPLE = '{"module_to_stage_map": [0, 0, 1], "stage_to_rank_map": {"0": [0], "1": [1]}}'


class PipelineConfigError(ValueError):
    """A pipeline config that cannot run this model on this job."""


@dataclass(frozen=True)
class PipelineConfig:
    module_to_stage_map: tuple[int, ...]
    stage_to_rank_map: dict[int, tuple[int, ...]]
    where: str = "config"  # the file it came from, for messages

    @classmethod
    def load(cls, source: str | os.PathLike | dict | PipelineConfig) -> PipelineConfig:
        """A config from a JSON file, a dict in PipeDream's format, or a config (returned as is)."""
        if isinstance(source, PipelineConfig):
            return source
        where = "config"
        if isinstance(source, (str, os.PathLike)):
            where = str(source)
            try:
                with open(source) as f:
                    source = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise PipelineConfigError(f"{where}: cannot read the pipeline config: {err}") from None
        return cls._parse(source, where)

    @classmethod
    def _parse(cls, raw: Any, where: str) -> PipelineConfig:
        if not isinstance(raw, dict):
            raise PipelineConfigError(f"{where}: expected a JSON object like {EXAMPLE}, got {type(raw).__name__}")
        for key in KEYS:
            if key not in raw:
                raise PipelineConfigError(f"{where}: missing key '{key}'; a pipeline config looks like {EXAMPLE}")
        modules = raw["module_to_stage_map"]
        if not isinstance(modules, list) or not all(_is_index(s) for s in modules):
            raise PipelineConfigError(f"{where}: 'module_to_stage_map' must be a list of stage numbers >= 0 "
                                      f"(one per module), got {modules!r}")
        ranks = raw["stage_to_rank_map"]
        if not isinstance(ranks, dict):
            raise PipelineConfigError(f"{where}: 'stage_to_rank_map' must map stage numbers to rank lists, "
                                      f"got {ranks!r}")
        stage_to_ranks: dict[int, tuple[int, ...]] = {}
        for key, members in ranks.items():
            if not str(key).isdigit():
                raise PipelineConfigError(f"{where}: 'stage_to_rank_map' has key {key!r}; keys are stage numbers "
                                          "like \"0\"")
            if not isinstance(members, list) or not all(_is_index(r) for r in members):
                raise PipelineConfigError(f"{where}: 'stage_to_rank_map' stage {key}: expected a list of ranks "
                                          f">= 0, got {members!r}")
            stage_to_ranks[int(key)] = tuple(members)
        return cls(tuple(modules), dict(sorted(stage_to_ranks.items())), where)

    # --- checks ------------------------------------------------------------------

    def validate(self, num_modules: int, world_size: int) -> None:
        """Raise PipelineConfigError unless this config can run ``num_modules`` modules on ``world_size`` ranks."""
        where, stages = self.where, self.module_to_stage_map
        if len(stages) != num_modules:
            raise PipelineConfigError(
                f"{where}: 'module_to_stage_map' has {len(stages)} entries but the model has {num_modules} modules "
                "(the last one is the loss); give one stage number per module")
        if not stages:
            raise PipelineConfigError(f"{where}: 'module_to_stage_map' is empty; the model needs at least a loss")
        for i in range(1, len(stages)):
            if stages[i] < stages[i - 1]:
                raise PipelineConfigError(
                    f"{where}: 'module_to_stage_map': module {i} is on stage {stages[i]} after a module on stage "
                    f"{stages[i - 1]}; a stage's modules must be consecutive and stages in order")
        num_stages = stages[-1] + 1
        for s in range(num_stages):
            if s not in stages:
                raise PipelineConfigError(f"{where}: 'module_to_stage_map': stage {s} has no module; number the "
                                          f"stages 0..{num_stages - 1} without gaps")
        for s in self.stage_to_rank_map:
            if s >= num_stages:
                raise PipelineConfigError(
                    f"{where}: 'stage_to_rank_map' names stage {s}, but 'module_to_stage_map' has stages "
                    f"0..{num_stages - 1}; remove it or give it modules")
        stage_of: dict[int, int] = {}
        for s in range(num_stages):
            members = self.stage_to_rank_map.get(s, ())
            if not members:
                raise PipelineConfigError(f"{where}: 'stage_to_rank_map': stage {s} has no rank; add \"{s}\": [rank]")
            for r in members:
                if r in stage_of:
                    where_else = "twice in that stage" if stage_of[r] == s else f"also in stage {stage_of[r]}"
                    raise PipelineConfigError(f"{where}: 'stage_to_rank_map': rank {r} is in stage {s} and "
                                              f"{where_else}; a rank runs exactly one stage")
                stage_of[r] = s
        if len(stage_of) != world_size:
            raise PipelineConfigError(
                f"{where}: 'stage_to_rank_map' places {len(stage_of)} ranks ({_listing(sorted(stage_of))}) but the "
                f"job has {world_size}; start it with mpirun -np {len(stage_of)}, or map ranks 0..{world_size - 1}")
        for r in range(world_size):
            if r not in stage_of:
                raise PipelineConfigError(
                    f"{where}: 'stage_to_rank_map': rank {r} has no stage (ranks placed: "
                    f"{_listing(sorted(stage_of))}); put every rank 0..{world_size - 1} in one stage")

    # --- queries (on a validated config) ------------------------------------------

    @property
    def num_stages(self) -> int:
        return self.module_to_stage_map[-1] + 1

    def ranks(self, stage: int) -> tuple[int, ...]:
        """The ranks of ``stage``, in the config's order (replica i is the i-th)."""
        return self.stage_to_rank_map[stage]

    def stage_of(self, rank: int) -> int:
        return next(s for s, members in self.stage_to_rank_map.items() if rank in members)

    def modules_of(self, stage: int) -> list[int]:
        """Indices of the modules on ``stage``."""
        return [i for i, s in enumerate(self.module_to_stage_map) if s == stage]

    def rank_for(self, stage: int, unit: int) -> int:
        """The rank of ``stage`` that runs ``unit`` (round-robin over its replicas)."""
        members = self.stage_to_rank_map[stage]
        return members[unit % len(members)]

    def to_dict(self) -> dict:
        """PipeDream's JSON form."""
        return {"module_to_stage_map": list(self.module_to_stage_map),
                "stage_to_rank_map": {str(s): list(r) for s, r in self.stage_to_rank_map.items()}}


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _listing(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) or "none"

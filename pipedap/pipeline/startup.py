"""What every rank checks together before the first minibatch: the config and the shapes.

A check that fails on one rank must fail on every rank, or the others would
wait forever for its first tensor. So each check ends in :func:`agree`: one
``all_gather_object`` of every rank's error (or None), and the same error,
naming each failing rank, is raised everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pipedap.pipeline.communication import TensorSpec
from pipedap.pipeline.config import PipelineConfig, PipelineConfigError


def agree(transport, error: str | None, what: str, value=None) -> list:
    """Every rank's ``value``; raises on every rank, naming the failing ranks, if ``error`` is set on any."""
    everyone = transport.all_gather_object((error, value), what)
    ranks_of: dict[str, list[int]] = {}
    for r, (e, _) in enumerate(everyone):
        if e:
            ranks_of.setdefault(e, []).append(r)
    if ranks_of:
        raise PipelineConfigError(f"pipeline {what}: " + "; ".join(
            f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {e}" for e, rs in ranks_of.items()))
    return [v for _, v in everyone]


def checked_config(transport, source, num_modules: int) -> PipelineConfig:
    """The config, validated on this rank and agreed on by every rank."""
    config, error = None, None
    try:
        config = PipelineConfig.load(source)
        config.validate(num_modules, transport.size)
    except PipelineConfigError as err:
        error = str(err)
    digest = "" if config is None else hashlib.sha256(json.dumps(config.to_dict()).encode()).hexdigest()[:12]
    views = agree(transport, error, "config", f"{num_modules} modules, config {digest}")
    if len(set(views)) > 1:
        listing = "; ".join(f"rank {r}: {v}" for r, v in enumerate(views))
        raise PipelineConfigError(f"pipeline config: the ranks disagree ({listing}); every rank must start with "
                                  "the same model and config")
    return config


@contextlib.contextmanager
def _evaluating(modules: nn.Module) -> Iterator[None]:
    """Eval mode and no grad: a probe forward changes no running statistics and builds no graph."""
    modes = [m.training for m in modules.modules()]
    modules.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules.modules(), modes):
            m.training = mode


def _probe(stage: int, num_stages: int, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
           source: str) -> tuple[TensorSpec, TensorSpec] | None:
    """What ``stage`` sends on for input ``x`` (target ``y``), or None on the last stage; raises with the cause."""
    try:
        with _evaluating(module):
            out = module(x, y)
    except Exception as err:  # the user's modules may raise anything; report it with the stage
        raise PipelineConfigError(
            f"stage {stage} cannot run on {source} ({TensorSpec.of(x)}): {type(err).__name__}: {err}. The first module "
            f"of stage {stage} must take {source}: check module_to_stage_map") from None
    if not isinstance(out, torch.Tensor):
        raise PipelineConfigError(f"stage {stage} returns a {type(out).__name__}; the runtime passes one tensor "
                                  "between stages")
    if stage == num_stages - 1:
        if out.numel() != 1 or not out.is_floating_point():
            raise PipelineConfigError(f"the loss (the last module) returns {TensorSpec.of(out)}; it must return a "
                                      "floating-point scalar, e.g. the mean loss of the batch")
        return None
    return TensorSpec.of(out), TensorSpec.of(y)


def boundary_specs(transport, config: PipelineConfig, stage: int, module: nn.Module,
                   sample: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None, device) -> list:
    """``specs[s]`` = (activation, target) that stage s sends to stage s + 1, agreed by every rank.

    A sample unit passes through the stages in order: in round s, the ranks of
    stage s run their modules on stage s - 1's output (zeros of its shape) and
    every rank learns the result or the error.
    """
    specs: list[tuple[TensorSpec, TensorSpec]] = []
    for s in range(config.num_stages):
        mine, error = None, None
        if s == stage:
            try:
                if s == 0:
                    if sample is None:
                        raise PipelineConfigError("stage 0 needs sample=(input, target), one minibatch as `data` "
                                                  "yields it, to find the shapes sent between stages")
                    x, y = sample()
                    source = "the sample input"
                else:
                    x, y = (spec.empty(device).zero_() for spec in specs[-1])
                    source = f"stage {s - 1}'s output"
                mine = _probe(s, config.num_stages, module, x.to(device), y.to(device), source)
            except PipelineConfigError as err:
                error = str(err)
        everyone = agree(transport, error, "shapes", mine)
        outputs = {everyone[r] for r in config.ranks(s)}
        if len(outputs) > 1:
            raise PipelineConfigError(f"pipeline shapes: the replicas of stage {s} return different tensors "
                                      f"({', '.join(str(o) for o in outputs)}); they must run the same modules")
        if s < config.num_stages - 1:
            specs.append(outputs.pop())
    return specs

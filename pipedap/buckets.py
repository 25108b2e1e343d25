"""Flat gradient buckets: one per plan group, with each parameter's ``.grad`` a view into it.

Layout of a bucket's buffer::

    [ grad of param 0 | grad of param 1 | ... | used flags (one per param) | padding ]

The whole buffer is reduce-scattered and all-gathered (or all-reduced), so it is
padded to a multiple of the world size. [Note: used flags] A parameter's flag is
set to 1 when this rank produced a gradient for it; after the reduction a flag is
non-zero iff *some* rank did. Parameters whose flag is zero everywhere are left out
of the optimizer step, exactly as single-process training skips ``grad is None``
(otherwise weight decay and momentum would still move them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch


@dataclass
class Bucket:
    index: int
    names: list[str]
    params: list[torch.nn.Parameter]
    buffer: torch.Tensor
    grads: list[torch.Tensor]  # views into buffer, shaped like the params
    flags: torch.Tensor  # view into buffer: one element per param
    shard: torch.Tensor  # this rank's block of buffer: reduce-scatter output, all-gather input
    grad_numel: int  # elements of buffer that hold gradients (the rest: flags and padding)
    shard_start: int  # offset of shard in buffer

    @property
    def nbytes(self) -> int:
        return self.grad_numel * self.buffer.element_size()

    def attach_grads(self) -> None:
        """Point every parameter's ``.grad`` at its view (keeping a gradient that was produced elsewhere)."""
        for p, view in zip(self.params, self.grads):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view

    def used_params(self) -> list[torch.nn.Parameter]:
        """Parameters that got a gradient on at least one rank (valid after communication)."""
        return [p for p, used in zip(self.params, self.flags.tolist()) if used != 0]


def build_bucket(index: int, named: list[tuple[str, torch.nn.Parameter]], world: int, rank: int) -> Bucket:
    names = [n for n, _ in named]
    params = [p for _, p in named]
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"bucket {index} ({names[0]} .. {names[-1]}) mixes dtypes {sorted(map(str, dtypes))} or devices "
            f"{sorted(map(str, devices))}; a bucket must hold parameters of one dtype on one device"
        )
    grad_numel = sum(p.numel() for p in params)
    used = grad_numel + len(params)
    total = -(-used // world) * world
    buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
    grads, offset = [], 0
    for p in params:
        grads.append(buffer[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    shard_numel = total // world
    bucket = Bucket(
        index=index, names=names, params=params, buffer=buffer, grads=grads,
        flags=buffer[grad_numel:used], shard=buffer[rank * shard_numel : (rank + 1) * shard_numel],
        grad_numel=grad_numel, shard_start=rank * shard_numel,
    )
    bucket.attach_grads()
    return bucket


T = TypeVar("T")


def group_by_module(named: Iterable[tuple[str, T]]) -> dict[str, list[tuple[str, T]]]:
    """``(name, param)`` pairs grouped by the module that registers them (the name up to its last dot),
    modules in first-seen order and each module's pairs in the given order; top-level parameters under ``""``.
    """
    modules: dict[str, list[tuple[str, T]]] = {}
    for name, param in named:
        modules.setdefault(name.rpartition(".")[0], []).append((name, param))
    return modules


def default_groups(named: list[tuple[str, torch.nn.Parameter]], fusion_bytes: int) -> list[list[str]]:
    """Consecutive modules' parameters (named_parameters order ~ forward order), fused up to ``fusion_bytes``.

    A module's parameters never split; dtype or device changes start a new group.
    """
    modules = group_by_module(named)
    groups: list[list[str]] = []
    current: list[tuple[str, torch.nn.Parameter]] = []
    for members in modules.values():
        kind = (members[0][1].dtype, members[0][1].device)
        size = sum(p.numel() * p.element_size() for _, p in current)
        if current and ((current[0][1].dtype, current[0][1].device) != kind or size >= fusion_bytes):
            groups.append([n for n, _ in current])
            current = []
        current.extend(members)
    if current:
        groups.append([n for n, _ in current])
    return groups

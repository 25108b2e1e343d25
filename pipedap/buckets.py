"""Flat gradient buckets: one per plan group, with each parameter's ``.grad`` a view into it.

Layout of a bucket's buffer::

    [ grad of param 0 | grad of param 1 | ... | used flags (one per param) | padding ]

The whole buffer is reduce-scattered and all-gathered (or all-reduced), so it is
padded to a multiple of the world size. [Note: used flags] A parameter's flag is
set to 1 when this rank produced a gradient for it; after the reduction a flag is
non-zero iff *some* rank did. Parameters whose flag is zero everywhere are left out
of the optimizer step, exactly as single-process training skips ``grad is None``
(otherwise weight decay and momentum would still move them).

[Note: compressed buckets]
With a wire dtype (``compression=Compression.fp16``/``bf16``) the bucket also has
a ``wire`` buffer of that dtype, laid out as ``buffer``. ``pack()`` casts the
gradients into it just before the reduce-scatter (or all-reduce); the reduction,
the shard and the all-gather stay in the wire dtype (half the bytes on the link);
``unpack()`` casts the gathered result back into ``buffer``, where the update
runs in the parameters' dtype.

[Note: parameter buffers]
With ``shard_update`` (pipedap/shard_update.py) the parameters move into a second
flat buffer, ``params_buffer``, laid out as ``buffer`` (each parameter's ``.data`` a
view into it). This rank's block of it, ``params_shard``, is what this rank
updates; the all-gather then gathers the updated blocks into every rank's
``params_buffer``, in the parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
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
    shard: torch.Tensor  # this rank's block of buffer (of sent: the reduce-scatter's output, all-gather's input)
    grad_numel: int  # elements of buffer that hold gradients (the rest: flags and padding)
    shard_start: int  # offset of shard in buffer
    wire: torch.Tensor | None = None  # [Note: compressed buckets]: what travels, when it is not buffer itself
    wire_shard: torch.Tensor | None = None  # this rank's block of wire
    params_buffer: torch.Tensor | None = None  # [Note: parameter buffers]
    params_shard: torch.Tensor | None = None  # this rank's block of params_buffer

    @property
    def sent(self) -> torch.Tensor:
        """The buffer the collectives run on: ``wire`` when compressed, else ``buffer``."""
        return self.buffer if self.wire is None else self.wire

    @property
    def sent_shard(self) -> torch.Tensor:
        return self.shard if self.wire_shard is None else self.wire_shard

    @property
    def nbytes(self) -> int:
        """Gradient bytes on the link (in the wire dtype)."""
        return self.grad_numel * self.sent.element_size()

    def mark_used(self, indices: Collection[int]) -> None:
        """Set the used flags of the parameters at `indices` ([Note: used flags]), before the bucket is
        reduced: one write for a whole bucket, since on a GPU every write is a kernel launch."""
        if len(indices) == len(self.params):
            self.flags.fill_(1)
        else:
            for i in indices:
                self.flags[i] = 1

    def pack(self) -> None:
        """Cast the gradients (and flags) into the wire buffer, before they are reduced."""
        if self.wire is not None:
            self.wire.copy_(self.buffer)

    def unpack(self) -> None:
        """Cast the reduced, gathered wire buffer back into ``buffer`` (the gradients' views)."""
        if self.wire is not None:
            self.buffer.copy_(self.wire)

    def unpack_shard(self) -> None:
        """Cast this rank's reduced block of the wire buffer back into ``shard`` (before a sharded update)."""
        if self.wire is not None:
            self.shard.copy_(self.wire_shard)

    def flatten_params(self) -> None:
        """Move the parameters into ``params_buffer`` ([Note: parameter buffers]); their values are kept."""
        if self.params_buffer is not None:
            return
        self.params_buffer = torch.zeros_like(self.buffer)
        for p, offset in zip(self.params, self.offsets()):
            view = self.params_buffer[offset : offset + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
        self.params_shard = self.params_buffer[self.shard_start : self.shard_start + self.shard.numel()]

    def offsets(self) -> list[int]:
        """Where each parameter starts in the buffer (and, last, where the gradients end)."""
        out = [0]
        for p in self.params:
            out.append(out[-1] + p.numel())
        return out

    def attach_grads(self) -> None:
        """Point every parameter's ``.grad`` at its view (keeping a gradient that was produced elsewhere)."""
        for p, view in zip(self.params, self.grads):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view

    def used_params(self, flags: torch.Tensor | None = None) -> list[torch.nn.Parameter]:
        """Parameters that got a gradient on at least one rank (valid after communication).

        ``flags``: reduced used flags held outside the buffer (a sharded step all-reduces a copy
        with the reduce-scatter, after which the buffer's flags are whole on one rank only)."""
        flags = self.flags if flags is None else flags
        return [p for p, used in zip(self.params, flags.tolist()) if used != 0]


def build_bucket(index: int, named: list[tuple[str, torch.nn.Parameter]], world: int, rank: int,
                 wire_dtype: torch.dtype | None = None) -> Bucket:
    """The bucket of ``named``'s gradients, shards for ``world`` ranks; with ``wire_dtype`` (a floating
    dtype other than the parameters') a compressed one ([Note: compressed buckets])."""
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
    own = slice(rank * shard_numel, (rank + 1) * shard_numel)
    wire = None
    if wire_dtype is not None and wire_dtype != buffer.dtype and buffer.is_floating_point():
        wire = torch.zeros(total, dtype=wire_dtype, device=buffer.device)
    bucket = Bucket(
        index=index, names=names, params=params, buffer=buffer, grads=grads,
        flags=buffer[grad_numel:used], shard=buffer[own], grad_numel=grad_numel, shard_start=rank * shard_numel,
        wire=wire, wire_shard=None if wire is None else wire[own],
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
